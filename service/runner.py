"""Runs ONE job inside a child process started by the worker (multiprocessing "spawn").

The child never touches the database: it sends messages up a one-way Pipe and the parent worker
writes them. Why: the parent holds the lease, so only a lease owner can write (a child orphaned
from a dead worker cannot scribble on a job another worker has re-claimed); the child needs no DB
driver or connection pool (SQLite has one writer less to queue behind); and a child that dies
mid-message only costs that message (the parent reads EOF and knows the child is gone).

Messages, each a tuple (kind, payload dict):
    ("event", {level, type, message, data})   a log or eval line
    ("progress", {task, step, total_steps, loss, parts, tokens_per_s, eta_s, ...})
    ("result", {...})     the job succeeded
    ("stopped", {step})   the cooperative stop fired; a checkpoint was written
    ("error", {error, traceback, retry})
A crash (os._exit, segfault, OOM kill) sends nothing: the parent sees EOF and the exit code, and
the Python stacks that faulthandler wrote to <run_dir>/crash.log.

Only this module writes trained adapters (through cltune.continual.run_continual and the tenant's Registry);
the API imports adapters trained elsewhere (POST /v1/adapters, cltune.adapter_import).
Top-level imports are stdlib only: the noop job starts in milliseconds, torch loads only for training.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cltune.errors import CLTuneError, StopRequested
from service import layout
from service.job_run import Send, job_callbacks, local_config, summary

DEFAULT_CHECKPOINT_EVERY = 10  # optimizer steps between checkpoints when the job sets none (0)


def child_main(
    job: dict[str, Any], data_dir: str, conn: Connection, stop: Any, device: int | str | None
) -> None:
    """Entry point of the job process. `stop` is a multiprocessing Event the parent sets to cancel;
    `device` picks the job's GPUs (CUDA_VISIBLE_DEVICES: "2", or "0,1" for a data-parallel job)."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)  # before torch is imported
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C hits the whole process group: the worker
        signal.signal(sig, signal.SIG_IGN)  # decides (cooperative stop, then SIGKILL), not the child
    _exit_with_parent()
    run_dir = layout.run_dir(Path(data_dir), job["id"])
    run_dir.mkdir(parents=True, exist_ok=True)
    crash = layout.crash_log(Path(data_dir), job["id"]).open("w")
    faulthandler.enable(crash, all_threads=True)  # Python stacks on SIGSEGV/SIGABRT/SIGBUS/SIGFPE
    try:
        execute(job, Path(data_dir), lambda kind, payload: conn.send((kind, payload)), stop.is_set)
    finally:
        conn.close()


# Errors that another attempt would meet again: bad data or config (CLTuneError), and the value and
# type errors that libraries raise for them (peft: target modules not found; tokenizers: bad text).
# Anything else (CUDA OOM, I/O, a lost connection) may be transient and is retried while attempts last.
DETERMINISTIC: tuple[type[BaseException], ...] = (
    CLTuneError,
    ValueError,
    TypeError,
    LookupError,
    NotImplementedError,
)


def execute(job: dict[str, Any], data_dir: Path, send: Send, should_stop: Callable[[], bool]) -> None:
    """Run the job and send exactly one outcome message (result | stopped | error)."""
    try:
        send("result", run_job(job, data_dir, send, should_stop))
    except StopRequested as e:
        send("stopped", {"message": e.message, "step": e.details.get("step")})
    except Exception as e:
        error = f"{e.kind}: {e.message}" if isinstance(e, CLTuneError) else f"{type(e).__name__}: {e}"
        send(
            "error",
            {
                "error": public_text(error, job, data_dir),
                "traceback": public_text(traceback.format_exc(), job, data_dir),
                "retry": not isinstance(e, DETERMINISTIC),
            },
        )


def public_text(text: str, job: dict[str, Any], data_dir: Path) -> str:
    """`text` as the tenant may read it: each dataset file named by its id (as the job was submitted),
    other paths under the data directory relative to it. The host's own layout is none of its business."""
    for path, shown in _dataset_names(job, data_dir):
        text = text.replace(path, shown)
    for root in sorted({str(data_dir.resolve()), str(data_dir.absolute())}, key=len, reverse=True):
        text = text.replace(root + os.sep, "").replace(root, ".")
    return text


def _dataset_names(job: dict[str, Any], data_dir: Path) -> list[tuple[str, str]]:
    """(path, what the tenant sent) for each dataset file the job reads on this host."""
    config, sent_config = job.get("config"), (job.get("spec") or {}).get("config")
    if not isinstance(config, dict) or not job.get("tenant_id"):
        return []
    try:
        local = layout.dataset_refs(local_config(job, data_dir))
    except CLTuneError:  # e.g. an invalid tenant id: the error being reported says so already
        return []
    sent = {(i, f): v for i, f, v in layout.dataset_refs(sent_config)}
    out = []
    for (i, f, ref), (_, _, used) in zip(layout.dataset_refs(config), local, strict=True):
        shown = sent.get((i, f), ref)  # as sent; else as stored (an id, or a library job's path)
        if isinstance(shown, str):
            out += [(p, shown) for p in (ref, used) if isinstance(p, str) and p and p != shown]
    return out


