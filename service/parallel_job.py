"""One job on several devices: the job process launches one rank per device (cltune.distributed, through
accelerate: NCCL on GPUs, gloo on CPU) and relays rank 0's progress and log messages to the worker.

The job process keeps the runner's contract: it talks to the worker through `send`, watches
`should_stop`, and sends one outcome. Ranks get a queue (rank 0's messages) and a stop event (the
training loop makes every rank stop at the same step). Shared-store copies happen only where all ranks
are in step: after each checkpoint (behind a barrier, in the ranks) and once all ranks have exited.

A rank that fails with a domain error (cltune.errors) puts it on the queue as its class name, message and
details ("rank_error"); the job process raises the same class with the same message and details, so the
runner files it as it would a single-process job's (deterministic, not retried).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cltune.errors
from cltune.errors import CLTuneError, StopRequested
from service import layout
from service.job_run import job_callbacks, jsonable, summary

RELAY_POLL_SECONDS = 0.1
RANK_ERROR = "rank_error"  # a message kind the relay keeps for the job process, never sent to the worker


def run_parallel(
    job: dict[str, Any],
    data: dict[str, Any],
    data_dir: Path,
    devices: int,
    send: Callable[[str, dict[str, Any]], None],
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Run the job's config `data` (resolved on this host) on `devices` ranks; return its summary.

    Raises:
        StopRequested: the stop fired; every rank checkpointed at the same step.
        CLTuneError: a rank failed with a domain error (bad data or config: not retried).
        RuntimeError: a rank failed otherwise (retried by the worker).
    """
    from torch.multiprocessing.spawn import ProcessRaisedException

    from cltune.distributed import launch

    ctx = mp.get_context("spawn")
    messages: Any = ctx.Queue()
    stop = ctx.Event()
    done = threading.Event()
    rank_errors: list[dict[str, Any]] = []

    def relay() -> None:
        while True:
            if should_stop():
                stop.set()
            try:
                kind, payload = messages.get(timeout=RELAY_POLL_SECONDS)
            except queue.Empty:
                if done.is_set():
                    return
                continue
            if kind == RANK_ERROR:
                rank_errors.append(payload)
            else:
                send(kind, payload)

    t = threading.Thread(target=relay, name="rank0-relay", daemon=True)
    t.start()
    failed: str | None = None
    try:
        launch(rank_main, devices, job, data, str(data_dir), messages, stop)
    except ProcessRaisedException as e:
        failed = str(e)
    finally:
        done.set()
        t.join()  # drains the queue: a failed rank put its error there before it exited
    if failed is not None:
        raise rank_failure(rank_errors, failed) from None
    run_dir = layout.run_dir(data_dir, job["id"])
    results = json.loads((run_dir / "results.json").read_text())
    progress = json.loads((run_dir / "progress.json").read_text())
    return summary(
        results["tasks"],
        progress["R"],
        results["metrics"],
        progress["adapters"],
        progress["train"],
        run_dir,
        results.get("general"),
    )


def error_message(e: CLTuneError, rank: int) -> dict[str, Any]:
    """A rank's domain error as it crosses the process boundary (picklable, JSON-like)."""
    return {"rank": rank, "type": type(e).__name__, "message": e.message, "details": jsonable(e.details)}


def rebuild_error(payload: dict[str, Any]) -> CLTuneError:
    """The error `error_message` describes: the cltune.errors class of that name (else CLTuneError) with
    the same message and details. The constructor is bypassed: DataError, UnknownNameError, ... build
    their message from their arguments, and the message arrives built."""
    cls = getattr(cltune.errors, str(payload.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, CLTuneError)):
        cls = CLTuneError
    err = cls.__new__(cls)
    CLTuneError.__init__(err, str(payload.get("message", "")), **dict(payload.get("details") or {}))
    return err


def rank_failure(errors: list[dict[str, Any]], text: str) -> Exception:
    """The error of a failed data-parallel run: a rank's domain error (other ranks may have failed only
    because it left the process group), else a stop every rank took, else the traceback text
    (torch's ProcessRaisedException) as a RuntimeError (retried)."""
    failures = [e for e in errors if e.get("type") != StopRequested.__name__]
    stops = [e for e in errors if e.get("type") == StopRequested.__name__]
    for found in (failures, stops):
        if found:
            return rebuild_error(min(found, key=lambda e: int(e.get("rank", 0))))
    return RuntimeError(f"a data-parallel rank failed:\n{text[-4000:]}")


def rank_main(job: dict[str, Any], data: dict[str, Any], data_dir: str, messages: Any, stop: Any) -> None:
    """One rank: cltune's rank entry point (the same continual run as a single-process job) with the
    job's registry, callbacks and data directory; a domain error goes to the job process whole."""
    from cltune.continual import run_continual_rank
    from cltune.distributed import accelerator
    from cltune.registry import Registry
    from service.artifacts import SharedArtifacts

    root = Path(data_dir)
    rank = accelerator().process_index  # joins the group; run_continual_rank's accelerator shares its state
    try:
        shared = SharedArtifacts.open(job, root) if rank == 0 else None  # restored by the job process already

        def send(kind: str, payload: dict[str, Any]) -> None:
            if rank == 0:
                messages.put((kind, payload))

        run_continual_rank(
            data,
            layout.run_dir(root, job["id"]),
            registry=lambda: (
                shared.registry(job["id"])
                if shared
                else Registry(layout.adapters_dir(root, job["tenant_id"]))
            ),
            callbacks=lambda acc: job_callbacks(
                job, len(data["tasks"]), send, stop.is_set, shared, barrier=acc.wait_for_everyone
            ),
            cache_dir=layout.models_dir(root),
            created_by=job["id"],
            resume=True,
        )
    except CLTuneError as e:  # to the job process with its class and details (see rank_failure)
        messages.put((RANK_ERROR, error_message(e, rank)))
        raise
