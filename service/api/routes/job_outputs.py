"""What a job produces besides its result: servable checkpoints (list, publish as an adapter version),
its metrics (JSON or CSV), the heatmap and learning-curve images, its TensorBoard event files."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import Engine
from starlette.background import BackgroundTask

from cltune import checkpoints
from cltune.config import check_name
from cltune.errors import NotFoundError
from service import artifacts, store
from service.api.deps import DbDep, SettingsDep, TenantDep
from service.api.schemas import (
    AdapterPublic,
    CheckpointList,
    CheckpointPublic,
    CheckpointPublish,
    ErrorResponse,
)
from service.store import Event

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (401, 404, 409, 422)}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, **{c: {"model": ErrorResponse} for c in (400, 415)}}
PROGRESS = "progress.json"
EVENT_PAGE = 500
MAX_EVENTS = 1_000_000  # a job logs one progress event per step: far more steps than any task takes
BASE_COLUMNS = ["task", "task_index", "step", "loss", "lr", "tokens_per_s"]


class MetricsFormat(StrEnum):
    JSON = "json"
    CSV = "csv"


class Plot(StrEnum):
    HEATMAP = "heatmap"  # R.png: every task's score after each task (+ general abilities)
    CURVES = "curves"  # curves.png: train loss and validation per task


PLOT_FILES = {Plot.HEATMAP: "R.png", Plot.CURVES: "curves.png"}


# ---------------------------------------------------------------- checkpoints


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=ERRORS)
def list_checkpoints(job_id: str, db: DbDep, settings: SettingsDep, tenant: TenantDep) -> CheckpointList:
    """The servable checkpoints the job has kept so far (`train.keep_checkpoints` per task: the most
    recent ones and the best), in task then step order; `registered` marks the one each finished task
    registered."""
    store.get_job(db, tenant, job_id)  # 404 for another tenant's job
    run = artifacts.run_files(
        settings,
        job_id,
        lambda rel: rel == PROGRESS or (rel.startswith("kept/") and rel.endswith("/meta.json")),
    )
    registered = _registered(run)
    items = []
    for meta in checkpoints.list_kept(run):
        rec = registered.get(meta["task"]) or {}
        same = rec.get("notes", {}).get("checkpoint_step") == meta["step"]
        items.append(CheckpointPublic(**meta, registered=f"{rec['name']}@{rec['version']}" if same else None))
    return CheckpointList(items=items)


@router.post(
    "/{job_id}/checkpoints/publish", status_code=201, response_model=AdapterPublic, responses=BODY_ERRORS
)
def publish_checkpoint(
    job_id: str, body: CheckpointPublish, db: DbDep, settings: SettingsDep, tenant: TenantDep
) -> AdapterPublic:
    """Register one kept checkpoint as the next version of `name` (default: the task's adapter name),
    served like any adapter. Its record keeps the task's lineage (`parent`) and says which step it is
    (`notes.checkpoint_step`, `notes.checkpoint_of`: this job)."""
    store.get_job(db, tenant, job_id)
    if body.name is not None:
        check_name(body.name, "adapter name")
    folder = f"/{checkpoints.step_name(body.step)}/"
    run = artifacts.run_files(
        settings,
        job_id,
        lambda rel: (
            rel == PROGRESS or (rel.startswith("kept/") and (folder in rel or rel.endswith("/task.json")))
        ),
    )
    registered = _registered(run).get(body.task)
    rec = artifacts.register(
        settings,
        tenant,
        job_id,
        lambda registry: checkpoints.publish(
            registry, run, body.task, body.step, name=body.name, created_by=job_id, registered=registered
        ),
    )
    return AdapterPublic.model_validate(rec)


def _registered(run: Path) -> dict[str, dict[str, Any]]:
    """task -> the record of the adapter it registered (finished tasks only)."""
    path = run / PROGRESS
    progress = json.loads(path.read_text()) if path.is_file() else {}
    return {a["task"]: a for a in progress.get("adapters", []) if a.get("task")}


# ---------------------------------------------------------------- metrics


@router.get(
    "/{job_id}/metrics",
    responses={200: {"content": {"application/json": {}, "text/csv": {}}}, **ERRORS},
)
def job_metrics(
    job_id: str,
    db: DbDep,
    tenant: TenantDep,
    format: Annotated[MetricsFormat, Query(description="json: {columns, rows}; csv: one row per step")] = (
        MetricsFormat.JSON
    ),
) -> Response:
    """One row per logged training step: task, step, loss and its parts, lr, tokens/s, and where it was
    measured at that step the validation value (`steps: auto`) and the held-out score (`eval_every`).
    Live while the job runs; a retried attempt's steps replace the earlier attempt's."""
    rows = metric_rows(_all_events(db, tenant, job_id))
    columns = _columns(rows)
    if format is MetricsFormat.CSV:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return Response(out.getvalue(), media_type="text/csv")
    return Response(
        json.dumps({"job_id": job_id, "columns": columns, "rows": rows}), media_type="application/json"
    )


def _all_events(db: Engine, tenant: str, job_id: str) -> Iterator[Event]:
    after, seen = 0, 0
    while seen < MAX_EVENTS:
        page = store.list_events(db, tenant, job_id, after, EVENT_PAGE)  # 404 for another tenant's job
        yield from page
        if len(page) < EVENT_PAGE:
            return
        after, seen = page[-1].id, seen + len(page)


def metric_rows(events: Iterator[Event]) -> list[dict[str, Any]]:
    """Rows keyed by (task index, step) from the job's progress events and the validation / score
    values of its log events, in training order."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    index: dict[str, int] = {}  # task name -> index, from progress events
    for e in events:
        d = e.data
        if e.type == "progress" and isinstance(d.get("step"), int):
            index[d["task"]] = d["task_index"]
            row = {k: d.get(k) for k in BASE_COLUMNS}
            row.update({f"loss_{k}": v for k, v in (d.get("parts") or {}).items()})
            rows[(d["task_index"], d["step"])] = {**rows.get((d["task_index"], d["step"]), {}), **row}
        elif d.get("task") in index and isinstance(d.get("step"), int):
            key = (index[d["task"]], d["step"])
            for k in ("validation", "score"):
                if isinstance(d.get(k), int | float):
                    rows.setdefault(key, {"task": d["task"], "task_index": key[0], "step": key[1]})[k] = d[k]
    return [rows[k] for k in sorted(rows)]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    extra = sorted({k for r in rows for k in r if k not in BASE_COLUMNS and k not in ("validation", "score")})
    present = {k for r in rows for k in r}
    return BASE_COLUMNS + extra + [k for k in ("validation", "score") if k in present]


# ---------------------------------------------------------------- files


@router.get(
    "/{job_id}/plots/{plot}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **ERRORS},
)
def job_plot(job_id: str, plot: Plot, db: DbDep, settings: SettingsDep, tenant: TenantDep) -> FileResponse:
    """`heatmap`: every task's score after each task, with the general-ability columns; `curves`: the
    train loss and validation of each task. Written when the job has finished (`eval.heatmap`)."""
    job = store.get_job(db, tenant, job_id)
    name = PLOT_FILES[plot]
    path = artifacts.run_files(settings, job_id, lambda rel: rel == name) / name
    if not path.is_file():
        raise NotFoundError(
            f"job {job_id!r} has no {plot.value} image: it is drawn when a job succeeds with eval.heatmap "
            f"on (the job is {job.status.value})",
            job_id=job_id,
        )
    return FileResponse(path, media_type="image/png", filename=f"{job_id}-{name}")


@router.get(
    "/{job_id}/tensorboard",
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}}}, **ERRORS},
)
def job_tensorboard(job_id: str, db: DbDep, settings: SettingsDep, tenant: TenantDep) -> FileResponse:
    """The job's TensorBoard event files (`train.tensorboard: true`) as a tar.gz: unpack it and run
    `tensorboard --logdir <folder>`. Live while the job runs (as of its last synced point)."""
    store.get_job(db, tenant, job_id)
    run = artifacts.run_files(settings, job_id, lambda rel: rel.startswith("tensorboard/"))
    files = sorted(p for p in (run / "tensorboard").glob("*") if p.is_file())
    if not files:
        raise NotFoundError(
            f"job {job_id!r} has no TensorBoard files: submit it with train.tensorboard: true", job_id=job_id
        )
    fd, tmp = tempfile.mkstemp(suffix=".tar.gz")
    os.close(fd)
    with tarfile.open(tmp, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=f"{job_id}/{p.name}")
    return FileResponse(
        tmp,
        media_type="application/gzip",
        filename=f"{job_id}-tensorboard.tar.gz",
        background=BackgroundTask(os.unlink, tmp),
    )
