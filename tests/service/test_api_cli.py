"""The service's console commands: first-start key, admin commands, and `cltune serve` as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service import auth
from service.cli import first_start_key, main
from service.db import init_db, make_engine

from .api_support import free_port

REPO = Path(__file__).resolve().parents[2]


def test_the_first_start_creates_one_default_key_and_later_starts_none(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    init_db(engine)
    key = first_start_key(engine)
    assert key is not None and auth.authenticate(engine, key) == auth.find_tenant(engine, "default").id
    assert first_start_key(engine) is None
    assert len(auth.list_keys(engine, auth.find_tenant(engine, "default").id)) == 1


def test_admin_commands_create_a_tenant_and_a_working_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ["--data-dir", str(tmp_path)]
    assert main(["tenants", "create", "acme", *flags]) == 0
    tenant = json.loads(capsys.readouterr().out)
    assert main(["keys", "create", "acme", *flags]) == 0
    key = json.loads(capsys.readouterr().out)
    engine = make_engine(f"sqlite:///{tmp_path / 'cltune.db'}")
    assert auth.authenticate(engine, key["key"]) == tenant["id"]
    assert main(["keys", "revoke", key["id"], *flags]) == 0
    assert auth.authenticate(engine, key["key"]) is None
    assert main(["tenants", "create", "acme", *flags]) == 2  # exists: a clean error, no traceback
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and peft: 10-40 s on 2 cores
def test_serve_prints_the_url_and_a_key_that_works(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--no-worker",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline, key = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            out = (tmp_path / "serve.log").read_text()
            key = key or next(iter(re.findall(r"only its hash is stored\): (clt_\S+)", out)), None)
            try:
                if key and httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert key, (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}" in out
        r = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["total"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()
