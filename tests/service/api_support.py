"""Helpers for the service tests: an app on a fresh SQLite file, tenants with keys, tiny datasets, random
saved adapters, worker processes, waiting for a condition."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi.testclient import TestClient
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from cltune.config import LoraConfig
from cltune.methods.common import peft_lora_config
from cltune.models import build_tiny_llama
from cltune.registry import AdapterRecord, Registry
from service.api.app import create_app
from service.settings import Settings

ADMIN = "admin-key-for-tests"
REPO = Path(__file__).resolve().parents[2]


def new_tenant(client: httpx.Client, name: str) -> tuple[str, str]:
    """Create a tenant and a key through the admin API that `client` (a TestClient, or an httpx.Client
    with the server's base_url) reaches. Returns (tenant id, key)."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    t = client.post("/v1/admin/tenants", json={"name": name}, headers=admin)
    assert t.status_code == 201, t.text
    k = client.post(f"/v1/admin/tenants/{t.json()['id']}/keys", headers=admin)
    assert k.status_code == 201, k.text
    return t.json()["id"], k.json()["key"]


@dataclass
class Api:
    client: TestClient
    settings: Settings

    def tenant(self, name: str) -> tuple[str, dict[str, str]]:
        """Create a tenant and a key through the admin API. Returns (tenant id, auth headers)."""
        tenant_id, key = new_tenant(self.client, name)
        return tenant_id, {"Authorization": f"Bearer {key}"}


def make_api(tmp_path: Path, database_url: str | None = None, **overrides: Any) -> Api:
    """An app on `database_url` (default: a fresh SQLite file in tmp_path) with the test admin key."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url or f"sqlite:///{tmp_path / 'api.db'}",
        admin_key=ADMIN,
        sse_poll_seconds=0.05,
        **overrides,
    )
    return Api(TestClient(create_app(settings)), settings)


def pairs_jsonl(pairs: list[tuple[str, str]]) -> bytes:
    """(prompt, completion) pairs as a JSONL upload body."""
    return "".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in pairs).encode()


def jsonl(n: int = 6, prefix: str = "q") -> bytes:
    return pairs_jsonl([(f"{prefix}{i}", f"a{i}") for i in range(n)])


def upload(api: Api, headers: dict[str, str], name: str = "train.jsonl", body: bytes | None = None) -> str:
    r = api.client.post("/v1/datasets", files={"file": (name, body or jsonl())}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job_config(*datasets: str, steps: int = 2, **extra: Any) -> dict[str, Any]:
    tasks = [{"name": f"task{i}", "train": ds} for i, ds in enumerate(datasets)]
    return {
        "model": {"name": "tiny-llama"},
        "tasks": tasks,
        "train": {"steps": steps, "batch_size": 2},
        **extra,
    }


# The "add one to i" task as chat rows: what the worker and scale-out tests train on.
ADD_ONE_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"add one to {i}"},
            {"role": "assistant", "content": str(i + 1)},
        ]
    }
    for i in range(16)
]


def training_config(train: str, steps: int, max_new_tokens: int = 2, **extra: Any) -> dict[str, Any]:
    """A one-task job config that really trains: task "a" on `train` (4 eval examples), tiny-llama on
    CPU, LoRA r 4, `steps` steps of batch 4 and max_len 64; `extra` adds train settings."""
    return {
        "model": {"name": "tiny-llama", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8},
        "tasks": [{"name": "a", "train": train, "max_eval": 4}],
        "train": {"steps": steps, "batch_size": 4, "max_len": 64, **extra},
        "eval": {"max_new_tokens": max_new_tokens, "heatmap": False},
    }


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """`rows` as a JSONL file at `path` (parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# different ranks and target sets, so rank padding and partly-targeted layers are exercised
SHAPES = [
    (2, ["q_proj", "v_proj"]),
    (4, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (8, ["v_proj", "down_proj"]),
]


def make_adapters(
    registry: Registry,
    names: list[str],
    seed: int = 0,
    std: float = 0.3,
    codebooks: dict[str, list[str]] | None = None,
) -> None:
    """Save random LoRA adapters (non-zero B, so each changes the output) for tiny-llama seed 0."""
    for i, name in enumerate(names):
        model, _, fp = build_tiny_llama(0)
        r, targets = SHAPES[i % len(SHAPES)]
        pm = get_peft_model(
            model, peft_lora_config(LoraConfig(r=r, alpha=2 * r, target_modules=targets)), adapter_name=name
        )
        g = torch.Generator().manual_seed(seed * 1000 + i)
        for m in pm.modules():
            if isinstance(m, LoraLayer):
                with torch.no_grad():
                    m.lora_A[name].weight.copy_(torch.randn(m.lora_A[name].weight.shape, generator=g) * std)
                    m.lora_B[name].weight.copy_(torch.randn(m.lora_B[name].weight.shape, generator=g) * std)
        registry.save(
            pm,
            name,
            {
                "name": name,
                "base_model": "tiny-llama",
                "base_fingerprint": fp,
                "method": "seq_lora",
                "codebook": (codebooks or {}).get(name, [f"task {name}"]),
            },
        )


def fake_adapter(settings: Settings, tenant_id: str, name: str = "adapter", version: int = 1) -> None:
    """A registry entry written by hand (no model needed): what the API reads and archives."""
    d = settings.adapters_dir(tenant_id) / name / f"v{version}"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (d / "adapter_model.safetensors").write_bytes(b"not read by these tests")
    rec = AdapterRecord(
        name=name, version=version, base_model="tiny-llama", base_fingerprint="fp", method="seq_lora"
    )
    (d / "record.json").write_text(rec.model_dump_json())


def free_port() -> int:
    """A loopback port that was free a moment ago (nobody listens on it now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll `cond` every `poll` seconds; an AssertionError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


# `-c`, not `-m service.worker`: a spawned job process re-imports a named __main__ module (sqlalchemy
# and all) before it starts; a `-c` main has nothing to re-import. `cltune worker` behaves like `-c`.
WORKER_MAIN = "import sys; from service.worker import main; sys.exit(main(sys.argv[1:]))"


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """A worker process's environment: `settings`' database, data dir, lease and heartbeat, one thread,
    this checkout importable; `extra` adds or overrides variables."""
    env = {
        **os.environ,
        "CLTUNE_DATABASE_URL": settings.db_url,
        "CLTUNE_DATA_DIR": str(settings.data_dir),
        "CLTUNE_LEASE_SECONDS": str(settings.lease_seconds),
        "CLTUNE_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def spawn_worker(settings: Settings, wid: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """A worker process `wid` (polling every 0.05 s) on worker_env(settings, **env); stderr is piped."""
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_MAIN, "--id", wid, "--poll", "0.05", *args],
        env=worker_env(settings, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
