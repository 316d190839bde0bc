"""The job state machine: every status transition lives here, and every transition writes an event.

    queued --claim--> running --finish--> succeeded
      ^                 |  \\--fail(retry=False) or attempts spent--> failed
      |                 |   \\--mark_cancelled (cancel_requested was set)--> cancelled
      +--fail(retry) / lease expired / release--+
    queued --request_cancel--> cancelled;   failed | cancelled --retry--> queued

Every transition into succeeded, failed or cancelled also queues the job's webhook, if its request named
one, in the same transaction (service/webhooks.py: the outbox a worker's Deliverer sends).

Claims are atomic: PostgreSQL locks the chosen row with FOR UPDATE SKIP LOCKED (concurrent workers
take different rows without waiting); SQLite opens the claim with BEGIN IMMEDIATE (one writer at a
time). Every update of a running job is conditional on the lease owner, so a worker whose lease
expired and moved on can never overwrite the new owner's job (it gets LeaseLost).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cltune.errors import ConfigError, ConflictError, NotFoundError
from service import webhooks
from service.db import (
    TERMINAL,
    DatasetRow,
    EventRow,
    JobRow,
    JobStatus,
    new_id,
    newest_first,
    session,
    utcnow,
)

__all__ = ["Event", "Job", "JobStatus", "LeaseLost"]


class LeaseLost(ConflictError):  # noqa: N818 - a condition the worker reacts to, like StopRequested
    """The worker no longer holds the job's lease (it expired and the job was re-queued or finished)."""

    kind = "lease_lost"


@dataclass(frozen=True)
class Job:
    id: str
    tenant_id: str
    status: JobStatus
    spec: dict[str, Any]
    config: dict[str, Any]
    priority: int
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    cancel_requested: bool
    result: dict[str, Any] | None
    error: str | None
    traceback: str | None
    progress: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: JobRow) -> Job:
        return cls(
            **{f: getattr(row, f) for f in cls.__dataclass_fields__ if f != "status"},
            status=JobStatus(row.status),
        )

    @property
    def webhook_url(self) -> str | None:
        return webhooks.webhook_url_of(self.spec)


@dataclass(frozen=True)
class Event:
    id: int
    job_id: str
    tenant_id: str
    ts: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any]

    @classmethod
    def of(cls, row: EventRow) -> Event:
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})


# ---------------------------------------------------------------- helpers


def _event(s: Session, job: JobRow, type_: str, message: str, level: str = "info", **data: Any) -> None:
    s.add(
        EventRow(
            job_id=job.id,
            tenant_id=job.tenant_id,
            ts=utcnow(),
            level=level,
            type=type_,
            message=message,
            data=data,
        )
    )


def _set(s: Session, job: JobRow, status: JobStatus, message: str, level: str = "info", **data: Any) -> None:
    """The one place a status changes: update the row, write the transition's event and, when the job
    ends, queue its webhook (all in the caller's transaction)."""
    old = job.status
    job.status = status.value
    job.updated_at = utcnow()
    if status in TERMINAL:
        job.finished_at = job.updated_at
    if status is not JobStatus.RUNNING:
        job.lease_owner, job.lease_expires_at = None, None
    _event(s, job, status.value, message, level, previous=old, attempt=job.attempts, **data)
    if status in TERMINAL:
        webhooks.record(s, job, status)


def _locked(s: Session, job_id: str) -> JobRow | None:
    # FOR UPDATE on PostgreSQL; SQLite ignores it (the write transaction already holds the lock)
    return s.scalars(select(JobRow).where(JobRow.id == job_id).with_for_update()).one_or_none()


def _owned(s: Session, job_id: str, worker_id: str) -> JobRow:
    job = _locked(s, job_id)
    if job is None or job.status != JobStatus.RUNNING or job.lease_owner != worker_id:
        state = "missing" if job is None else f"{job.status}, owner {job.lease_owner}"
        raise LeaseLost(f"worker {worker_id} no longer holds job {job_id} ({state})", job_id=job_id)
    return job


