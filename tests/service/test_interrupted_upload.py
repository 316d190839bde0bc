"""An upload cut off by the server's own death: `cltune serve` is killed (SIGKILL) while a large multipart
body is still arriving, then started again. The half-written staging file is gone after the restart and
no dataset row exists; an upload after the restart works."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.datasets import UNLOCKED_GRACE_SECONDS, clean_staging, hold_staged
from service.settings import Settings

from .api_support import free_port, jsonl

REPO = Path(__file__).resolve().parents[2]


def serve(tmp_path: Path, port: int, log_name: str) -> tuple[subprocess.Popen, str]:
    """`cltune serve --no-worker` on a loopback port; returns the process and its log once /healthz answers."""
    log = tmp_path / log_name
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--no-worker", "--port", str(port)]
            + ["--data-dir", str(tmp_path / "data")],
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return proc, log.read_text()
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"the server did not start: {log.read_text()[-3000:]}")


def staged_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "data" / "datasets").glob("*/.upload-ds_*.jsonl"))


def test_cleaning_keeps_a_locked_staging_file_and_removes_an_unlocked_one_past_the_grace(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    staging = settings.datasets_dir / "t_x"
    staging.mkdir(parents=True)
    live, dead, young = (staging / f".upload-ds_{i}.jsonl" for i in ("live", "dead", "young"))
    lock = hold_staged(live)  # an upload still streaming (in this or another process)
    try:
        dead.write_text("{}\n")  # its process died: nobody holds its lock
        young.write_text("{}\n")  # just created: its writer may not have locked it yet
        old = time.time() - 2 * UNLOCKED_GRACE_SECONDS
        for p in (live, dead):
            os.utime(p, (old, old))
        assert clean_staging(settings) == 1
        assert live.exists() and not dead.exists() and young.exists()
    finally:
        os.close(lock)
    os.utime(live, (old, old))
    assert clean_staging(settings) == 1 and not live.exists()  # the lock is gone with its descriptor


@pytest.mark.slow  # two fresh interpreters import torch, transformers and peft: 20-80 s on 2 cores
def test_a_server_killed_mid_upload_leaves_no_staging_file_and_no_dataset_after_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    proc, out = serve(tmp_path, port, "first.log")
    try:
        key = re.findall(r"only its hash is stored\): (clt_\S+)", out)[0]
        head = (
            b'--zz\r\nContent-Disposition: form-data; name="file"; filename="big data.jsonl"\r\n'
            b"Content-Type: application/x-ndjson\r\n\r\n"
        )
        sent = jsonl(20_000)  # ~1 MB of the 50 MB the request announces
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + f"Authorization: Bearer {key}\r\n".encode()
                + b"Content-Type: multipart/form-data; boundary=zz\r\n"
                + f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode()
                + head
                + sent
            )
            deadline = time.monotonic() + 60  # until the server has written part of it to disk
            while time.monotonic() < deadline and not any(
                p.stat().st_size > 0 for p in staged_files(tmp_path)
            ):
                time.sleep(0.05)
            staged = staged_files(tmp_path)
            assert len(staged) == 1 and staged[0].stat().st_size > 0, "the upload never reached the disk"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert staged[0].exists()  # what the crash left behind
        # (a staged file younger than the grace period may be one being created: leave it that long)
        time.sleep(max(0.0, staged[0].stat().st_mtime + UNLOCKED_GRACE_SECONDS + 0.5 - time.time()))

        proc, _ = serve(tmp_path, port, "second.log")
        assert staged_files(tmp_path) == []
        assert list((tmp_path / "data" / "datasets").rglob("*.jsonl")) == []
        h = {"Authorization": f"Bearer {key}"}
        url = f"http://127.0.0.1:{port}/v1/datasets"
        assert httpx.get(url, headers=h).json()["total"] == 0
        r = httpx.post(url, files={"file": ("big data.jsonl", jsonl(10))}, headers=h)
        assert r.status_code == 201 and r.json()["name"] == "big data.jsonl", r.text
        assert httpx.get(url, headers=h).json()["total"] == 1 and staged_files(tmp_path) == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
