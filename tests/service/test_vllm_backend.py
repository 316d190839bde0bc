"""CLTUNE_ENGINE_BACKEND=vllm against a fake vLLM on loopback (a FastAPI app speaking vLLM's LoRA and
OpenAI endpoints, recording every call): adapters load on first use under collision-free names, the LRU
and deletes unload them, completions / chat / SSE are forwarded with `model` rewritten, vLLM's errors keep
cltune's error shape, vLLM down is a 503, and model="auto" still routes. No model is loaded anywhere."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cltune.registry import Registry
from service.api.app import create_app
from service.settings import Settings

from .api_support import ADMIN, fake_adapter, make_adapters, new_tenant, serving

BASE = "fake-base"
CODEBOOKS = {
    "capitals": [f"What is the capital of {c}?" for c in ("France", "Chile", "Spain", "Japan", "Kenya")],
    "french": [f"Write the number {n} in French words." for n in (3, 17, 42, 99, 250)],
}


@dataclass
class FakeVLLM:
    """What the fake server saw and holds: loaded LoRA name -> path, every call, the request bodies."""

    loaded: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)


def _err(status: int, message: str, type_: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": status}}, status)


def fake_vllm(state: FakeVLLM) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        loras = [{"id": n, "parent": BASE} for n in state.loaded]
        return {"object": "list", "data": [{"id": BASE, "parent": None}, *loras]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> Response:
        body = await request.json()
        state.calls.append(("load", body["lora_name"]))
        if body["lora_name"] in state.loaded:
            return _err(400, f"The lora adapter '{body['lora_name']}' has already been loaded.")
        if not (Path(body["lora_path"]) / "adapter_config.json").is_file():
            return _err(400, f"no adapter at {body['lora_path']}")
        state.loaded[body["lora_name"]] = body["lora_path"]
        return Response(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> Response:
        body = await request.json()
        state.calls.append(("unload", body["lora_name"]))
        if state.loaded.pop(body["lora_name"], None) is None:
            return _err(404, f"The lora adapter '{body['lora_name']}' cannot be found.", "NotFoundError")
        return Response("Success")

    async def generate(request: Request, chat: bool) -> Response:
        body = await request.json()
        state.bodies.append(body)
        model = body["model"]
        if model != BASE and model not in state.loaded:
            return _err(404, f"The model `{model}` does not exist.", "NotFoundError")
        if body["max_tokens"] == 49:
            return _err(500, "the fake broke", "InternalServerError")
        if body["max_tokens"] > 50:
            return _err(400, "max_tokens is too large for this fake", "BadRequestError")
        text = f"[{model}] " + (body["messages"][-1]["content"] if chat else body["prompt"])
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            return JSONResponse({"id": "x", "object": kind, "model": model, "choices": [choice]})

        # completions events are compact JSON, as vLLM writes them; chat events have spaces after the
        # colons, which cltune's relay must handle too (it then parses the event)
        separators = (", ", ": ") if chat else (",", ":")

        def events() -> Iterator[str]:
            for word in text.split(" "):
                c = {"delta": {"content": word}} if chat else {"text": word}
                chunk = {"id": "x", "object": kind + (".chunk" if chat else ""), "model": model}
                event = json.dumps({**chunk, "choices": [{"index": 0, **c}]}, separators=separators)
                yield f"data: {event}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, chat=True)

    return app


@dataclass
class Setup:
    url: str  # cltune's /v1
    fake: FakeVLLM
    keys: dict[str, str]  # tenant name -> API key
    tenants: dict[str, str]  # tenant name -> id
    settings: Settings

    def post(self, path: str, body: dict[str, Any], who: str = "alpha") -> httpx.Response:
        return httpx.post(
            f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {self.keys[who]}"}, timeout=30
        )


def _tenants(url: str) -> tuple[dict[str, str], dict[str, str]]:
    keys, ids = {}, {}
    with httpx.Client(base_url=url) as client:
        for name in ("alpha", "beta"):
            ids[name], keys[name] = new_tenant(client, name)
    return keys, ids


def vllm_settings(tmp_path: Path, vllm_url: str, **overrides: Any) -> Settings:
    """A cltune app's settings with the vLLM backend at `vllm_url` (tiny-llama as the base)."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'api.db'}",
        admin_key=ADMIN,
        engine_model="tiny-llama",
        engine_backend="vllm",
        vllm_url=vllm_url,
        **overrides,
    )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    state = FakeVLLM()
    with serving(fake_vllm(state)) as vllm_url:
        settings = vllm_settings(tmp_path, vllm_url, vllm_max_loras=2, engine_max_tokens=64)
        app = create_app(settings)
        with serving(app) as url:
            keys, ids = _tenants(url)
            # the same adapter names in both tenants: their vLLM names must differ
            for who in ("alpha", "beta"):
                make_adapters(
                    Registry(settings.adapters_dir(ids[who])), ["capitals", "french"], codebooks=CODEBOOKS
                )
            yield Setup(f"{url}/v1", state, keys, ids, settings)


