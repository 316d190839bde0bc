"""Jobs: create (validated before it is queued), list, get, events (JSON and SSE), cancel, retry."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from cltune.config import ModelConfig, parse_config
from cltune.errors import ConfigError, ConflictError
from cltune.models import CATALOG
from cltune.stats import summarize_results
from service import preflight, store
from service.api.deps import DbDep, SettingsDep, TenantDep
from service.api.errors import ApiError
from service.api.schemas import (
    MAX_EVENT_ID,
    MAX_LIMIT,
    MAX_OFFSET,
    ErrorResponse,
    EventList,
    EventPublic,
    JobCreate,
    JobList,
    JobPublic,
)
from service.datasets import find_datasets
from service.db import TERMINAL, JobStatus
from service.init_adapters import resolve_init_adapter
from service.layout import DATASET_FIELDS
from service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 404, 409, 415, 422)
}
EVENT_PAGE = 500


def resolve_config(db: Engine, settings: Settings, tenant: str, config: dict[str, Any]) -> dict[str, Any]:
    """Check that the config's dataset ids are the tenant's datasets and validate it as a RunConfig.

    Returns the RunConfig JSON the runner trains, defaults filled in. Datasets stay named by id: the
    runner resolves them to files on the host where it runs (service/layout.py). Raises ConfigError
    listing every problem at once: unknown dataset ids, models outside the catalog, and each invalid
    field with its valid range.
    """
    cfg = copy.deepcopy(config)
    errors: list[dict[str, Any]] = []
    tasks: list[Any] = cfg["tasks"] if isinstance(cfg.get("tasks"), list) else []
    refs = {t[f] for t in tasks if isinstance(t, dict) for f in DATASET_FIELDS if isinstance(t.get(f), str)}
    owned = find_datasets(db, tenant, refs)
    for i, task in enumerate(tasks):
        for f in DATASET_FIELDS if isinstance(task, dict) else ():
            ref = task.get(f)
            if ref is None:
                continue
            if not (isinstance(ref, str) and ref in owned):
                errors.append(
                    {
                        "field": f"tasks.{i}.{f}",
                        "input": str(ref)[:80],
                        "message": f"unknown dataset {str(ref)[:80]!r}; use the id (ds_...) of one of your "
                        "datasets (GET /v1/datasets, upload with POST /v1/datasets)",
                    }
                )
    model: dict[str, Any] = cfg["model"] if isinstance(cfg.get("model"), dict) else {}
    name = model.get("name", ModelConfig.model_fields["name"].default)
    if not settings.allow_model_paths and name not in CATALOG:
        errors.append(
            {
                "field": "model.name",
                "input": str(name)[:80],
                "message": f"unknown model {str(name)[:80]!r}; valid: {', '.join(sorted(CATALOG))}",
            }
        )
    errors += resolve_init_adapter(settings, tenant, cfg)  # before parsing: it fills lora from the adapter
    errors += preflight.non_finite(cfg)
    try:
        parsed = parse_config(cfg)
        resolved = parsed.model_dump(mode="json")
    except ConfigError as e:
        errors += [x for x in e.details["errors"] if not _non_finite_input(x)]
    else:
        errors += preflight.check_job(parsed, settings)
    if errors:
        msg = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise ConfigError(f"invalid job config: {msg}", errors=errors)
    return resolved


def _non_finite_input(error: dict[str, Any]) -> bool:
    """A field error about a NaN or infinity: `preflight.non_finite` reports those once, plainly."""
    return isinstance(error.get("input"), float) and not math.isfinite(error["input"])


@router.post("", status_code=201, response_model=JobPublic, responses=ERRORS)
def create_job(body: JobCreate, db: DbDep, settings: SettingsDep, tenant: TenantDep) -> JobPublic:
    """Validate a RunConfig that names your datasets by id, then queue it."""
    config = resolve_config(db, settings, tenant, body.config)
    spec = body.model_dump(mode="json")
    job = store.enqueue(  # re-checks the datasets in its transaction: a DELETE may have come in between
        db,
        tenant,
        spec,
        config,
        body.priority,
        body.max_attempts or settings.max_attempts,
        check_datasets=True,
    )
    return JobPublic.model_validate(job)


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(
    db: DbDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobList:
    """Your jobs, newest first; filter by `status`."""
    jobs, total = store.list_jobs(db, tenant, status, limit, offset)
    return JobList(items=[JobPublic.model_validate(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/summary", responses=ERRORS)
def summarize_jobs(
    db: DbDep,
    tenant: TenantDep,
    ids: Annotated[
        list[str], Query(min_length=1, max_length=50, description="succeeded jobs: one config, several seeds")
    ],
    baseline: Annotated[
        list[str] | None, Query(max_length=50, description="jobs of the method to compare against")
    ] = None,
) -> dict[str, Any]:
    """Mean and 95% interval (Student t over the jobs) of AP, BWT, forgetting, FWT, each task's final
    score and each general-ability retention, for repeated jobs of one configuration (e.g. seeds
    0, 1, 2). With `baseline` jobs: per metric "better", "worse" or "no measurable difference"
    (intervals that overlap make no claim)."""
    runs, base = _results(db, tenant, ids), _results(db, tenant, baseline or [])
    try:
        return {"jobs": ids, "baseline_jobs": baseline or [], **summarize_results(runs, base or None)}
    except ValueError as e:  # jobs of different task sequences
        raise ConflictError(f"cannot summarise these jobs together: {e}", jobs=ids) from None


def _results(db: Engine, tenant: str, ids: list[str]) -> list[dict[str, Any]]:
    out = []
    for job_id in ids:
        job = store.get_job(db, tenant, job_id)  # 404 for another tenant's job
        if job.status != JobStatus.SUCCEEDED or not job.result or not job.result.get("metrics"):
            raise ConflictError(
                f"job {job_id!r} is {job.status.value}: only succeeded jobs with CL metrics can be summarised",
                job_id=job_id,
                status=job.status.value,
            )
        out.append(job.result)
    return out


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
def get_job(job_id: str, db: DbDep, tenant: TenantDep) -> JobPublic:
    return JobPublic.model_validate(store.get_job(db, tenant, job_id))


@router.get("/{job_id}/events", response_model=EventList, responses=ERRORS)
def list_events(
    job_id: str,
    db: DbDep,
    tenant: TenantDep,
    after_id: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=EVENT_PAGE)] = EVENT_PAGE,
) -> EventList:
    """The job's events with id > `after_id`, oldest first."""
    events = store.list_events(db, tenant, job_id, after_id, limit)
    return EventList(
        items=[EventPublic.model_validate(e) for e in events],
        next_after_id=events[-1].id if events else after_id,
    )


