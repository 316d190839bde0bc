"""Where the service keeps things: every path under a data directory and every key in the shared
artifact store, built here and nowhere else.

Data directory (CLTUNE_DATA_DIR; each host has its own):
    runs/<job_id>/                      a job's run directory (crash.log, progress.json, rank<N>/, ...)
    adapters/<tenant_id>/<name>/v<N>/   the tenant's adapter registry (cltune.registry)
    datasets/<tenant_id>/<ds_id>.jsonl  uploaded datasets (.upload-<ds_id>.jsonl while staged)
    models/                             converted and downloaded base models
    cache/runs/<job_id>/                the API's copy of files of a run that ran elsewhere

Artifact store keys (under the store's own prefix):
    runs/<job_id>/manifest.json + blobs/<sha256>   run-directory snapshots (cltune.artifact_sync.RunSync)
    adapters/<tenant_id>/<name>/v<N>/...           registry versions, the record published last
    datasets/<tenant_id>/<ds_id>.jsonl             uploaded datasets

A job's config names uploaded datasets by id (`ds_...`) in its tasks' DATASET_FIELDS; whoever reads
the files (the runner, a check at submit) resolves the ids here, on its own host. Any other value is a
path and is used as it is (library jobs, tests).

Stdlib only at the top: the runner imports this before a noop job, which must start in milliseconds.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DATASET_FIELDS = ("train", "eval", "retain")  # TaskConfig fields that name a dataset
DATASET_ID = re.compile(r"ds_[0-9a-f]{16}")  # service.db.new_id("ds")
CRASH_LOG = "crash.log"  # in a run directory: the faulthandler stacks of a job process that died


def _name(value: str, what: str) -> str:
    from cltune.config import check_name  # late: it imports pydantic

    return check_name(value, what)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


# ---------------------------------------------------------------- the data directory


def runs_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "runs"


def run_dir(data_dir: Path, job_id: str) -> Path:
    """A job's run directory: every attempt on this host resumes from it."""
    return runs_dir(data_dir) / job_id


def crash_log(data_dir: Path, job_id: str) -> Path:
    return run_dir(data_dir, job_id) / CRASH_LOG


def run_cache_dir(data_dir: Path, job_id: str) -> Path:
    """The API's copy of files of a run that a worker on another host wrote (see artifacts.run_files)."""
    return Path(data_dir) / "cache" / "runs" / job_id


def adapters_dir(data_dir: Path, tenant_id: str) -> Path:
    """The root of one tenant's adapter Registry."""
    return Path(data_dir) / "adapters" / tenant_id


def models_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models"


def datasets_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "datasets"


def tenant_datasets_dir(data_dir: Path, tenant_id: str) -> Path:
    """The tenant's uploaded datasets (absolute: dataset rows record paths under it)."""
    return datasets_dir(data_dir).resolve() / _name(tenant_id, "tenant id")


def dataset_path(data_dir: Path, tenant_id: str, ds_id: str) -> Path:
    """The file of the uploaded dataset `ds_id` on the host whose data directory is `data_dir`."""
    return tenant_datasets_dir(data_dir, tenant_id) / f"{_name(ds_id, 'dataset id')}.jsonl"


def staged_dataset_path(data_dir: Path, tenant_id: str, ds_id: str) -> Path:
    """Where an upload is streamed before it is validated and renamed to `dataset_path`."""
    return tenant_datasets_dir(data_dir, tenant_id) / f".upload-{_name(ds_id, 'dataset id')}.jsonl"


STAGED_DATASETS_GLOB = "*/.upload-ds_*.jsonl"  # staged uploads of every tenant, under datasets_dir


# ---------------------------------------------------------------- artifact store keys


def run_prefix(job_id: str) -> str:
    return _join("runs", _name(job_id, "job id"))


def adapters_prefix(tenant_id: str) -> str:
    return _join("adapters", _name(tenant_id, "tenant id"))


def dataset_key(tenant_id: str, ds_id: str) -> str:
    """The key of an uploaded dataset: `datasets/<tenant_id>/<ds_id>.jsonl`."""
    return _join("datasets", _name(tenant_id, "tenant id"), f"{_name(ds_id, 'dataset id')}.jsonl")


# ---------------------------------------------------------------- dataset ids in a job's config


def is_dataset_id(value: Any) -> bool:
    return isinstance(value, str) and DATASET_ID.fullmatch(value) is not None


def dataset_refs(config: Any) -> Iterator[tuple[int, str, Any]]:
    """(task index, field, value) of every dataset field a (raw, maybe invalid) config sets."""
    tasks = config.get("tasks") if isinstance(config, dict) else None
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        for field in DATASET_FIELDS if isinstance(task, dict) else ():
            if task.get(field) is not None:
                yield i, field, task[field]


def resolve_datasets(
    config: dict[str, Any],
    data_dir: Path,
    tenant_id: str,
    fetch: Callable[[str, Path], None] | None = None,
) -> dict[str, Any]:
    """A copy of `config` with each dataset id replaced by its file on this host. `fetch(ds_id, path)`
    is called for a file this host lacks (the shared artifact store copies it there); without it a
    missing file is left for the reader to report. Values that are not ids are paths: kept as they are.
    """
    out = copy.deepcopy(config)
    for i, field, ref in dataset_refs(out):
        if is_dataset_id(ref):
            path = dataset_path(data_dir, tenant_id, ref)
            if fetch is not None and not path.exists():
                fetch(ref, path)
            out["tasks"][i][field] = str(path)
    return out