def _missing_datasets(s: Session, tenant_id: str, spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, dataset id) of each dataset the job's request names that the tenant no longer has. The
    rows found are locked (FOR UPDATE; SQLite: the write transaction) until the caller commits, so a
    concurrent delete (which locks the row before it looks for jobs using it) sees the job, or happens
    first and is seen here."""
    from service.layout import DATASET_FIELDS

    tasks = (spec.get("config") or {}).get("tasks") if isinstance(spec.get("config"), dict) else None
    refs = [
        (f"tasks.{i}.{f}", t[f])
        for i, t in enumerate(tasks if isinstance(tasks, list) else [])
        if isinstance(t, dict)
        for f in DATASET_FIELDS
        if isinstance(t.get(f), str) and t[f].startswith("ds_")  # ids; paths (library jobs) are not rows
    ]
    if not refs:
        return []
    ids = sorted({r for _, r in refs})
    q = select(DatasetRow.id).where(DatasetRow.tenant_id == tenant_id, DatasetRow.id.in_(ids))
    found = set(s.scalars(q.with_for_update()))
    return [(field, ref) for field, ref in refs if ref not in found]


def _tenant_job(s: Session, tenant_id: str, job_id: str, lock: bool = False) -> JobRow:
    q = select(JobRow).where(JobRow.id == job_id, JobRow.tenant_id == tenant_id)
    job = s.scalars(q.with_for_update() if lock else q).one_or_none()
    if job is None:  # another tenant's job looks exactly like a missing one
        raise NotFoundError(f"job {job_id!r} not found", resource="job", id=job_id)
    return job


# ---------------------------------------------------------------- transitions


def enqueue(
    engine: Engine,
    tenant_id: str,
    spec: dict[str, Any],
    config: dict[str, Any],
    priority: int = 0,
    max_attempts: int = 3,
    check_datasets: bool = False,
) -> Job:
    """Insert a queued job. `spec` is the request as sent; `config` the resolved RunConfig JSON.
    `check_datasets`: make sure, in the insert's transaction, that the datasets `spec` names by id exist.

    Raises:
        ConfigError: a dataset the request names was deleted since the config was resolved.
    """
    now = utcnow()
    with session(engine, write=True) as s:
        missing = _missing_datasets(s, tenant_id, spec) if check_datasets else []
        if missing:
            errors = [
                {"field": f, "input": ref, "message": f"unknown dataset {ref!r} (deleted meanwhile)"}
                for f, ref in missing
            ]
            msg = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise ConfigError(f"invalid job config: {msg}", errors=errors)
        job = JobRow(
            id=new_id("job"),
            tenant_id=tenant_id,
            status=JobStatus.QUEUED.value,
            spec=spec,
            config=config,
            priority=priority,
            attempts=0,
            max_attempts=max_attempts,
            cancel_requested=False,
            created_at=now,
            updated_at=now,
        )
        s.add(job)
        s.flush()
        _event(s, job, "queued", "job queued", priority=priority)
        return Job.of(job)


def claim(engine: Engine, worker_id: str, lease_seconds: float) -> Job | None:
    """Atomically take the next queued job (priority desc, then oldest first) and lease it.

    Returns None when nothing is queued. Two workers never get the same job.
    """
    with session(engine, write=True) as s:
        q = (
            select(JobRow)
            .where(JobRow.status == JobStatus.QUEUED.value)
            .order_by(JobRow.priority.desc(), JobRow.created_at, JobRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        job = s.scalars(q).one_or_none()
        if job is None:
            return None
        now = utcnow()
        job.attempts += 1
        job.lease_owner, job.lease_expires_at = worker_id, now + timedelta(seconds=lease_seconds)
        job.started_at = job.started_at or now
        _set(
            s,
            job,
            JobStatus.RUNNING,
            f"claimed by {worker_id} (attempt {job.attempts}/{job.max_attempts})",
            worker=worker_id,
        )
        return Job.of(job)


def heartbeat(
    engine: Engine, job_id: str, worker_id: str, lease_seconds: float, progress: dict[str, Any] | None = None
) -> bool:
    """Renew the lease; store `progress` if given. Returns whether a cancel was requested.

    Raises:
        LeaseLost: the lease expired and the job moved on (re-queued, claimed by another, finished).
    """
    with session(engine, write=True) as s:
        job = _owned(s, job_id, worker_id)
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
        job.updated_at = utcnow()
        if progress is not None:
            job.progress = progress
        return job.cancel_requested


def report_progress(
    engine: Engine, job_id: str, worker_id: str, progress: dict[str, Any], message: str = ""
) -> None:
    """Store the latest progress on the job and append it as a "progress" event (owner only)."""
    with session(engine, write=True) as s:
        job = _owned(s, job_id, worker_id)
        job.progress = progress
        job.updated_at = utcnow()
        _event(s, job, "progress", message, **progress)


def finish(engine: Engine, job_id: str, worker_id: str, result: dict[str, Any]) -> Job:
    """running -> succeeded with `result`. Raises LeaseLost if the worker no longer owns the job."""
    with session(engine, write=True) as s:
        job = _owned(s, job_id, worker_id)
        job.result = result
        job.error = job.traceback = None  # an earlier attempt's failure stays in its event only
        _set(s, job, JobStatus.SUCCEEDED, "job succeeded", worker=worker_id)
        return Job.of(job)


def fail(engine: Engine, job_id: str, worker_id: str, error: str, traceback: str | None, retry: bool) -> Job:
    """Record a failed attempt (error + traceback, also kept in the event). With `retry` and attempts
    left the job is re-queued (it resumes from its checkpoint); otherwise it fails for good."""
    with session(engine, write=True) as s:
        job = _owned(s, job_id, worker_id)
        job.error, job.traceback = error, traceback
        if retry and job.cancel_requested:  # nobody wants another attempt
            _set(
                s,
                job,
                JobStatus.CANCELLED,
                f"cancelled; the last attempt failed: {error}",
                "warning",
                error=error,
                traceback=traceback,
                worker=worker_id,
            )
        elif retry and job.attempts < job.max_attempts:
            _set(
                s,
                job,
                JobStatus.QUEUED,
                f"attempt {job.attempts} failed, re-queued: {error}",
                "warning",
                error=error,
                traceback=traceback,
                worker=worker_id,
            )
        else:
            why = "" if not retry else f" (after {job.attempts} of {job.max_attempts} attempts)"
            _set(
                s,
                job,
                JobStatus.FAILED,
                f"job failed{why}: {error}",
                "error",
                error=error,
                traceback=traceback,
                worker=worker_id,
            )
        return Job.of(job)


def release(engine: Engine, job_id: str, worker_id: str, reason: str) -> Job:
    """running -> queued without spending an attempt (the worker is shutting down cleanly)."""
    with session(engine, write=True) as s:
        job = _owned(s, job_id, worker_id)
        if job.cancel_requested:
            _set(
                s, job, JobStatus.CANCELLED, f"cancelled; released by {worker_id}: {reason}", worker=worker_id
            )
            return Job.of(job)
        job.attempts -= 1
        _set(s, job, JobStatus.QUEUED, f"released by {worker_id}: {reason}", worker=worker_id)
        return Job.of(job)


def request_cancel(engine: Engine, tenant_id: str, job_id: str) -> Job:
    """queued -> cancelled at once; running -> cancel_requested (the worker stops it).

    Raises:
        NotFoundError: no such job for this tenant.
        ConflictError: the job already finished.
    """
    with session(engine, write=True) as s:
        job = _tenant_job(s, tenant_id, job_id, lock=True)
        if job.status == JobStatus.QUEUED:
            _set(s, job, JobStatus.CANCELLED, "cancelled before it started")
        elif job.status == JobStatus.RUNNING:
            if not job.cancel_requested:
                job.cancel_requested, job.updated_at = True, utcnow()
                _event(s, job, "cancel_requested", "cancel requested; the worker stops it within one step")
        else:
            raise ConflictError(
                f"job {job_id!r} is already {job.status}; only queued or running jobs can be cancelled",
                status=job.status,
            )
        return Job.of(job)


def mark_cancelled(
    engine: Engine, job_id: str, worker_id: str, message: str = "cancelled while running"
) -> Job:
    """running -> cancelled (the worker stopped or killed the child after a cancel request)."""
    with session(engine, write=True) as s:
        job = _owned(s, job_id, worker_id)
        _set(s, job, JobStatus.CANCELLED, message, worker=worker_id)
        return Job.of(job)


def requeue_expired(engine: Engine, now: datetime | None = None) -> list[str]:
    """Running jobs whose lease expired (their worker died): re-queue them, or fail them with the
    reason once `max_attempts` claims are spent, or cancel them if a cancel was requested.
    Returns the ids handled."""
    now = now or utcnow()
    with session(engine, write=True) as s:
        q = (
            select(JobRow)
            .where(JobRow.status == JobStatus.RUNNING.value, JobRow.lease_expires_at < now)
            .with_for_update(skip_locked=True)
        )
        jobs = list(s.scalars(q))
        for job in jobs:
            why = (
                f"lease of worker {job.lease_owner} expired at {job.lease_expires_at:%H:%M:%S} (worker lost)"
            )
            if job.cancel_requested:
                _set(s, job, JobStatus.CANCELLED, f"cancelled: {why}")
            elif job.attempts >= job.max_attempts:
                job.error = f"{why}; gave up after {job.attempts} of {job.max_attempts} attempts"
                _set(s, job, JobStatus.FAILED, job.error, "error", error=job.error)
            else:
                _set(s, job, JobStatus.QUEUED, f"{why}; re-queued", "warning")
        return [j.id for j in jobs]


def retry(engine: Engine, tenant_id: str, job_id: str) -> Job:
    """failed | cancelled -> queued with the attempt count reset (it resumes from its checkpoint).

    Raises:
        NotFoundError: no such job for this tenant.
        ConflictError: the job is not failed or cancelled.
    """
    with session(engine, write=True) as s:
        job = _tenant_job(s, tenant_id, job_id, lock=True)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise ConflictError(
                f"job {job_id!r} is {job.status}; only failed or cancelled jobs can be retried",
                status=job.status,
            )
        missing = _missing_datasets(s, tenant_id, job.spec)
        if missing:
            refs = ", ".join(sorted({r for _, r in missing}))
            raise ConflictError(
                f"job {job_id!r} cannot run again: its dataset(s) {refs} were deleted; "
                "upload them again and submit a new job",
                datasets=sorted({r for _, r in missing}),
            )
        job.attempts, job.cancel_requested = 0, False
        job.error = job.traceback = job.result = job.finished_at = None
        _set(s, job, JobStatus.QUEUED, "re-queued by retry")
        return Job.of(job)


def add_event(
    engine: Engine, job_id: str, level: str, type: str, message: str, data: dict[str, Any] | None = None
) -> None:
    """Append a non-transition event (log, eval, ...) to a job."""
    with session(engine, write=True) as s:
        job = s.get(JobRow, job_id)
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found", resource="job", id=job_id)
        _event(s, job, type, message, level, **(data or {}))


# ---------------------------------------------------------------- queries


def load_job(engine: Engine, job_id: str) -> Job:
    """Any tenant's job (workers, admin). Raises NotFoundError."""
    with session(engine) as s:
        job = s.get(JobRow, job_id)
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found", resource="job", id=job_id)
        return Job.of(job)


