"""What a job process and its data-parallel ranks share (service/runner.py, service/parallel_job.py):
the job's config as this host runs it (dataset ids resolved to its files), the training callbacks that report to the worker, and the
job's result. Neither of those modules imports the other for these.

Top-level imports are stdlib only (see service/runner.py: the noop job starts in milliseconds).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

from service import layout

Send = Callable[[str, dict[str, Any]], None]


def local_config(
    job: dict[str, Any], data_dir: Path, fetch: Callable[[str, Path], None] | None = None
) -> dict[str, Any]:
    """The job's config with each dataset id replaced by its file on this host (`fetch(ds_id, path)`:
    copy a file this host lacks from the shared store). The stored config keeps the ids.

    A job queued before configs kept ids holds the submitting host's paths; where such a path is not
    on this host, the id the request named in the same place (spec.config) is resolved instead.
    """
    config = copy.deepcopy(job["config"])
    sent = {(i, f): v for i, f, v in layout.dataset_refs((job.get("spec") or {}).get("config"))}
    for i, f, ref in layout.dataset_refs(config):
        given = sent.get((i, f))
        legacy = isinstance(ref, str) and not layout.is_dataset_id(ref) and layout.is_dataset_id(given)
        if legacy and not Path(ref).exists():
            config["tasks"][i][f] = given
    return layout.resolve_datasets(config, data_dir, job["tenant_id"], fetch)


def job_callbacks(
    job: dict[str, Any],
    n_tasks: int,
    send: Send,
    should_stop: Callable[[], bool],
    shared: Any = None,
    barrier: Callable[[], None] | None = None,
) -> Any:
    """The training callbacks of a job: progress and log messages to the worker; with a shared store
    (`shared`: service.artifacts.SharedArtifacts) a copy after every checkpoint and, on one process,
    at every log line (task ends, registered adapters). `barrier` (data-parallel ranks): every rank
    has written its checkpoint before the copy, and log lines copy nothing (ranks are not in step there).
    """
    from cltune.train import Callbacks, Progress

    def on_progress(p: Progress) -> None:
        send(
            "progress",
            {
                "task": p.task,
                "task_index": p.task_index,
                "tasks": n_tasks,
                "step": p.step,
                "total_steps": p.total_steps,
                "loss": p.loss,
                "parts": p.parts,
                "lr": p.lr,
                "tokens_per_s": p.tokens_per_s,
                "eta_s": p.eta_s,
                "attempt": job["attempts"],
            },
        )

    def log(message: str, level: str = "info", **extra: Any) -> None:
        kind = "eval" if "score" in extra or "row" in extra else "log"
        send("event", {"level": level, "type": kind, "message": message, "data": jsonable(extra)})
        if shared is not None and barrier is None:  # quiet points: copy what changed
            shared.save()

    def on_checkpoint(_step: int) -> None:
        if barrier is not None:
            barrier()
        if shared is not None:
            shared.save()

    return Callbacks(should_stop=should_stop, on_progress=on_progress, log=log, on_checkpoint=on_checkpoint)


def summary(
    tasks: list[str],
    R: list[list[float]],
    metrics: dict[str, Any],
    records: list[dict[str, Any]],
    train: list[dict[str, Any]],
    run_dir: Path,
    general: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job's result: scores, CL metrics and the adapters it registered."""
    adapters = [
        {
            "name": a["name"],
            "version": a["version"],
            "ref": f"{a['name']}@{a['version']}",
            "task": a.get("task"),
            "score": a.get("metrics", {}).get("score"),
        }
        for a in records
    ]
    return jsonable(
        {
            "tasks": tasks,
            "R": R,
            "metrics": metrics,
            "adapters": adapters,
            "train": train,
            "general": general or {},
            "run_dir": str(run_dir),
        }
    )


@overload
def jsonable(x: dict[Any, Any]) -> dict[str, Any]: ...
@overload
def jsonable(x: object) -> Any: ...


def jsonable(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> float, anything else (Paths) -> str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float | int) and not isinstance(x, bool) and not math.isfinite(x):
        return None  # NaN/inf are not JSON (PostgreSQL's json type rejects them)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    try:
        return jsonable(float(x))
    except (TypeError, ValueError):
        return str(x)
