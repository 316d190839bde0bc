"""The worker and the job runner on SQLite and PostgreSQL: child processes, crashes, cancel, concurrency.

Most tests use the runner's "noop" job (no model: milliseconds per step) so they exercise the worker's
own mechanics; the crash-and-resume test trains the tiny Llama for real (slow).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from service import layout, store
from service.db import JobStatus
from service.settings import Settings
from service.worker import CANCEL_POLL_SECONDS, Worker

from .api_support import ADD_ONE_ROWS, spawn_worker, training_config, wait_until, write_rows

T = "t_a"


def _noop(engine: Engine, priority: int = 0, max_attempts: int = 3, **spec: Any) -> store.Job:
    return store.enqueue(
        engine, T, {"kind": "noop", **spec}, {}, priority=priority, max_attempts=max_attempts
    )


def _worker(settings: Settings, wid: str = "w1") -> Worker:
    return Worker(settings, worker_id=wid, poll_seconds=0.05)


def _events(engine: Engine, job: store.Job) -> list[store.Event]:
    return store.list_events(engine, T, job.id)


def _executions(settings: Settings, job: store.Job) -> list[str]:
    log = layout.run_dir(settings.data_dir, job.id) / "noop.log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_job_runs_in_a_child_process_and_its_progress_becomes_events(
    settings: Settings, engine: Engine
) -> None:
    job = _noop(engine, steps=3)
    assert _worker(settings).run(burst=True) == 1
    done = store.get_job(engine, T, job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.result is not None and done.result["pid"] != os.getpid()  # ran in a child
    assert [e.data["step"] for e in _events(engine, job) if e.type == "progress"] == [1, 2, 3]
    assert done.progress == {"task": "noop", "step": 3, "total_steps": 3, "attempt": 1}
    assert len(_executions(settings, job)) == 1


def test_an_exception_is_retried_then_failed_with_its_traceback(settings: Settings, engine: Engine) -> None:
    job = _noop(engine, max_attempts=2, fail="boom in training")
    assert _worker(settings).run(burst=True) == 2
    failed = store.get_job(engine, T, job.id)
    assert failed.status is JobStatus.FAILED and failed.attempts == 2
    assert failed.error == "RuntimeError: boom in training"
    assert "Traceback" in (failed.traceback or "") and "run_noop" in (failed.traceback or "")
    assert [e.type for e in _events(engine, job)].count("running") == 2


@pytest.mark.parametrize("crash, reason", [("exit", "exit code 70"), ("segfault", "signal SIGSEGV")])
def test_a_crashing_child_fails_the_job_and_the_worker_goes_on(
    settings: Settings, engine: Engine, crash: str, reason: str
) -> None:
    bad = _noop(engine, priority=1, max_attempts=1, steps=2, crash=crash)
    good = _noop(engine, priority=0)
    assert _worker(settings).run(burst=True) == 2  # the worker survived the crash and ran the next job
    failed = store.get_job(engine, T, bad.id)
    assert failed.status is JobStatus.FAILED and reason in (failed.error or "")
    if crash == "segfault":  # faulthandler's stacks stand in for the traceback
        assert "Segmentation fault" in (failed.traceback or "") and "run_noop" in (failed.traceback or "")
    assert store.get_job(engine, T, good.id).status is JobStatus.SUCCEEDED


def _start(worker: Worker, **kw: Any) -> threading.Thread:
    t = threading.Thread(target=worker.run, kwargs=kw, daemon=True)
    t.start()
    return t


def _running_step(engine: Engine, job: store.Job) -> int:
    p = store.get_job(engine, T, job.id).progress
    return int(p["step"]) if p else 0


def test_cancel_stops_a_running_job_within_one_step_and_a_queued_one_at_once(
    settings: Settings, engine: Engine
) -> None:
    step_s = 0.3
    running = _noop(engine, priority=1, steps=1000, step_seconds=step_s)
    queued = _noop(engine, priority=0)
    t = _start(_worker(settings), max_jobs=1)
    wait_until(lambda: _running_step(engine, running) >= 1, 30, "the first step")
    assert store.request_cancel(engine, T, queued.id).status is JobStatus.CANCELLED
    t0 = time.monotonic()
    store.request_cancel(engine, T, running.id)
    wait_until(lambda: store.get_job(engine, T, running.id).status is JobStatus.CANCELLED, 10, "the cancel")
    elapsed = time.monotonic() - t0
    t.join(10)
    # seen within one cancel poll, honoured before the next step; 0.5 s slack for a busy 2-core machine
    assert elapsed < CANCEL_POLL_SECONDS + step_s + 0.5, elapsed
    assert "stopped at step" in _events(engine, running)[-1].message
    assert _executions(settings, queued) == []  # never ran


def test_a_job_that_ignores_the_stop_is_killed_after_the_grace_period(
    settings: Settings, engine: Engine
) -> None:
    settings = settings.model_copy(update={"cancel_grace_seconds": 1.0})
    job = _noop(engine, steps=1000, step_seconds=0.05, ignore_stop=True)
    t = _start(_worker(settings), max_jobs=1)
    wait_until(lambda: _running_step(engine, job) >= 1, 30, "the first step")
    t0 = time.monotonic()
    store.request_cancel(engine, T, job.id)
    wait_until(lambda: store.get_job(engine, T, job.id).status is JobStatus.CANCELLED, 10, "the kill")
    elapsed = time.monotonic() - t0
    t.join(10)
    assert 1.0 <= elapsed < 1.0 + CANCEL_POLL_SECONDS + 1.0, elapsed
    assert "killed after the grace period" in _events(engine, job)[-1].message


def test_a_worker_told_to_stop_hands_its_job_back_without_spending_an_attempt(
    settings: Settings, engine: Engine
) -> None:
    job = _noop(engine, steps=1000, step_seconds=0.05)
    worker = _worker(settings)
    t = _start(worker)
    wait_until(lambda: _running_step(engine, job) >= 1, 30, "the first step")
    worker.stop()
    t.join(10)
    back = store.get_job(engine, T, job.id)
    assert back.status is JobStatus.QUEUED and back.attempts == 0 and back.lease_owner is None


def _drain_with_four_workers(settings: Settings, engine: Engine, n_jobs: int, *args: str) -> None:
    jobs = [_noop(engine) for _ in range(n_jobs)]
    procs = [spawn_worker(settings, f"w{i}", "--burst", *args) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    assert store.count_by_status(engine)["succeeded"] == n_jobs
    runs_by_worker: dict[str, int] = {}
    for job in jobs:
        assert len(_executions(settings, job)) == 1, job.id  # the child ran once: none lost, none twice
        claims = [e for e in _events(engine, job) if e.type == "running"]
        assert len(claims) == 1, job.id
        runs_by_worker[claims[0].data["worker"]] = runs_by_worker.get(claims[0].data["worker"], 0) + 1
    assert sum(runs_by_worker.values()) == n_jobs and len(runs_by_worker) >= 2  # the queue really was shared


def test_four_worker_processes_run_each_of_200_jobs_exactly_once(settings: Settings, engine: Engine) -> None:
    # jobs run in a thread of their worker: the claims race across 4 processes exactly as with child
    # processes, and 200 process starts (~0.1 s of CPU each) stay out of the default suite
    _drain_with_four_workers(settings, engine, 200, "--in-process")


@pytest.mark.slow
def test_four_worker_processes_with_a_child_per_job_run_each_of_200_jobs_exactly_once(
    settings: Settings, engine: Engine
) -> None:
    _drain_with_four_workers(settings, engine, 200)


def _training_job(settings: Settings, engine: Engine, steps: int, **train: Any) -> store.Job:
    data = write_rows(settings.data_dir / "a.jsonl", ADD_ONE_ROWS)
    config = training_config(str(data), steps, max_new_tokens=4, **train)
    return store.enqueue(engine, T, {"config": config}, config)


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_resumes_from_its_checkpoint_on_another_worker(
    settings: Settings, engine: Engine
) -> None:
    settings = settings.model_copy(update={"lease_seconds": 3.0})
    job = _training_job(settings, engine, 40, checkpoint_every=1)
    first = spawn_worker(settings, "doomed")
    wait_until(lambda: _running_step(engine, job) >= 3, 120, "step 3 of attempt 1")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    killed_at = _running_step(engine, job)
    # a --burst worker leaves on an empty queue: start it once the dead worker's lease has run out
    wait_until(
        lambda: (
            job.id in store.requeue_expired(engine)
            or store.get_job(engine, T, job.id).status is JobStatus.QUEUED
        ),
        30,
        "the lease to expire",
    )
    second = spawn_worker(settings, "rescuer", "--burst")
    _, err = second.communicate(timeout=240)
    assert second.returncode == 0, err.decode()[-2000:]
    done = store.get_job(engine, T, job.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 2, done.error
    events = _events(engine, job)
    assert any("lease of worker doomed expired" in e.message for e in events)
    second_steps = [e.data["step"] for e in events if e.type == "progress" and e.data["attempt"] == 2]
    print(f"killed at step {killed_at}; attempt 2 reported step {second_steps[0]} first")
    # it continues from a checkpoint (every step is one), not from 0; at most the killed step is redone
    assert second_steps[0] > 1 and second_steps[0] >= killed_at, (killed_at, second_steps[:3])
    assert second_steps[-1] == 40
    assert done.result is not None and done.result["adapters"][0]["ref"] == "a@1"


@pytest.mark.slow
def test_cancel_stops_a_training_job_within_one_step(settings: Settings, engine: Engine) -> None:
    job = _training_job(settings, engine, 10_000)
    queued = _noop(engine, priority=-1)
    t = _start(_worker(settings), max_jobs=1)
    wait_until(lambda: _running_step(engine, job) >= 3, 120, "step 3")
    ts = [e.ts for e in _events(engine, job) if e.type == "progress"]
    step_s = (ts[-1] - ts[0]).total_seconds() / (len(ts) - 1)
    assert store.request_cancel(engine, T, queued.id).status is JobStatus.CANCELLED
    t0 = time.monotonic()
    store.request_cancel(engine, T, job.id)
    wait_until(lambda: store.get_job(engine, T, job.id).status is JobStatus.CANCELLED, 60, "the cancel")
    elapsed = time.monotonic() - t0
    t.join(60)
    print(f"step {step_s:.3f}s; cancelled after {elapsed:.2f}s")
    assert elapsed < CANCEL_POLL_SECONDS + 2 * step_s + 1.0, (elapsed, step_s)  # cooperative, not the kill
    assert "stopped at step" in _events(engine, job)[-1].message


def test_a_deterministic_error_at_run_time_fails_the_job_once_with_its_reason(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """A bad module name (checked at submit, but a job may predate the check) or bad data fails at once:
    another attempt would fail the same way. The reason names no server path, only the dataset's id."""
    data = tmp_path / "ds_0123456789abcdef.jsonl"  # a library job's path
    data.write_text('{"prompt": "q", "completion": "a"}\n' * 4)
    bad_data = layout.dataset_path(settings.data_dir, T, "ds_fedcba9876543210")  # an upload, by id
    bad_data.parent.mkdir(parents=True)
    bad_data.write_text('{"prompt": "q"}\n')
    cases = {
        "module": ({"target_modules": ["nope"]}, str(data), "nope"),
        "data": ({}, bad_data.stem, "completion"),
    }
    jobs = {}
    for case, (lora, path, _) in cases.items():
        config = {
            "model": {"name": "tiny-llama", "device": "cpu"},
            "lora": lora,
            "tasks": [{"name": "a", "train": path}],
            "train": {"steps": 1, "batch_size": 2},
        }
        spec = {"config": {**config, "tasks": [{"name": "a", "train": Path(path).stem}]}}
        jobs[case] = store.enqueue(engine, T, spec, config, max_attempts=3)
    Worker(settings, worker_id="w1", poll_seconds=0.05, isolate=False).run(burst=True)
    for case, (_, path, reason) in cases.items():
        job = store.get_job(engine, T, jobs[case].id)
        assert job.status is JobStatus.FAILED and job.attempts == 1, (case, job.error)
        assert reason in (job.error or ""), job.error
        assert str(tmp_path) not in (job.error or "") and str(settings.data_dir) not in (job.error or "")
        assert Path(path).stem in (job.error or "") or case == "module", job.error
