"""Uploaded datasets: files under <data_dir>/datasets/<tenant>/<id>.jsonl (paths: service/layout.py) plus
a row each, every query scoped to one tenant. The name a client gives (its file's name: `my data.jsonl`,
`ü.jsonl`) is only displayed: the file is stored under the generated id, so a name never becomes part
of a path.

An upload is written to a temporary file in the same directory (by the API, chunk by chunk), validated
with the library's reader, and published with one rename, so a half-written or invalid file never gets
a row and a row never points at a missing file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cltune.data import count_jsonl
from cltune.errors import ConflictError, InvalidNameError, NotFoundError
from service import layout
from service.db import DatasetRow, JobRow, JobStatus, new_id, session, utcnow
from service.layout import DATASET_FIELDS  # also read here by service.store
from service.settings import Settings

try:
    import fcntl
except ImportError:  # Windows: staged uploads are only removed by age
    fcntl = None  # type: ignore[assignment]


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


MAX_NAME_CHARS = 255  # DatasetRow.name
# what reorders or hides the text around it (bidirectional embeddings, overrides, isolates, marks)
_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_INVISIBLE = ("Cc", "Cs", "Zl", "Zp")  # control characters, lone surrogates, line/paragraph separators


def check_display_name(name: str) -> str:
    """The dataset's display name as stored: `name` in NFC. Any text a file may be called is fine
    (spaces, accents, other scripts) except what could act as a path or hide what it says.

    Raises:
        InvalidNameError: empty or over 255 characters; a '/' or '\\'; a leading '.' (`..`, hidden
            files); leading or trailing white space; a control character (NUL, newline, ...), a lone
            surrogate, a line or paragraph separator, or a bidirectional control.
    """
    nfc = unicodedata.normalize("NFC", name)
    bad = next((c for c in nfc if unicodedata.category(c) in _INVISIBLE or c in _BIDI or c in "/\\"), None)
    problem = None
    if not nfc:
        problem = "is empty"
    elif len(nfc) > MAX_NAME_CHARS:
        problem = f"is {len(nfc)} characters long (at most {MAX_NAME_CHARS})"
    elif bad is not None:
        problem = f"holds {bad!r}: a path separator or control character"
    elif nfc.startswith("."):
        problem = "starts with '.'"
    elif nfc.strip() != nfc:
        problem = "starts or ends with white space"
    if problem:
        raise InvalidNameError(
            f"invalid dataset name {name[:80]!r}: it {problem}; a dataset name is 1-{MAX_NAME_CHARS} "
            "characters without '/', '\\', control characters or a leading '.' (e.g. 'my data.jsonl')",
            name=name[:80],
            field="name",
        )
    return nfc


def tenant_dir(settings: Settings, tenant_id: str) -> Path:
    d = layout.tenant_datasets_dir(settings.data_dir, tenant_id)
    d.mkdir(parents=True, exist_ok=True)
    return d


def staging_path(settings: Settings, tenant_id: str) -> tuple[str, Path]:
    """A fresh dataset id and the temporary path its upload is streamed to."""
    ds_id = new_id("ds")
    tenant_dir(settings, tenant_id)  # made here: the upload is streamed into it
    return ds_id, layout.staged_dataset_path(settings.data_dir, tenant_id, ds_id)


def hold_staged(path: Path) -> int:
    """Create the staged file and lock it (flock, exclusive) for as long as the returned descriptor is
    open: the upload's whole life, through publish(). clean_staging in any process leaves a locked file
    alone; the kernel drops the lock of a process that dies, so a crashed upload's file is removable."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: cleaned by age alone
            fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


STALE_UPLOAD_SECONDS = 3600.0  # a staged upload not written to for this long was abandoned (a crash)
UNLOCKED_GRACE_SECONDS = 5.0  # an unlocked staged file this old has no writer (hold_staged locks at once)


def _is_locked(path: Path) -> bool | None:
    """Whether a live process holds the staged file's lock; None where that cannot be told."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # gone meanwhile, or not ours to read
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False


def clean_staging(
    settings: Settings, older_than: float = STALE_UPLOAD_SECONDS, grace: float = UNLOCKED_GRACE_SECONDS
) -> int:
    """Remove staged uploads (.upload-ds_*.jsonl) that no live process writes: left by a process that
    died mid-upload (kill -9, a crash, a power cut). A file whose lock is held (see hold_staged) stays,
    and so does one younger than `grace` seconds (created, not locked yet). Where locks cannot be
    checked, only files not written to for `older_than` seconds go. Returns how many were removed."""
    removed, now = 0, time.time()
    for p in layout.datasets_dir(settings.data_dir).glob(layout.STAGED_DATASETS_GLOB):
        try:
            age = now - p.stat().st_mtime
            if age >= older_than or (age >= grace and _is_locked(p) is False):
                p.unlink()
                removed += 1
        except FileNotFoundError:  # another process cleaned it first, or its upload was published
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
        InvalidNameError: `name` is no display name (see check_display_name).
        DataError: the file is malformed (file, 1-based line and field of the first problem).
    """
    try:
        name = check_display_name(name)
        fmt, examples = count_jsonl(staged, name=name)
        final = layout.dataset_path(settings.data_dir, tenant_id, ds_id)
        os.replace(staged, final)
        row = DatasetRow(
            id=ds_id,
            tenant_id=tenant_id,
            name=name,
            format=fmt,
            examples=examples,
            sha256=sha256,
            size_bytes=size_bytes,
            path=str(final),
            created_at=utcnow(),
        )
        try:
            with session(engine, write=True) as s:
                s.add(row)
        except BaseException:  # no row: no file either
            final.unlink(missing_ok=True)
            raise
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
