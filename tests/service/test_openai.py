"""The OpenAI-compatible endpoint, driven by the official `openai` client against the app served by
uvicorn on a loopback port: completions, chat, streaming, models, routing headers, errors, tenancy."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from cltune.registry import Registry
from service.api.app import create_app
from service.settings import Settings

from .test_engine import make_adapters

ADMIN = "admin-key-for-tests"
CODEBOOKS = {
    "capitals": [
        f"What is the capital of {c}?" for c in ("France", "Chile", "Spain", "Japan", "Kenya", "Peru")
    ],
    "french": [f"Write the number {n} in French words." for n in (3, 17, 42, 99, 250, 731)],
}


@dataclass
class Served:
    url: str
    key: str  # tenant A: has the adapters
    other_key: str  # tenant B: has none
    settings: Settings


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("openai")
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'api.db'}",
        admin_key=ADMIN,
        engine_model="tiny-llama",
        engine_device="cpu",
        engine_max_tokens=64,
        engine_max_wait_ms=20,
    )
    app = create_app(settings)
    keys = []
    with TestClient(app) as admin:
        for name in ("alpha", "beta"):
            t = admin.post(
                "/v1/admin/tenants", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN}"}
            )
            k = admin.post(
                f"/v1/admin/tenants/{t.json()['id']}/keys", headers={"Authorization": f"Bearer {ADMIN}"}
            )
            keys.append((t.json()["id"], k.json()["key"]))
    make_adapters(Registry(settings.adapters_dir(keys[0][0])), ["capitals", "french"], codebooks=CODEBOOKS)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", keys[0][1], keys[1][1], settings)
    finally:
        server.should_exit = True
        thread.join(10)


def client(served: Served, other: bool = False) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.url, api_key=served.other_key if other else served.key, max_retries=0
    )


def test_models_lists_base_auto_and_only_the_callers_adapters(served: Served) -> None:
    ids = {m.id for m in client(served).models.list()}
    assert {"base", "auto", "capitals", "capitals@1", "french", "french@1"} <= ids
    assert {m.id for m in client(served, other=True).models.list()} == {"base", "auto"}


def test_completion_names_the_adapter_and_counts_tokens(served: Served) -> None:
    raw = client(served).completions.with_raw_response.create(
        model="capitals", prompt="hello", max_tokens=8, temperature=0
    )
    out = raw.parse()
    assert raw.headers["x-cltune-adapter"] == "capitals@1" and out.model == "capitals@1"
    assert out.usage is not None and out.usage.prompt_tokens == 5
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.choices[0].finish_reason in ("stop", "length")
    base = client(served).completions.create(model="base", prompt="hello", max_tokens=8, temperature=0)
    assert base.model == "base" and base.choices[0].text != out.choices[0].text


def test_chat_stream_sends_the_same_text_as_the_whole_answer(served: Served) -> None:
    c = client(served)
    msgs = [{"role": "user", "content": "Say something."}]
    whole = c.chat.completions.create(model="french@1", messages=msgs, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    chunks = list(
        c.chat.completions.create(
            model="french@1",
            messages=msgs,
            max_tokens=12,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert whole.model == "french@1" and whole.choices[0].message.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )  # type: ignore[union-attr]


def test_auto_routes_by_instruction_and_reports_the_score(served: Served) -> None:
    c = client(served)
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is the capital of Italy?"}], max_tokens=4
    )
    assert raw.headers["x-cltune-adapter"] == "capitals@1" and raw.parse().model == "capitals@1"
    assert float(raw.headers["x-cltune-route-score"]) >= 0.2
    raw = c.completions.with_raw_response.create(
        model="auto", prompt="Write the number 8 in French words.", max_tokens=4
    )
    assert raw.headers["x-cltune-adapter"] == "french@1"
    raw = c.completions.with_raw_response.create(
        model="auto", prompt="Tell me a joke about cats.", max_tokens=4
    )
    assert (
        raw.headers["x-cltune-adapter"] == "base"
        and raw.headers["x-cltune-route-reason"] == "auto_below_threshold"
    )


def test_unknown_and_other_tenants_models_answer_404_in_openai_format(served: Served) -> None:
    for c, model in (
        (client(served), "nope"),
        (client(served), "capitals@7"),
        (client(served, other=True), "capitals"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model=model, prompt="hi", max_tokens=2)
        assert e.value.status_code == 404
        assert e.value.code == "model_not_found" and e.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    "params", [{"max_tokens": -1}, {"max_tokens": 65}, {"temperature": 2.5}, {"top_p": 0}, {"n": 3}]
)
def test_bad_generation_parameters_answer_400(served: Served, params: dict[str, float]) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(served).completions.create(model="base", prompt="hi", **params)  # type: ignore[call-overload]
    assert e.value.status_code == 400 and e.value.param == next(iter(params))


def test_concurrent_clients_share_batches_and_get_their_own_answers(served: Served) -> None:
    prompts = [("capitals", "one"), ("french", "two"), ("base", "three"), ("capitals", "four")]
    alone = [
        client(served).completions.create(model=m, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for m, p in prompts
    ]
    results: list[str] = [""] * len(prompts)

    def ask(i: int) -> None:
        m, p = prompts[i]
        results[i] = (
            client(served).completions.create(model=m, prompt=p, max_tokens=6, temperature=0).choices[0].text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
