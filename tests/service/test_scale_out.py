"""Several hosts: a job that began on one host resumes on another that shares only the database and the
S3 store (a moto server on loopback), never a data directory."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from cltune.artifact_sync import remote_versions
from cltune.artifacts import S3Store
from cltune.registry import Registry
from service import layout, runner, store
from service.artifacts import put_dataset, store_from_settings
from service.db import JobStatus
from service.settings import Settings

from .api_support import ADD_ONE_ROWS, spawn_worker, training_config, write_rows

T = "t_a"
DS = "ds_00000000000000d1"


def _s3(endpoint: str, tmp_path: Path) -> dict[str, Any]:
    cfg = {
        "artifact_store": "s3",
        "s3_endpoint_url": endpoint,
        "s3_bucket": "cltune-scale",
        "s3_prefix": f"t-{tmp_path.name}",
    }
    S3Store("cltune-scale", endpoint_url=endpoint).create_bucket()
    return cfg


def _upload(host: Settings) -> str:
    """A dataset uploaded through the API of `host`: a file in its data dir, copied to the store.
    Returns its id, which is what a job's config names."""
    write_rows(layout.dataset_path(host.data_dir, T, DS), ADD_ONE_ROWS)
    assert put_dataset(host, T, DS) == f"datasets/{T}/{DS}.jsonl"
    return DS


def test_a_stopped_job_resumes_on_a_host_that_shares_only_the_store(s3_endpoint: str, tmp_path: Path) -> None:
    s3 = _s3(s3_endpoint, tmp_path)
    host_a = Settings(data_dir=tmp_path / "a", **s3)
    host_b = Settings(data_dir=tmp_path / "b", **s3)
    job: dict[str, Any] = {
        "id": "job_1",
        "tenant_id": T,
        "spec": {},
        "config": training_config(_upload(host_a), 6, checkpoint_every=2),
        "attempts": 1,
        "artifacts": s3,
    }
    sent: list[tuple[str, dict[str, Any]]] = []

    def steps(attempt: int) -> list[int]:
        return [p["step"] for k, p in sent if k == "progress" and p["attempt"] == attempt]

    runner.execute(job, host_a.data_dir, lambda k, p: sent.append((k, p)), lambda: len(steps(1)) >= 3)
    assert sent[-1] == ("stopped", {"message": "stopped at step 3 of task 'a'", "step": 3})
    shutil.rmtree(host_a.data_dir)  # host A is gone: its data dir, its dataset, its checkpoint

    runner.execute({**job, "attempts": 2}, host_b.data_dir, lambda k, p: sent.append((k, p)), lambda: False)
    kind, result = sent[-1]
    assert kind == "result", result
    assert steps(2) == [4, 5, 6]  # from the checkpoint written when it stopped, not from step 1
    assert result["adapters"][0]["ref"] == "a@1"
    here = layout.dataset_path(host_b.data_dir, T, DS)
    assert here.exists()  # fetched from the store by its id
    progress = json.loads((layout.run_dir(host_b.data_dir, "job_1") / "progress.json").read_text())
    assert progress["config"]["tasks"][0]["train"] == str(here)  # host A's path is not kept
    assert job["config"]["tasks"][0]["train"] == DS  # the job's own config is unchanged
    shared = store_from_settings(host_b)
    assert shared is not None and remote_versions(shared, f"adapters/{T}") == {"a": [1]}
    assert Registry(host_b.data_dir / "adapters" / T).get("a@1").created_by == "job_1"


# ---------------------------------------------------------------- two worker processes (slow)


def _spawn(settings: Settings, data_dir: Path, s3: dict[str, Any], wid: str, *args: str) -> Any:
    """A worker on the shared database (`settings`) with its own, unshared data dir and the S3 store."""
    return spawn_worker(
        settings,
        wid,
        *args,
        CLTUNE_DATA_DIR=str(data_dir),  # not shared
        CLTUNE_LEASE_SECONDS="3",
        CLTUNE_HEARTBEAT_SECONDS="0.5",
        CLTUNE_ARTIFACT_STORE="s3",
        CLTUNE_S3_ENDPOINT_URL=s3["s3_endpoint_url"],
        CLTUNE_S3_BUCKET=s3["s3_bucket"],
        CLTUNE_S3_PREFIX=s3["s3_prefix"],
    )


