"""The job state machine on SQLite and PostgreSQL (every test runs on both: see conftest.db_url)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from cltune.errors import ConflictError, NotFoundError
from service import store
from service.db import JobStatus, utcnow

CFG = {"tasks": [{"name": "a", "train": "a.jsonl"}]}


def _enqueue(engine: Engine, tenant: str = "t_a", priority: int = 0, max_attempts: int = 3) -> store.Job:
    return store.enqueue(engine, tenant, {"config": CFG}, CFG, priority=priority, max_attempts=max_attempts)


def _types(engine: Engine, job: store.Job, tenant: str = "t_a") -> list[str]:
    return [e.type for e in store.list_events(engine, tenant, job.id)]


def test_every_transition_writes_an_event(engine: Engine) -> None:
    job = _enqueue(engine)
    claimed = store.claim(engine, "w1", 30)
    assert claimed is not None and claimed.id == job.id and claimed.status is JobStatus.RUNNING
    assert claimed.attempts == 1 and claimed.lease_owner == "w1" and claimed.started_at is not None
    store.report_progress(engine, job.id, "w1", {"step": 1, "total": 2, "loss": 0.5})
    done = store.finish(engine, job.id, "w1", {"R": [[0.0]]})
    assert done.status is JobStatus.SUCCEEDED and done.result == {"R": [[0.0]]} and done.lease_owner is None
    assert done.finished_at is not None and done.progress == {"step": 1, "total": 2, "loss": 0.5}
    assert _types(engine, job) == ["queued", "running", "progress", "succeeded"]
    events = store.list_events(engine, "t_a", job.id)
    assert events[1].data["previous"] == "queued" and events[1].data["worker"] == "w1"
    assert store.list_events(engine, "t_a", job.id, after_id=events[1].id)[0].type == "progress"


def test_claim_takes_higher_priority_first_then_oldest(engine: Engine) -> None:
    low_old = _enqueue(engine, priority=0)
    high = _enqueue(engine, priority=5)
    low_new = _enqueue(engine, priority=0)
    order = [store.claim(engine, "w", 30) for _ in range(3)]
    assert [j.id for j in order if j] == [high.id, low_old.id, low_new.id]
    assert store.claim(engine, "w", 30) is None


def test_claim_never_returns_the_same_job_twice(engine: Engine) -> None:
    jobs = {_enqueue(engine).id for _ in range(30)}
    got: list[str] = []
    lock = threading.Lock()

    def drain(worker: str) -> None:
        while (job := store.claim(engine, worker, 30)) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(jobs)  # every job once: none lost, none twice


def test_expired_lease_is_requeued_and_the_old_owner_loses_it(engine: Engine) -> None:
    job = _enqueue(engine)
    store.claim(engine, "dead", 30)
    assert store.requeue_expired(engine) == []  # lease still valid
    assert store.requeue_expired(engine, now=utcnow() + timedelta(seconds=31)) == [job.id]
    again = store.get_job(engine, "t_a", job.id)
    assert again.status is JobStatus.QUEUED and again.lease_owner is None and again.attempts == 1
    assert store.claim(engine, "alive", 30).attempts == 2  # type: ignore[union-attr]
    with pytest.raises(store.LeaseLost):
        store.heartbeat(engine, job.id, "dead", 30)
    with pytest.raises(store.LeaseLost):
        store.finish(engine, job.id, "dead", {})
    assert store.heartbeat(engine, job.id, "alive", 30) is False


def test_lease_expiry_after_max_attempts_fails_with_the_reason(engine: Engine) -> None:
    job = _enqueue(engine, max_attempts=2)
    for _ in range(2):
        assert store.claim(engine, "w", 1) is not None
        store.requeue_expired(engine, now=utcnow() + timedelta(seconds=2))
    failed = store.get_job(engine, "t_a", job.id)
    assert failed.status is JobStatus.FAILED and failed.attempts == 2
    assert "lease of worker w expired" in (failed.error or "") and "2 of 2 attempts" in (failed.error or "")
    assert _types(engine, job)[-1] == "failed"


def test_fail_with_retry_requeues_until_attempts_are_spent_and_keeps_each_traceback(engine: Engine) -> None:
    job = _enqueue(engine, max_attempts=2)
    store.claim(engine, "w", 30)
    assert store.fail(engine, job.id, "w", "boom 1", "Traceback 1", retry=True).status is JobStatus.QUEUED
    store.claim(engine, "w", 30)
    final = store.fail(engine, job.id, "w", "boom 2", "Traceback 2", retry=True)
    assert final.status is JobStatus.FAILED and final.error == "boom 2" and final.traceback == "Traceback 2"
    tbs = [e.data.get("traceback") for e in store.list_events(engine, "t_a", job.id) if e.level != "info"]
    assert tbs == ["Traceback 1", "Traceback 2"]


def test_fail_without_retry_fails_at_once(engine: Engine) -> None:
    job = _enqueue(engine)
    store.claim(engine, "w", 30)
    assert store.fail(engine, job.id, "w", "bad data", None, retry=False).status is JobStatus.FAILED


def test_cancel_of_a_queued_job_is_immediate_and_it_is_never_claimed(engine: Engine) -> None:
    job = _enqueue(engine)
    assert store.request_cancel(engine, "t_a", job.id).status is JobStatus.CANCELLED
    assert store.claim(engine, "w", 30) is None
    with pytest.raises(ConflictError, match="only queued or running"):
        store.request_cancel(engine, "t_a", job.id)


def test_cancel_of_a_running_job_sets_the_flag_the_worker_sees(engine: Engine) -> None:
    job = _enqueue(engine)
    store.claim(engine, "w", 30)
    assert store.request_cancel(engine, "t_a", job.id).status is JobStatus.RUNNING
    assert store.is_cancel_requested(engine, job.id)
    assert store.heartbeat(engine, job.id, "w", 30) is True
    assert store.mark_cancelled(engine, job.id, "w").status is JobStatus.CANCELLED
    assert _types(engine, job) == ["queued", "running", "cancel_requested", "cancelled"]


def test_retry_requeues_failed_and_cancelled_jobs_with_attempts_reset(engine: Engine) -> None:
    job = _enqueue(engine, max_attempts=1)
    store.claim(engine, "w", 30)
    store.fail(engine, job.id, "w", "boom", "tb", retry=True)
    again = store.retry(engine, "t_a", job.id)
    assert again.status is JobStatus.QUEUED and again.attempts == 0 and again.error is None
    with pytest.raises(ConflictError, match="only failed or cancelled"):
        store.retry(engine, "t_a", job.id)
    assert store.claim(engine, "w", 30) is not None


def test_a_failed_or_released_attempt_of_a_job_being_cancelled_is_not_requeued(engine: Engine) -> None:
    for end in (
        lambda j: store.fail(engine, j.id, "w", "boom", "tb", retry=True),
        lambda j: store.release(engine, j.id, "w", "shutdown"),
    ):
        job = _enqueue(engine)
        store.claim(engine, "w", 30)
        store.request_cancel(engine, "t_a", job.id)
        assert end(job).status is JobStatus.CANCELLED


def test_release_requeues_without_spending_an_attempt(engine: Engine) -> None:
    job = _enqueue(engine)
    store.claim(engine, "w", 30)
    released = store.release(engine, job.id, "w", "worker shutting down")
    assert released.status is JobStatus.QUEUED and released.attempts == 0


def test_another_tenants_job_is_not_found(engine: Engine) -> None:
    job = _enqueue(engine, tenant="t_a")
    for call in (
        lambda: store.get_job(engine, "t_b", job.id),
        lambda: store.list_events(engine, "t_b", job.id),
        lambda: store.request_cancel(engine, "t_b", job.id),
        lambda: store.retry(engine, "t_b", job.id),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert store.list_jobs(engine, "t_b") == ([], 0)
    assert store.get_job(engine, "t_a", job.id).status is JobStatus.QUEUED  # untouched


def test_list_jobs_filters_by_status_and_paginates_newest_first(engine: Engine) -> None:
    ids = [_enqueue(engine).id for _ in range(5)]
    store.request_cancel(engine, "t_a", ids[0])
    page, total = store.list_jobs(engine, "t_a", limit=2, offset=1)
    assert total == 5 and [j.id for j in page] == [ids[3], ids[2]]
    queued, n = store.list_jobs(engine, "t_a", status="queued")
    assert n == 4 and ids[0] not in {j.id for j in queued}
    assert store.count_by_status(engine) == {
        "queued": 4,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 1,
    }


def test_init_db_is_idempotent_and_times_come_back_as_aware_utc(engine: Engine) -> None:
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from service.db import alembic_config, init_db

    init_db(engine)  # already at head: a no-op, not an error
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    with engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == head == "0002"
    job = _enqueue(engine)
    got = store.get_job(engine, "t_a", job.id).created_at
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0) and got == job.created_at


def test_a_job_that_succeeds_after_a_failed_attempt_does_not_keep_its_error(engine: Engine) -> None:
    job = _enqueue(engine)
    assert store.claim(engine, "w1", 30) is not None
    store.fail(engine, job.id, "w1", "RuntimeError: flaky", "Traceback ...", retry=True)
    assert store.claim(engine, "w1", 30) is not None
    done = store.finish(engine, job.id, "w1", {"R": [[1.0]]})
    assert done.status is JobStatus.SUCCEEDED and done.error is None and done.traceback is None
    # the failed attempt stays on record in its event
    assert [e.data.get("error") for e in store.list_events(engine, "t_a", job.id) if e.type == "queued"][
        -1
    ] == ("RuntimeError: flaky")