def _model(r: httpx.Response) -> str:
    """The vLLM model name the fake answered with (it echoes it in the text)."""
    body = r.json()
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text.split("]")[0].lstrip("[")


def test_loads_on_first_use_and_names_tenants_apart(setup: Setup) -> None:
    r = setup.post("/completions", {"model": "capitals", "prompt": "Hello", "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "capitals@1" and r.headers["x-cltune-adapter"] == "capitals@1"
    alpha = _model(r)
    assert setup.fake.calls == [("load", alpha)] and alpha.endswith("-capitals-v1")
    assert setup.fake.loaded[alpha] == str(
        (setup.settings.adapters_dir(setup.tenants["alpha"]) / "capitals" / "v1").resolve()
    )
    again = setup.post("/completions", {"model": "capitals@1", "prompt": "Hello", "max_tokens": 5})
    assert _model(again) == alpha and len(setup.fake.calls) == 1  # loaded once
    beta = _model(setup.post("/completions", {"model": "capitals", "prompt": "Hi", "max_tokens": 5}, "beta"))
    assert beta != alpha and setup.fake.calls[-1] == ("load", beta)
    assert setup.fake.loaded[beta].startswith(
        str(setup.settings.adapters_dir(setup.tenants["beta"]).resolve())
    )
    # cltune's sampling defaults are sent explicitly; the completion prompt is encoded as the embedded engine does
    sent = setup.fake.bodies[0]
    assert sent["temperature"] == 1.0 and sent["top_p"] == 1.0 and sent["add_special_tokens"] is False
    base = setup.post("/completions", {"model": "base", "prompt": "Hi"})
    assert (
        _model(base) == BASE and base.json()["model"] == "base" and setup.fake.bodies[-1]["max_tokens"] == 16
    )


def test_lru_unloads_the_least_recently_used(setup: Setup) -> None:
    names = []
    for who, model in (("alpha", "capitals"), ("alpha", "french"), ("beta", "capitals")):
        names.append(_model(setup.post("/chat/completions", chat(model), who)))
    assert setup.fake.calls[-1] == ("unload", names[0])  # max 2: the oldest went
    assert set(setup.fake.loaded) == {names[1], names[2]}
    r = setup.post("/chat/completions", chat("capitals"))  # used again: loaded again
    assert _model(r) == names[0] and setup.fake.calls[-2:] == [("load", names[0]), ("unload", names[1])]


def test_delete_unloads_the_adapter(setup: Setup) -> None:
    name = _model(setup.post("/completions", {"model": "french", "prompt": "x", "max_tokens": 3}))
    auth = {"Authorization": f"Bearer {setup.keys['alpha']}"}
    r = httpx.delete(f"{setup.url}/adapters/french", headers=auth)
    assert r.status_code == 204, r.text
    assert setup.fake.calls[-1] == ("unload", name) and name not in setup.fake.loaded
    gone = setup.post("/completions", {"model": "french", "prompt": "x", "max_tokens": 3})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def chat(model: str, content: str = "What is the capital of Peru?", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def _events(r: httpx.Response) -> list[dict[str, Any]]:
    lines = [ln[6:] for ln in r.text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_streaming_passes_chunks_through(setup: Setup) -> None:
    r = setup.post("/chat/completions", chat("french", "Write 3 in French", stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert {e["model"] for e in events} == {"french@1"}
    text = " ".join(e["choices"][0]["delta"]["content"] for e in events)
    assert text.endswith("-french-v1] Write 3 in French")
    r = setup.post("/completions", {"model": "base", "prompt": "a b c", "stream": True, "max_tokens": 4})
    assert [e["choices"][0]["text"] for e in _events(r)] == [f"[{BASE}]", "a", "b", "c"]
    assert {e["model"] for e in _events(r)} == {"base"}
    # the adapter's vLLM name inside generated text is text: only the event's own field is rewritten
    r = setup.post("/completions", {"model": "french", "prompt": "x", "stream": True, "max_tokens": 4})
    events = _events(r)
    assert {e["model"] for e in events} == {"french@1"} and events[0]["choices"][0]["text"].endswith(
        "-french-v1]"
    )
    assert setup.fake.bodies[-1]["stream"] is True


def test_n_is_forwarded_to_vllm_and_bounded_by_cltune(setup: Setup) -> None:
    r = setup.post("/chat/completions", {**chat("french", "Write 3 in French"), "n": 3, "seed": 4})
    assert r.status_code == 200, r.text
    sent = setup.fake.bodies[-1]
    assert sent["n"] == 3 and sent["seed"] == 4  # vLLM generates (and counts usage for) the 3 choices
    r = setup.post("/completions", {"model": "base", "prompt": "x"})
    assert r.status_code == 200 and setup.fake.bodies[-1]["n"] == 1  # made explicit, as the other defaults
    calls = len(setup.fake.bodies)
    r = setup.post("/completions", {"model": "base", "prompt": "x", "n": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and len(setup.fake.bodies) == calls


def test_auto_routes_to_the_adapter(setup: Setup) -> None:
    r = setup.post("/chat/completions", chat("auto", "What is the capital of Italy?"))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "capitals@1" and r.headers["x-cltune-route-reason"]
    assert _model(r).endswith("-capitals-v1")


def test_vllm_errors_keep_the_error_shape(setup: Setup) -> None:
    r = setup.post("/completions", {"model": "capitals", "prompt": "x", "max_tokens": 60})  # fake: > 50
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "max_tokens is too large for this fake"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = setup.post("/completions", {"model": "capitals", "prompt": "x", "max_tokens": 49})
    assert r.status_code == 502 and r.json()["error"]["type"] == "server_error"
    assert "the fake broke" in r.json()["error"]["message"]
    # an adapter of another base model is refused before vLLM is asked
    fake_adapter(setup.settings, setup.tenants["alpha"], "other")
    r = setup.post("/completions", {"model": "other", "prompt": "x"})
    assert r.status_code == 409 and "other@1" in r.json()["error"]["message"]
    assert not any("other" in name for _, name in setup.fake.calls)
    # cltune's own checks still answer before vLLM is asked
    r = setup.post("/completions", {"model": "capitals", "prompt": "x", "max_tokens": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_reloads_an_adapter_vllm_forgot(setup: Setup) -> None:
    name = _model(setup.post("/completions", {"model": "capitals", "prompt": "x"}))
    setup.fake.loaded.clear()  # vLLM restarted
    r = setup.post("/completions", {"model": "capitals", "prompt": "x"})
    assert r.status_code == 200 and setup.fake.calls[-1] == ("load", name)


def test_vllm_down_is_a_503(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    port = sock.getsockname()[1]
    settings = vllm_settings(tmp_path, f"http://127.0.0.1:{port}")
    with serving(create_app(settings)) as url:
        keys, _ = _tenants(url)
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "base", "prompt": "x"},
            headers={"Authorization": f"Bearer {keys['alpha']}"},
        )
    sock.close()
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "service_unavailable" and f"127.0.0.1:{port}" in err["message"]