def get_job(engine: Engine, tenant_id: str, job_id: str) -> Job:
    """The tenant's job. Raises NotFoundError for a missing job and for another tenant's job alike."""
    with session(engine) as s:
        return Job.of(_tenant_job(s, tenant_id, job_id))


def list_jobs(
    engine: Engine, tenant_id: str, status: JobStatus | str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[Job], int]:
    """The tenant's jobs, newest first, and the total count matching the filter."""
    cond = [JobRow.tenant_id == tenant_id]
    if status is not None:
        cond.append(JobRow.status == JobStatus(status).value)
    with session(engine) as s:
        rows, total = newest_first(s, JobRow, cond, limit, offset)
        return [Job.of(r) for r in rows], total


def list_events(
    engine: Engine, tenant_id: str, job_id: str, after_id: int = 0, limit: int = 500
) -> list[Event]:
    """The job's events with id > `after_id`, oldest first (`after_id` is the SSE cursor).
    Raises NotFoundError for another tenant's job."""
    with session(engine) as s:
        _tenant_job(s, tenant_id, job_id)
        rows = s.scalars(
            select(EventRow)
            .where(EventRow.job_id == job_id, EventRow.id > after_id)
            .order_by(EventRow.id)
            .limit(limit)
        )
        return [Event.of(r) for r in rows]


def count_by_status(engine: Engine) -> dict[str, int]:
    """Jobs per status over all tenants (every status present, zeros included): /metrics."""
    with session(engine) as s:
        counts = dict(s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).tuples().all())
    return {st.value: int(counts.get(st.value, 0)) for st in JobStatus}


def is_cancel_requested(engine: Engine, job_id: str) -> bool:
    """A cheap read the worker polls between heartbeats, so a cancel is seen within a second."""
    with session(engine) as s:
        return bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))
