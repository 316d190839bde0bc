"""End to end through the API: upload two datasets, queue a 2-task job on the tiny model, run it with
a burst worker, follow it over SSE, download both adapters and load them with PeftModel."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import pytest

from service.worker import Worker

from .api_support import make_api, pairs_jsonl
from .test_api_flows import sse_events


@pytest.mark.slow  # the job runs in a spawned child that imports torch and transformers: ~20-60 s on 2 cores
def test_two_task_job_from_upload_to_peft_adapters(tmp_path: Path) -> None:
    api = make_api(tmp_path)
    _, h = api.tenant("acme")
    c = api.client
    ids = []
    for name, pairs in (
        ("add", [(f"add one to {i}", str(i + 1)) for i in range(8)]),
        ("rev", [(f"reverse {w}", w[::-1]) for w in ["abc", "dog", "cat", "sun", "map", "pen"]]),
    ):
        r = c.post("/v1/datasets", files={"file": (f"{name}.jsonl", pairs_jsonl(pairs))}, headers=h)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    config = {
        "name": "e2e",
        "model": {"name": "tiny-llama"},
        "lora": {"r": 4, "alpha": 8},
        "tasks": [
            {"name": "add", "train": ids[0], "max_eval": 2, "max_new_tokens": 3},
            {"name": "rev", "train": ids[1], "max_eval": 2, "max_new_tokens": 3},
        ],
        "train": {"steps": 3, "batch_size": 2, "max_len": 48},
        "eval": {"heatmap": False},
    }
    job = c.post("/v1/jobs", json={"config": config}, headers=h)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]

    worker = Worker(api.settings, "e2e-worker", poll_seconds=0.1)
    t = threading.Thread(target=worker.run, kwargs={"burst": True})
    t.start()
    with c.stream("GET", f"/v1/jobs/{job_id}/events/stream", headers=h) as r:
        events = sse_events(r.read().decode())
    t.join(timeout=300)
    kinds = [e for e, _ in events]
    assert kinds[0] == "queued" and kinds[-2:] == ["succeeded", "end"], kinds
    steps = [d["data"]["step"] for e, d in events if e == "progress"]
    assert steps and max(steps) == 3
    final = c.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert final["status"] == "succeeded" and len(final["result"]["R"]) == 3  # base row + one per task

    from peft import PeftModel

    from cltune.models import build_tiny_llama

    listed = {a["name"]: a for a in c.get("/v1/adapters", headers=h).json()["items"]}
    assert set(listed) == {"add", "rev"} and listed["rev"]["parent"] == "add@1"
    for name in ("add", "rev"):
        archive = c.get(f"/v1/adapters/{name}/download", headers=h)
        assert archive.status_code == 200
        out = tmp_path / "download" / name
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            tar.extractall(out, filter="data")
        base, _, _ = build_tiny_llama(0)
        model = PeftModel.from_pretrained(base, str(out / f"{name}-v1"))
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and any(
            p.abs().sum() > 0 for p in lora_b
        )  # B starts at zero: these are trained weights
