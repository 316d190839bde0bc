"""Uploaded datasets: files under <data_dir>/datasets/<tenant>/<id>.jsonl plus a row each, every query
scoped to one tenant.

An upload is written to a temporary file in the same directory (by the API, chunk by chunk), validated
with the library's reader, and published with one rename, so a half-written or invalid file never gets
a row and a row never points at a missing file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cltune.config import check_name
from cltune.data import read_jsonl
from cltune.errors import ConflictError, NotFoundError
from service.db import DatasetRow, JobRow, JobStatus, new_id, session, utcnow
from service.settings import Settings

DATASET_FIELDS = ("train", "eval", "retain")  # TaskConfig fields that name a dataset


@dataclass(frozen=True)
class Dataset:
    id: str
    tenant_id: str
    name: str
    format: str
    examples: int
    sha256: str
    size_bytes: int
    path: str
    created_at: datetime


def _of(row: DatasetRow) -> Dataset:
    return Dataset(
        row.id,
        row.tenant_id,
        row.name,
        row.format,
        row.examples,
        row.sha256,
        row.size_bytes,
        row.path,
        row.created_at,
    )


def tenant_dir(settings: Settings, tenant_id: str) -> Path:
    d = settings.datasets_dir.resolve() / check_name(tenant_id, "tenant id")
    d.mkdir(parents=True, exist_ok=True)
    return d


def staging_path(settings: Settings, tenant_id: str) -> tuple[str, Path]:
    """A fresh dataset id and the temporary path its upload is streamed to."""
    ds_id = new_id("ds")
    return ds_id, tenant_dir(settings, tenant_id) / f".upload-{ds_id}.jsonl"


STALE_UPLOAD_SECONDS = 3600.0  # a staged upload not written to for this long was abandoned (a crash)


def clean_staging(settings: Settings, older_than: float = STALE_UPLOAD_SECONDS) -> int:
    """Remove staged uploads (.upload-ds_*.jsonl) that nothing has written to for `older_than` seconds:
    left by a process that died mid-upload. Younger ones may still be streaming (another API process
    shares the directory) and stay. Returns how many were removed."""
    removed, cutoff = 0, time.time() - older_than
    for p in settings.datasets_dir.glob("*/.upload-ds_*.jsonl"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                removed += 1
        except FileNotFoundError:  # another process cleaned it first
            continue
    return removed


def publish(
    engine: Engine,
    settings: Settings,
    tenant_id: str,
    ds_id: str,
    name: str,
    staged: Path,
    size_bytes: int,
    sha256: str,
) -> Dataset:
    """Validate the staged file and record it. The staged file is removed on every error.

    Raises:
        InvalidNameError: `name` is not a safe name.
        DataError: the file is malformed (file, 1-based line and field of the first problem).
    """
    try:
        check_name(name, "dataset name")
        fmt, examples = read_jsonl(staged, name=name)
        final = staged.with_name(f"{ds_id}.jsonl")
        os.replace(staged, final)
        row = DatasetRow(
            id=ds_id,
            tenant_id=tenant_id,
            name=name,
            format=fmt,
            examples=len(examples),
            sha256=sha256,
            size_bytes=size_bytes,
            path=str(final),
            created_at=utcnow(),
        )
        with session(engine, write=True) as s:
            s.add(row)
        return _of(row)
    finally:
        staged.unlink(missing_ok=True)


def list_datasets(
    engine: Engine, tenant_id: str, limit: int = 50, offset: int = 0
) -> tuple[list[Dataset], int]:
    """The tenant's datasets, newest first, and their total count."""
    with session(engine) as s:
        total = s.scalar(
            select(func.count()).select_from(DatasetRow).where(DatasetRow.tenant_id == tenant_id)
        )
        rows = s.scalars(
            select(DatasetRow)
            .where(DatasetRow.tenant_id == tenant_id)
            .order_by(DatasetRow.created_at.desc(), DatasetRow.id)
            .limit(limit)
            .offset(offset)
        )
        return [_of(r) for r in rows], int(total or 0)


def get_dataset(engine: Engine, tenant_id: str, ds_id: str) -> Dataset:
    """Raises NotFoundError for a missing dataset and for another tenant's alike."""
    with session(engine) as s:
        row = s.scalars(
            select(DatasetRow).where(DatasetRow.id == ds_id, DatasetRow.tenant_id == tenant_id)
        ).first()
        if row is None:
            raise NotFoundError(f"dataset {ds_id!r} not found", resource="dataset", id=ds_id)
        return _of(row)


def find_datasets(engine: Engine, tenant_id: str, ids: set[str]) -> dict[str, Dataset]:
    """The subset of `ids` that are the tenant's datasets, by id."""
    if not ids:
        return {}
    with session(engine) as s:
        rows = s.scalars(select(DatasetRow).where(DatasetRow.tenant_id == tenant_id, DatasetRow.id.in_(ids)))
        return {r.id: _of(r) for r in rows}


def delete_dataset(engine: Engine, tenant_id: str, ds_id: str) -> Dataset:
    """Delete the row and the file.

    Raises:
        NotFoundError: no such dataset for this tenant.
        ConflictError: a queued or running job still reads it.
    """
    with session(engine, write=True) as s:
        row = s.scalars(  # locked before the jobs are read: see store._missing_datasets
            select(DatasetRow)
            .where(DatasetRow.id == ds_id, DatasetRow.tenant_id == tenant_id)
            .with_for_update()
        ).first()
        if row is None:
            raise NotFoundError(f"dataset {ds_id!r} not found", resource="dataset", id=ds_id)
        users = _active_jobs_using(s, tenant_id, ds_id)
        if users:
            raise ConflictError(
                f"dataset {ds_id!r} is used by queued or running jobs: {', '.join(users[:5])}; "
                "cancel them or wait until they finish",
                jobs=users,
            )
        ds = _of(row)
        s.delete(row)
    Path(ds.path).unlink(missing_ok=True)
    return ds


def _active_jobs_using(s: Session, tenant_id: str, ds_id: str) -> list[str]:
    q = select(JobRow.id, JobRow.spec).where(
        JobRow.tenant_id == tenant_id, JobRow.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
    )
    out = []
    for job_id, spec in s.execute(q):
        tasks = ((spec.get("config") or {}).get("tasks") or []) if isinstance(spec, dict) else []
        if any(isinstance(t, dict) and ds_id in (t.get(f) for f in DATASET_FIELDS) for t in tasks):
            out.append(job_id)
    return out
