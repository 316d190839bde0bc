"""Helpers for the API tests: an app on a fresh SQLite file, tenants with keys, tiny datasets."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from cltune.registry import AdapterRecord
from service.api.app import create_app
from service.settings import Settings

ADMIN = "admin-key-for-tests"


@dataclass
class Api:
    client: TestClient
    settings: Settings

    def tenant(self, name: str) -> tuple[str, dict[str, str]]:
        """Create a tenant and a key through the admin API. Returns (tenant id, auth headers)."""
        admin = {"Authorization": f"Bearer {ADMIN}"}
        t = self.client.post("/v1/admin/tenants", json={"name": name}, headers=admin)
        assert t.status_code == 201, t.text
        k = self.client.post(f"/v1/admin/tenants/{t.json()['id']}/keys", headers=admin)
        assert k.status_code == 201, k.text
        return t.json()["id"], {"Authorization": f"Bearer {k.json()['key']}"}


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


def jsonl(n: int = 6, prefix: str = "q") -> bytes:
    return "".join(
        json.dumps({"prompt": f"{prefix}{i}", "completion": f"a{i}"}) + "\n" for i in range(n)
    ).encode()


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