def _exit_with_parent() -> None:
    """If the worker dies (SIGKILL), its job process must not train on: a re-claimed attempt will
    resume from the same run directory. Poll the parent pid and exit when it changes."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def run_job(
    job: dict[str, Any], data_dir: Path, send: Send, should_stop: Callable[[], bool]
) -> dict[str, Any]:
    """Run the job's kind ("train", the default, or "noop") and return its result."""
    kind = job["spec"].get("kind", "train")
    if kind == "noop":
        return run_noop(job, data_dir, send, should_stop)
    return run_training(job, data_dir, send, should_stop)


def run_training(
    job: dict[str, Any], data_dir: Path, send: Send, should_stop: Callable[[], bool]
) -> dict[str, Any]:
    """A continual run over the job's RunConfig, resumable from <data_dir>/runs/<job_id>.

    The job's config names uploaded datasets by id: they are resolved to files on this host (layout).
    With a shared artifact store the run directory and the tenant's adapters are restored first, dataset
    files this host lacks are fetched, and the run is copied back after every checkpoint, so the next
    attempt may run on another host. `job["devices"]` > 1: one data-parallel run over that many devices
    (service/parallel_job.py).
    """
    from cltune.config import parse_config  # late: torch and transformers load only here
    from cltune.continual import run_continual
    from cltune.registry import Registry
    from service.artifacts import SharedArtifacts

    shared = SharedArtifacts.open(job, data_dir)  # None on a single host: nothing is copied
    if shared is not None:
        shared.restore()  # the run dir and the tenant's adapters
    data = local_config(job, data_dir, shared.fetch_dataset if shared is not None else None)
    run_dir = layout.run_dir(data_dir, job["id"])  # a run begun on another host resumes: cltune knows
    # a run by its datasets' content, not by the paths each host resolved the ids to
    train = data.setdefault("train", {})
    if not train.get("checkpoint_every"):  # a service job must survive its worker: checkpoint periodically
        train["checkpoint_every"] = DEFAULT_CHECKPOINT_EVERY
    cfg = parse_config(data)
    devices = int(job.get("devices") or 1)
    try:
        if devices > 1:
            from service.parallel_job import run_parallel

            result = run_parallel(job, data, data_dir, devices, send, should_stop)
        else:
            res = run_continual(
                cfg,
                run_dir,
                registry=(
                    shared.registry(job["id"])
                    if shared is not None
                    else Registry(layout.adapters_dir(data_dir, job["tenant_id"]))
                ),
                callbacks=job_callbacks(job, len(cfg.tasks), send, should_stop, shared),
                cache_dir=layout.models_dir(data_dir),
                created_by=job["id"],
                resume=True,
            )
            result = summary(res.tasks, res.R, res.metrics, res.adapters, res.train, res.run_dir, res.general)
    except BaseException:  # stopped (its checkpoint) or failed: the next attempt may run on another host
        if shared is not None:
            try:
                shared.save()
            except Exception as e:  # keep the job's own error; the last snapshot still stands
                msg = f"could not copy the run to the artifact store: {e}"
                send("event", {"level": "warning", "type": "log", "message": msg, "data": {}})
        raise
    if shared is not None:
        shared.save()  # the finished run and its adapters
    return result


def run_noop(
    job: dict[str, Any], data_dir: Path, send: Send, should_stop: Callable[[], bool]
) -> dict[str, Any]:
    """A smoke-test job that loads no model: checks a worker, the store and the events end to end.

    spec: {"kind": "noop", "steps": 1, "step_seconds": 0.0, "ignore_stop": false,
           "fail": "<message>" (raise), "crash": "exit" | "segfault" (die without a word)}
    Each execution appends one line to <run_dir>/noop.log, so tests can count executions.
    """
    spec = job["spec"]
    run_dir = layout.run_dir(data_dir, job["id"])
    with (run_dir / "noop.log").open("a") as f:
        f.write(f"pid={os.getpid()} attempt={job['attempts']}\n")
    steps, pause = int(spec.get("steps", 1)), float(spec.get("step_seconds", 0.0))
    for step in range(steps):
        if should_stop() and not spec.get("ignore_stop"):
            raise StopRequested(f"stopped at step {step}", step=step)
        if spec.get("crash") == "exit" and step == steps // 2:
            os._exit(70)
        if spec.get("crash") == "segfault" and step == steps // 2:
            os.kill(os.getpid(), signal.SIGSEGV)
        if spec.get("fail") and step == steps // 2:
            raise RuntimeError(spec["fail"])
        time.sleep(pause)
        send("progress", {"task": "noop", "step": step + 1, "total_steps": steps, "attempt": job["attempts"]})
    return {"steps": steps, "pid": os.getpid()}