@router.get("/{job_id}/events/stream", responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def stream_events(
    job_id: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    tenant: TenantDep,
    after_id: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
    last_event_id: Annotated[
        str | None,
        Header(
            description=f"SSE reconnection cursor: an event id 0..{MAX_EVENT_ID}",
            json_schema_extra={"pattern": "^ *[0-9]{0,10} *$"},
        ),
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events: each job event as `id`/`event`/`data` (JSON); a final `end` event once the job
    has finished and every event was sent. Reconnect with Last-Event-ID (or `after_id`) to resume."""
    last = (last_event_id or "").strip()
    if last and not (re.fullmatch(r"[0-9]{1,10}", last) and int(last) <= MAX_EVENT_ID):
        raise ApiError(
            422,
            "invalid_request",
            f"header Last-Event-ID must be an event id 0..{MAX_EVENT_ID} (as sent in `id:`), got {last[:40]!r}",
            field="last-event-id",
        )
    await run_in_threadpool(store.get_job, db, tenant, job_id)  # 404 before the stream starts
    cursor = max(after_id, int(last) if last else 0)
    return StreamingResponse(
        _sse(request, db, settings, tenant, job_id, cursor),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _frame(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


async def _sse(
    request: Request, db: Engine, settings: Settings, tenant: str, job_id: str, cursor: int
) -> AsyncIterator[str]:
    quiet_since = time.monotonic()
    while not await request.is_disconnected():
        # status first, then events: every event written before the final transition is read below
        job = await run_in_threadpool(store.get_job, db, tenant, job_id)
        events = await run_in_threadpool(store.list_events, db, tenant, job_id, cursor, EVENT_PAGE)
        for e in events:
            yield _frame(e.type, EventPublic.model_validate(e).model_dump(mode="json"), e.id)
            cursor = e.id
        if len(events) == EVENT_PAGE:
            continue
        if job.status in TERMINAL:
            yield _frame("end", {"job_id": job_id, "status": job.status.value, "error": job.error})
            return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > settings.sse_keepalive_seconds:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(settings.sse_poll_seconds)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ERRORS)
def cancel_job(job_id: str, db: DbDep, tenant: TenantDep) -> JobPublic:
    """A queued job is cancelled at once; a running one stops within one step (then is killed after the
    grace period). 409 if it already finished."""
    return JobPublic.model_validate(store.request_cancel(db, tenant, job_id))


@router.post("/{job_id}/retry", response_model=JobPublic, responses=ERRORS)
def retry_job(job_id: str, db: DbDep, tenant: TenantDep) -> JobPublic:
    """Re-queue a failed or cancelled job (it resumes from its last checkpoint). 409 otherwise."""
    return JobPublic.model_validate(store.retry(db, tenant, job_id))
