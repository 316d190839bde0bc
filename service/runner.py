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

Only this module writes trained adapters (through cltune.sequence.run_sequence and the tenant's Registry);
the API imports adapters trained elsewhere (POST /v1/adapters, cltune.adapter_import).
Top-level imports are stdlib only: the noop job starts in milliseconds, torch loads only for training.
"""

from __future__ import annotations

import copy
import faulthandler
import math
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

DEFAULT_CHECKPOINT_EVERY = 10  # optimizer steps between checkpoints when the job sets none (0)
CRASH_LOG = "crash.log"
Send = Callable[[str, dict[str, Any]], None]


def run_dir_of(data_dir: Path, job_id: str) -> Path:
    return data_dir / "runs" / job_id


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
    run_dir = run_dir_of(Path(data_dir), job["id"])
    run_dir.mkdir(parents=True, exist_ok=True)
    crash = (run_dir / CRASH_LOG).open("w")
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
    sent = ((job.get("spec") or {}).get("config") or {}).get("tasks") or []
    resolved = (job.get("config") or {}).get("tasks") or []
    for given, used in zip(sent, resolved, strict=False):
        for f in ("train", "eval", "retain") if isinstance(given, dict) and isinstance(used, dict) else ():
            if isinstance(given.get(f), str) and isinstance(used.get(f), str) and used[f]:
                text = text.replace(used[f], given[f])
    for root in sorted({str(data_dir.resolve()), str(data_dir.absolute())}, key=len, reverse=True):
        text = text.replace(root + os.sep, "").replace(root, ".")
    return text


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

    With a shared artifact store the run directory, the tenant's adapters and missing datasets are
    restored first and copied back after every checkpoint, so the next attempt may run on another
    host. `job["devices"]` > 1: one data-parallel run over that many devices (service/parallel_job.py).
    """
    from cltune.config import parse_config  # late: torch and transformers load only here
    from cltune.registry import Registry
    from cltune.sequence import run_sequence
    from service.artifacts import SharedArtifacts

    data = copy.deepcopy(job["config"])
    train = data.setdefault("train", {})
    if not train.get("checkpoint_every"):  # a service job must survive its worker: checkpoint periodically
        train["checkpoint_every"] = DEFAULT_CHECKPOINT_EVERY
    shared = SharedArtifacts.open(job, data_dir)  # None on a single host: nothing is copied
    if shared is not None:
        data = shared.restore(data)  # the run dir, the tenant's adapters, missing datasets
    cfg = parse_config(data)
    devices = int(job.get("devices") or 1)
    try:
        if devices > 1:
            from service.parallel_job import run_parallel

            result = run_parallel(job, data, data_dir, devices, send, should_stop)
        else:
            res = run_sequence(
                cfg,
                run_dir_of(data_dir, job["id"]),
                registry=(
                    shared.registry(job["id"])
                    if shared is not None
                    else Registry(data_dir / "adapters" / job["tenant_id"])
                ),
                callbacks=job_callbacks(job, len(cfg.tasks), send, should_stop, shared),
                cache_dir=data_dir / "models",
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
        send("event", {"level": level, "type": kind, "message": message, "data": _jsonable(extra)})
        if shared is not None and barrier is None:  # quiet points: copy what changed
            shared.save()

    def on_checkpoint(step: int) -> None:
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
    return _jsonable(
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


def run_noop(
    job: dict[str, Any], data_dir: Path, send: Send, should_stop: Callable[[], bool]
) -> dict[str, Any]:
    """A smoke-test job that loads no model: checks a worker, the store and the events end to end.

    spec: {"kind": "noop", "steps": 1, "step_seconds": 0.0, "ignore_stop": false,
           "fail": "<message>" (raise), "crash": "exit" | "segfault" (die without a word)}
    Each execution appends one line to <run_dir>/noop.log, so tests can count executions.
    """
    spec = job["spec"]
    run_dir = run_dir_of(data_dir, job["id"])
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


def _jsonable(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> float, anything else (Paths) -> str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | int) and not isinstance(x, bool) and not math.isfinite(x):
        return None  # NaN/inf are not JSON (PostgreSQL's json type rejects them)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    try:
        return _jsonable(float(x))
    except (TypeError, ValueError):
        return str(x)