def _step(engine: Engine, job: store.Job) -> int:
    p = store.get_job(engine, T, job.id).progress
    return int(p["step"]) if p else 0


@pytest.mark.slow
def test_a_job_whose_worker_host_dies_resumes_on_a_worker_with_another_data_dir(
    s3_endpoint: str, settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    s3 = _s3(s3_endpoint, tmp_path)
    dir_a, dir_b = tmp_path / "host_a", tmp_path / "host_b"
    train = _upload(Settings(data_dir=dir_a, **s3))
    config = training_config(train, 30, checkpoint_every=1)
    job = store.enqueue(engine, T, {"config": config}, config)
    first = _spawn(settings, dir_a, s3, "host-a")
    end = time.monotonic() + 120
    while _step(engine, job) < 4:
        assert time.monotonic() < end and first.poll() is None, "attempt 1 did not reach step 4"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the worker and (through its watchdog) its job process die
    first.wait(10)
    time.sleep(0.5)  # the orphaned job process notices its parent is gone within 0.2 s
    killed_at = _step(engine, job)
    shutil.rmtree(dir_a)  # nothing of host A survives but what it put in the store
    while store.get_job(engine, T, job.id).status is not JobStatus.QUEUED:  # the dead worker's lease ends
        assert time.monotonic() < end + 60, "the lease of the killed worker never expired"
        store.requeue_expired(engine)
        time.sleep(0.2)
    second = _spawn(settings, dir_b, s3, "host-b", "--burst")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err.decode()[-2000:]
    done = store.get_job(engine, T, job.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 2, (done.error, done.traceback)
    events = store.list_events(engine, T, job.id)
    resumed = [e.data["step"] for e in events if e.type == "progress" and e.data["attempt"] == 2]
    print(f"killed at step {killed_at}; host B's first step {resumed[0]}")
    assert resumed[0] > 1 and resumed[0] >= killed_at - 1, (killed_at, resumed[:3])  # at most 1 step redone
    assert resumed[-1] == 30
    assert done.result is not None and done.result["adapters"][0]["ref"] == "a@1"
    assert Registry(dir_b / "adapters" / T).versions_of("a") == [1]
    shared = store_from_settings(Settings(data_dir=dir_b, **s3))
    assert shared is not None and remote_versions(shared, f"adapters/{T}") == {"a": [1]}


@pytest.mark.slow
def test_a_data_parallel_job_stops_on_one_host_and_resumes_on_another(
    s3_endpoint: str, tmp_path: Path
) -> None:
    # 2 ranks on gloo (CPU) per attempt: the worker's --devices-per-job 2 path without GPUs
    s3 = _s3(s3_endpoint, tmp_path)
    host_a = Settings(data_dir=tmp_path / "a", **s3)
    job = {
        "id": "job_dp",
        "tenant_id": T,
        "spec": {},
        "config": training_config(_upload(host_a), 6, checkpoint_every=2),
        "attempts": 1,
        "artifacts": s3,
        "devices": 2,
    }
    sent: list[tuple[str, dict[str, Any]]] = []

    def steps(attempt: int) -> list[int]:
        return [p["step"] for k, p in sent if k == "progress" and p["attempt"] == attempt]

    runner.execute(job, host_a.data_dir, lambda k, p: sent.append((k, p)), lambda: len(steps(1)) >= 3)
    assert sent[-1][0] == "stopped", sent[-1]
    stopped_at = sent[-1][1]["step"]
    shutil.rmtree(host_a.data_dir)
    runner.execute({**job, "attempts": 2}, tmp_path / "b", lambda k, p: sent.append((k, p)), lambda: False)
    kind, result = sent[-1]
    assert kind == "result", result
    assert steps(2)[0] == stopped_at + 1 and steps(2)[-1] == 6, (stopped_at, steps(2))
    assert result["adapters"][0]["ref"] == "a@1" and result["train"][0]["steps"] == 6
