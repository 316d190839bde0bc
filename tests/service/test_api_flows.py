"""Datasets, jobs, events (JSON + SSE), adapters, health and metrics through the HTTP API."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from service import store
from service.auth import hash_key
from service.db import ApiKeyRow, make_engine, session
from service.job_run import local_config

from .api_support import Api, fake_adapter, job_config, jsonl, make_api, upload


@pytest.fixture
def api(tmp_path: Path) -> tuple[Api, dict[str, str], str]:
    api = make_api(tmp_path)
    tenant_id, h = api.tenant("acme")
    return api, h, tenant_id


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_upload_records_format_count_and_sha256_and_delete_removes_the_file(api) -> None:
    api, h, _ = api
    body = jsonl(7)
    r = api.client.post(
        "/v1/datasets?name=raw-set", content=body, headers={**h, "content-type": "application/x-ndjson"}
    )
    assert r.status_code == 201
    ds = r.json()
    assert (ds["name"], ds["format"], ds["examples"], ds["size_bytes"]) == (
        "raw-set",
        "prompt_completion",
        7,
        len(body),
    )
    assert ds["sha256"] == hashlib.sha256(body).hexdigest()
    named = api.client.post(
        "/v1/datasets", files={"file": ("f.jsonl", body)}, data={"name": "given"}, headers=h
    )
    assert named.json()["name"] == "given"
    listed = api.client.get("/v1/datasets?limit=1", headers=h).json()
    assert listed["total"] == 2 and len(listed["items"]) == 1
    files = list(api.settings.datasets_dir.rglob("*.jsonl"))
    assert len(files) == 2
    assert api.client.delete(f"/v1/datasets/{ds['id']}", headers=h).status_code == 204
    assert api.client.get(f"/v1/datasets/{ds['id']}", headers=h).status_code == 404
    assert len(list(api.settings.datasets_dir.rglob("*.jsonl"))) == 1


def test_a_multi_megabyte_upload_arrives_intact_in_chunks(api) -> None:
    api, h, _ = api
    body = jsonl(25_000)  # ~1 MB, sent in 64 KiB chunks without a Content-Length
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    r = api.client.post(
        "/v1/datasets?name=big", content=chunks, headers={**h, "content-type": "application/jsonl"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest() and r.json()["examples"] == 25_000


def test_jobs_store_the_request_and_the_validated_config_with_dataset_ids(api) -> None:
    api, h, tenant_id = api
    ds = upload(api, h)
    r = api.client.post(
        "/v1/jobs", json={"config": job_config(ds), "priority": 5, "max_attempts": 2}, headers=h
    )
    assert r.status_code == 201
    job = r.json()
    assert (job["status"], job["priority"], job["max_attempts"]) == ("queued", 5, 2)
    assert job["spec"]["config"]["tasks"][0]["train"] == ds  # as sent
    assert str(api.settings.data_dir) not in json.dumps(job)  # no host path in the response
    stored = store.load_job(api.client.app.state.db, job["id"])
    assert stored.config["tasks"][0]["train"] == ds  # the id: each runner resolves it on its own host
    assert stored.config["lora"]["r"] == 8  # defaults filled in
    runner_job = {"id": job["id"], "tenant_id": tenant_id, "spec": stored.spec, "config": stored.config}
    path = Path(local_config(runner_job, api.settings.data_dir)["tasks"][0]["train"])
    assert path.is_absolute() and path.read_bytes() == jsonl()  # the tenant's file on this host


def test_list_jobs_filters_by_status_and_paginates(api) -> None:
    api, h, _ = api
    ds = upload(api, h)
    ids = [
        api.client.post("/v1/jobs", json={"config": job_config(ds)}, headers=h).json()["id"] for _ in range(5)
    ]
    for j in ids[:2]:
        api.client.post(f"/v1/jobs/{j}/cancel", headers=h)
    page = api.client.get("/v1/jobs?status=queued&limit=2&offset=2", headers=h).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == [ids[2]]  # newest first
    cancelled = api.client.get("/v1/jobs?status=cancelled", headers=h).json()
    assert sorted(j["id"] for j in cancelled["items"]) == sorted(ids[:2])


def test_cancel_then_retry_requeues_and_events_record_each_transition(api) -> None:
    api, h, _ = api
    job = api.client.post("/v1/jobs", json={"config": job_config(upload(api, h))}, headers=h).json()["id"]
    assert api.client.post(f"/v1/jobs/{job}/cancel", headers=h).json()["status"] == "cancelled"
    assert api.client.post(f"/v1/jobs/{job}/retry", headers=h).json()["status"] == "queued"
    events = api.client.get(f"/v1/jobs/{job}/events", headers=h).json()
    assert [e["type"] for e in events["items"]] == ["queued", "cancelled", "queued"]
    later = api.client.get(f"/v1/jobs/{job}/events?after_id={events['items'][0]['id']}", headers=h).json()
    assert [e["type"] for e in later["items"]] == ["cancelled", "queued"]
    assert later["next_after_id"] == events["next_after_id"]


def test_sse_follows_a_job_until_it_ends_and_resumes_from_last_event_id(api) -> None:
    api, h, _ = api
    engine = api.client.app.state.db
    job = api.client.post("/v1/jobs", json={"config": job_config(upload(api, h))}, headers=h).json()["id"]

    def work() -> None:  # what a worker does, slowly enough that the stream must wait for it
        time.sleep(0.3)
        store.claim(engine, "w1", 30)
        for step in (1, 2):
            time.sleep(0.1)
            store.report_progress(engine, job, "w1", {"step": step, "total_steps": 2})
        store.finish(engine, job, "w1", {"ok": True})

    t = threading.Thread(target=work)
    t.start()
    with api.client.stream("GET", f"/v1/jobs/{job}/events/stream", headers=h) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    t.join()
    events = sse_events(text)
    assert [e for e, _ in events] == ["queued", "running", "progress", "progress", "succeeded", "end"]
    assert events[-1][1]["status"] == "succeeded"
    first_id = events[0][1]["id"]
    with api.client.stream(
        "GET", f"/v1/jobs/{job}/events/stream", headers={**h, "Last-Event-ID": str(first_id)}
    ) as r:
        again = sse_events(r.read().decode())
    assert [e for e, _ in again] == ["running", "progress", "progress", "succeeded", "end"]


def test_adapters_list_versions_download_and_delete(api) -> None:
    api, h, tenant_id = api
    fake_adapter(api.settings, tenant_id, "qa", 1)
    fake_adapter(api.settings, tenant_id, "qa", 2)
    c = api.client
    assert [a["ref"] for a in c.get("/v1/adapters", headers=h).json()["items"]] == ["qa@2"]
    assert [a["version"] for a in c.get("/v1/adapters/qa/versions", headers=h).json()["items"]] == [1, 2]
    assert c.get("/v1/adapters/qa/versions/1", headers=h).json()["ref"] == "qa@1"
    tgz = c.get("/v1/adapters/qa/download?version=1", headers=h)
    assert tgz.status_code == 200 and "qa-v1.tar.gz" in tgz.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(tgz.content)) as tar:
        assert sorted(tar.getnames()) == [
            "qa-v1/adapter_config.json",
            "qa-v1/adapter_model.safetensors",
            "qa-v1/record.json",
        ]
    z = c.get("/v1/adapters/qa/download?format=zip", headers=h)
    assert "qa-v2/adapter_config.json" in zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert c.delete("/v1/adapters/qa?version=2", headers=h).status_code == 204
    assert c.get("/v1/adapters/qa", headers=h).json()["version"] == 1
    assert c.delete("/v1/adapters/qa", headers=h).status_code == 204
    assert c.get("/v1/adapters/qa", headers=h).status_code == 404


def test_metrics_count_jobs_by_state_and_time_requests_by_route(api) -> None:
    api, h, _ = api
    ds = upload(api, h)
    for _ in range(3):
        job = api.client.post("/v1/jobs", json={"config": job_config(ds)}, headers=h).json()["id"]
        api.client.get(f"/v1/jobs/{job}", headers=h)
    api.client.post(f"/v1/jobs/{job}/cancel", headers=h)
    text = api.client.get("/metrics").text
    assert 'cltune_jobs{status="queued"} 2.0' in text and 'cltune_jobs{status="cancelled"} 1.0' in text
    assert "cltune_queue_depth 2.0" in text
    assert 'cltune_job_duration_seconds_count{status="succeeded"} 0.0' in text
    assert (
        'cltune_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}",status="200"} 3.0'
        in text
    )


def test_healthz_reports_the_database(api) -> None:
    api, _, _ = api
    assert api.client.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_api_keys_are_stored_only_as_hashes(api, tmp_path: Path) -> None:
    api, h, _ = api
    key = h["Authorization"].removeprefix("Bearer ")
    engine = make_engine(api.settings.db_url)
    with session(engine) as s:
        rows = s.scalars(select(ApiKeyRow)).all()
    assert [r.key_hash for r in rows] == [hash_key(key)] and rows[0].prefix == key[:8]
    assert key.encode() not in (tmp_path / "api.db").read_bytes()


def test_auth_disabled_acts_as_the_local_tenant(tmp_path: Path) -> None:
    api = make_api(tmp_path, auth_disabled=True)
    ds = upload(api, {})
    assert api.client.get(f"/v1/datasets/{ds}").status_code == 200
    assert (api.settings.datasets_dir / "t_local").is_dir()


def _succeed(api: Api, h: dict[str, str], result: dict) -> str:
    """A job as a worker finishes it, with `result` as its results."""
    engine = api.client.app.state.db
    job = api.client.post("/v1/jobs", json={"config": job_config(upload(api, h))}, headers=h).json()["id"]
    assert store.claim(engine, "w1", 30).id == job
    store.finish(engine, job, "w1", result)
    return job


def _result(ap: float, bwt: float) -> dict:
    return {"tasks": ["a", "b"], "R": [[0, 0], [0.9, 0], [0.9 + bwt, ap]], "metrics": {"ap": ap, "bwt": bwt}}


def test_summary_of_repeated_jobs_gives_intervals_and_claims_only_when_they_separate(api) -> None:
    api, h, _ = api
    cl = [_succeed(api, h, _result(ap, bwt)) for ap, bwt in ((0.80, -0.01), (0.82, 0.0), (0.81, -0.02))]
    seq = [_succeed(api, h, _result(ap, bwt)) for ap, bwt in ((0.50, -0.40), (0.52, -0.42), (0.51, -0.38))]
    r = api.client.get("/v1/jobs/summary", params={"ids": cl, "baseline": seq}, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 3 and body["metrics"]["ap"]["mean"] == pytest.approx(0.81)
    assert body["metrics"]["ap"]["lo"] < 0.81 < body["metrics"]["ap"]["hi"]
    assert body["versus_baseline"] == {"ap": "better", "bwt": "better"}
    mixed = api.client.get("/v1/jobs/summary", params={"ids": cl[:2], "baseline": [cl[2], seq[0]]}, headers=h)
    assert mixed.json()["versus_baseline"]["ap"] == "no measurable difference"


def test_summary_refuses_unfinished_and_unknown_jobs(api) -> None:
    api, h, _ = api
    queued = api.client.post("/v1/jobs", json={"config": job_config(upload(api, h))}, headers=h).json()["id"]
    r = api.client.get("/v1/jobs/summary", params={"ids": [queued]}, headers=h)
    assert r.status_code == 409 and "queued" in r.json()["error"]["message"]
    assert api.client.get("/v1/jobs/summary", params={"ids": ["job_nope"]}, headers=h).status_code == 404
    assert api.client.get("/v1/jobs/summary", headers=h).status_code == 422
