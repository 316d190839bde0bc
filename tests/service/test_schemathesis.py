"""Schemathesis against the API served by uvicorn on a loopback port: every operation of the OpenAPI schema,
in its examples, coverage, fuzzing and stateful phases, with a fixed seed and a bounded number of
examples per operation; the inference endpoints generate with the tiny model. The server holds a tenant
with real datasets, a succeeded job and real adapters first, so generated ids (taken from responses) and
links reach past 404s. It must answer no 5xx, and every response must match the schema: its status code,
content type and body."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cltune.registry import Registry
from service import store

from .api_support import ADMIN, job_config, jsonl, make_adapters, make_api, serving, upload

SEED = 15
MAX_EXAMPLES = 30  # per operation and phase: ~2000 cases, 30-60 s on 2 cores
CHECKS = ",".join(
    (
        "not_a_server_error",  # no 5xx
        "status_code_conformance",  # every status code is documented for its operation
        "content_type_conformance",
        "response_schema_conformance",  # every body matches its documented schema
        "unsupported_method",  # other methods answer 405 ...
        "allow_header_conformance",  # ... naming in Allow exactly the documented methods
    )
)


@dataclass
class Target:
    url: str
    key: str  # the fuzzed tenant's API key
    jobs: list[str]  # succeeded, queued, cancelled
    spare_key_id: str  # the one key the fuzzer may revoke


@contextmanager
def serve_for_fuzzing(tmp: Path) -> Iterator[Target]:
    """The app on a loopback port, with one tenant's datasets, jobs (succeeded, queued, cancelled) and
    two adapters."""
    api = make_api(
        tmp,
        engine_model="tiny-llama",
        engine_device="cpu",
        engine_max_tokens=16,  # generation stays cheap whatever max_tokens the fuzzer sends
        engine_max_wait_ms=0,
        max_upload_bytes=64 * 1024,
        worker_cuda=False,
    )
    tenant, h = api.tenant("fuzz")
    ds = [upload(api, h, name, jsonl(4, prefix=name)) for name in ("train.jsonl", "my data.jsonl")]
    job = api.client.post("/v1/jobs", json={"config": job_config(*ds)}, headers=h).json()["id"]
    engine = api.client.app.state.db  # type: ignore[attr-defined]
    assert store.claim(engine, "w1", 30).id == job  # type: ignore[union-attr]
    result = {"tasks": ["task0", "task1"], "R": [[0, 0], [0.9, 0], [0.8, 0.7]], "metrics": {"ap": 0.75}}
    store.finish(engine, job, "w1", result)
    queued, cancelled = (
        api.client.post("/v1/jobs", json={"config": job_config(d)}, headers=h).json()["id"] for d in ds
    )
    api.client.post(f"/v1/jobs/{cancelled}/cancel", headers=h)
    spare = api.client.post(f"/v1/admin/tenants/{tenant}/keys", headers={"Authorization": f"Bearer {ADMIN}"})
    make_adapters(Registry(api.settings.adapters_dir(tenant)), ["capitals", "french"])
    with serving(api.client.app) as url:
        yield Target(
            url, h["Authorization"].removeprefix("Bearer "), [job, queued, cancelled], spare.json()["id"]
        )


def run_schemathesis(t: Target, out: Path, max_examples: int = MAX_EXAMPLES, seed: int = SEED) -> dict:
    """`st run` on the live schema; returns its JSON report with the exit code and output added."""
    config = out / "schemathesis.toml"
    config.write_text(
        f"""
seed = {seed}
workers = 1
continue-on-failure = true
request-timeout = 60
suppress-health-check = ["too_slow", "filter_too_much", "data_too_large"]
[headers]
Authorization = "Bearer {t.key}"
[generation]
max-examples = {max_examples}
deterministic = false
[phases.stateful]
max-steps = 20
[dictionaries.jobs]
values = {json.dumps(t.jobs)}
[dictionaries.models]
values = ["base", "auto", "capitals", "french@1"]
[parameters]
job_id = {{ dictionary = "jobs", probability = 0.5 }}
"body.model" = {{ dictionary = "models", probability = 0.7 }}
[[operations]]
include-tag = "admin"
headers = {{ Authorization = "Bearer {ADMIN}" }}
[[operations]]  # the fuzzer revokes only this key, never the one it sends
include-operation-id-regex = "revoke"
parameters = {{ key_id = "{t.spare_key_id}" }}
[[operations]]  # a queued job's stream stays open: read what comes within 2 s
include-path = "/v1/jobs/{{job_id}}/events/stream"
request-timeout = 2
max-stream-events = 3
[[operations]]
include-path = "/v1/jobs/summary"
parameters = {{ ids = {json.dumps(t.jobs[:1])} }}
"""
    )
    report = out / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{t.url}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--no-color",
    ]
    proc = subprocess.run(
        cmd, cwd=out, capture_output=True, text=True, timeout=900, env={**os.environ, "NO_COLOR": "1"}
    )
    (out / "st.log").write_text(proc.stdout + proc.stderr)
    assert report.exists(), proc.stdout[-5000:] + proc.stderr[-5000:]
    data = json.loads(report.read_text())
    data["_returncode"], data["_output"] = proc.returncode, proc.stdout
    return data


@pytest.mark.slow  # 30-60 s on 2 cores
def test_schemathesis_finds_no_server_errors_and_no_schema_violations(tmp_path: Path) -> None:
    with serve_for_fuzzing(tmp_path) as target:
        report = run_schemathesis(target, tmp_path)
        assert report["_returncode"] == 0 and not report["failures"], report["_output"][-20000:]
        assert not report["errors"], report["errors"]
        ops = report["operations"]
        assert ops["tested"] == ops["selected"] == ops["total"] >= 28 and not ops["errored"]
        assert {name: p["status"] for name, p in report["phases"].items()} == dict.fromkeys(
            ("examples", "coverage", "fuzzing", "stateful"), "success"
        )
        assert report["test_cases"]["generated"] >= 1000
        # the run kept its key (it revokes only the spare one) and so reached past 401 throughout
        h = {"Authorization": f"Bearer {target.key}"}
        assert httpx.get(f"{target.url}/v1/datasets", headers=h).status_code == 200


# a longer run by hand: python -m tests.service.test_schemathesis DIR [EXAMPLES [SEED]]
if __name__ == "__main__":
    where = Path(sys.argv[1])
    where.mkdir(parents=True, exist_ok=True)
    n, seed = ([*map(int, sys.argv[2:4])] + [MAX_EXAMPLES, SEED][len(sys.argv[2:4]) :])[:2]
    with serve_for_fuzzing(where) as target:
        print(run_schemathesis(target, where, n, seed)["_output"][-30000:])
