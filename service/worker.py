"""The worker: claims jobs, one per device, and runs each in its own child process.

Per job a supervisor thread in this process starts the child (multiprocessing "spawn": no forked
CUDA or lock state), writes the child's progress and log messages as events, renews the lease every
`heartbeat_seconds`, polls for a cancel twice a second, and decides the outcome when the child ends:
result -> succeeded; stopped after a cancel -> cancelled; error -> failed or re-queued (traceback
stored); a crash (segfault, OOM kill, os._exit) -> re-queued while attempts last, then failed with the
exit code and the faulthandler stacks. Nothing a job does can take the worker down.

On SIGTERM/SIGINT the worker stops claiming, asks its children to stop (they checkpoint) and puts their
jobs back in the queue without spending an attempt.

While it runs, a Deliverer thread (service/webhooks.py) sends the webhooks of ended jobs: its POSTs
never hold up the claim loop or a supervisor, however slow a receiver is.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from service import layout, runner, store, webhooks
from service.artifacts import artifact_settings
from service.db import init_db, make_engine
from service.settings import Settings, get_settings

log = logging.getLogger("cltune.worker")
CANCEL_POLL_SECONDS = 0.5  # a cancel request is seen within this (a cheap read), heartbeats are rarer
EXIT_WAIT_SECONDS = 30.0  # a child that sent its outcome (or closed its pipe) is killed if still alive then


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"


@dataclass
class _Outcome:
    kind: str | None = None  # result | stopped | error | None (the child died without a word)
    payload: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None  # cancel | shutdown: why we asked the child to stop
    killed: bool = False  # hard-killed after the grace period
    lease_lost: bool = False


class Worker:
    """`Worker(settings).run()` processes jobs until stopped; `run(burst=True)` until the queue is empty."""

    def __init__(
        self,
        settings: Settings,
        worker_id: str | None = None,
        devices: int = 1,
        poll_seconds: float = 1.0,
        isolate: bool = True,
        devices_per_job: int | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.devices = devices
        self.devices_per_job = devices_per_job or settings.devices_per_job  # > 1: data-parallel jobs
        self.slots = max(1, devices // self.devices_per_job)  # jobs at once; slot k owns GPUs k*n..k*n+n-1
        self.poll_seconds = poll_seconds
        self.isolate = isolate  # False: jobs run in a thread here (no crash isolation, no hard kill)
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)  # the SQLite file and runs/ live here
        self.engine = make_engine(settings.db_url)
        self.stopping = threading.Event()  # graceful shutdown: stop claiming, hand running jobs back
        self._ended: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # slots of ended jobs; None: wake up
        self._ctx = mp.get_context("spawn")
        self.deliverer: webhooks.Deliverer | None = None  # sends webhooks while run() runs

    def stop(self) -> None:
        self.stopping.set()
        self._ended.put(None)

    def run(self, burst: bool = False, max_jobs: int | None = None) -> int:
        """Claim and run jobs. `burst`: return once nothing is queued and nothing runs;
        `max_jobs`: return after that many claims have finished. Returns the number of jobs run."""
        restore = self._install_signal_handlers()
        self.deliverer = deliverer = webhooks.Deliverer(self.engine, self.settings).start()
        running: dict[int, threading.Thread] = {}  # device slot -> supervisor
        claimed = 0
        next_requeue = 0.0
        try:
            while not self.stopping.is_set():
                if time.monotonic() >= next_requeue:  # jobs of dead workers go back to the queue
                    self._safe(store.requeue_expired, self.engine)
                    next_requeue = time.monotonic() + min(self.settings.lease_seconds / 2, 10.0)
                free = [s for s in range(self.slots) if s not in running]
                may_claim = max_jobs is None or claimed < max_jobs
                job = (
                    self._safe(store.claim, self.engine, self.worker_id, self.settings.lease_seconds)
                    if free and may_claim
                    else None
                )
                if job is not None:
                    claimed += 1
                    t = threading.Thread(target=self._supervise, args=(job, free[0]), name=f"job-{job.id}")
                    running[free[0]] = t
                    t.start()
                    continue
                if not running and (burst or not may_claim):
                    break
                try:  # sleep until a job ends (claim again at once) or the poll interval passes
                    ended = self._ended.get(timeout=self.poll_seconds)
                    while True:
                        if ended is not None:
                            running.pop(ended).join()
                        ended = self._ended.get_nowait()
                except queue.Empty:
                    pass
        finally:
            if running:
                self.stopping.set()  # an error or a signal: supervisors hand their jobs back
            for t in running.values():
                t.join()
            deliverer.stop()  # not waited for: a POST in flight finishes on its own (daemon thread)
            restore()
        return claimed

    # ------------------------------------------------------------ one job

    def _supervise(self, job: store.Job, slot: int) -> None:
        proc = None
        try:
            proc, out = self._run_child(job, slot)
            self._settle(job, out)  # at once: a child's slow exit (torch teardown) must not outlive the lease
        except store.LeaseLost as e:
            log.warning("job %s: %s", job.id, e)
        except Exception:  # the worker must survive anything a job or the database does
            log.exception("job %s: supervisor failed", job.id)
        finally:
            if proc is not None:  # the slot is free only once the child is gone (its GPU memory too)
                proc.join(EXIT_WAIT_SECONDS)
                if proc.is_alive():
                    log.warning(
                        "job %s: the child did not exit %ss after its outcome; killing it",
                        job.id,
                        EXIT_WAIT_SECONDS,
                    )
                    proc.kill()
                    proc.join()
            self._ended.put(slot)

    def _run_child(self, job: store.Job, slot: int) -> tuple[Any, _Outcome]:
        """Start the child and relay its messages until it closes the pipe; heartbeat and relay cancel."""
        s = self.settings
        recv, send = self._ctx.Pipe(duplex=False)
        stop = self._ctx.Event()
        payload = {
            "id": job.id,
            "tenant_id": job.tenant_id,
            "spec": job.spec,
            "config": job.config,
            "attempts": job.attempts,
            "artifacts": artifact_settings(s),  # the child opens the same shared store (if any)
            "devices": self.devices_per_job,
        }
        n = self.devices_per_job
        device = ",".join(str(slot * n + i) for i in range(n)) if self.devices > 1 or n > 1 else None
        proc: Any
        if self.isolate:
            proc = self._ctx.Process(
                target=runner.child_main,
                args=(payload, str(s.data_dir), send, stop, device),
                name=f"cltune-job-{job.id}",
                daemon=True,
            )
        else:
            proc = _InProcess(payload, s.data_dir, send, stop)
        proc.start()
        if self.isolate:
            send.close()  # our copy: once the child's end closes, recv() raises EOFError
        out = _Outcome()
        now = time.monotonic()
        next_beat, next_poll, kill_at = now + s.heartbeat_seconds, now + CANCEL_POLL_SECONDS, None
        try:
            while True:
                if recv.poll(0.1):
                    try:
                        kind, data = recv.recv()
                    except (EOFError, OSError):
                        break  # the child exited (or died)
                    self._handle(job, kind, data, out)
                elif not proc.is_alive() and not recv.poll(0):
                    break
                now = time.monotonic()
                cancel = False
                if now >= next_beat:
                    cancel = bool(
                        self._safe(store.heartbeat, self.engine, job.id, self.worker_id, s.lease_seconds)
                    )
                    next_beat = now + s.heartbeat_seconds
                elif now >= next_poll and out.stop_reason is None:
                    cancel = bool(self._safe(store.is_cancel_requested, self.engine, job.id))
                    next_poll = now + CANCEL_POLL_SECONDS
                if out.stop_reason is None and (cancel or self.stopping.is_set()):
                    out.stop_reason = "cancel" if cancel else "shutdown"
                    stop.set()  # cooperative: the training loop checks it before every step
                    kill_at = now + s.cancel_grace_seconds
                if kill_at is not None and now >= kill_at and proc.is_alive():
                    log.warning(
                        "job %s: no stop after %.1fs, killing the child", job.id, s.cancel_grace_seconds
                    )
                    proc.kill()
                    out.killed, kill_at = True, None
        except store.LeaseLost:
            out.lease_lost = True
            proc.kill()  # another worker owns the job now; this attempt must not go on
        finally:
            recv.close()
        if out.kind is None:  # no outcome: the child died; its exit code says how
            proc.join(EXIT_WAIT_SECONDS)
            out.payload["exitcode"] = proc.exitcode
        return proc, out

    def _handle(self, job: store.Job, kind: str, data: dict[str, Any], out: _Outcome) -> None:
        if kind == "progress":
            msg = f"{data.get('task')} step {data.get('step')}/{data.get('total_steps')}"
            if isinstance(data.get("loss"), float):
                msg += f" loss {data['loss']:.4f}"
            self._safe(store.report_progress, self.engine, job.id, self.worker_id, data, msg)
        elif kind == "event":
            self._safe(
                store.add_event,
                self.engine,
                job.id,
                data["level"],
                data["type"],
                data["message"],
                data["data"],
            )
        else:
            out.kind, out.payload = kind, data

    def _settle(self, job: store.Job, out: _Outcome) -> None:
        """Write the attempt's outcome (LeaseLost propagates: then another worker owns the job)."""
        e, wid = self.engine, self.worker_id
        if out.lease_lost:
            log.warning("job %s: lease lost; the child was killed", job.id)
        elif out.kind == "result":
            store.finish(e, job.id, wid, out.payload)
        elif out.stop_reason == "cancel" and out.kind in ("stopped", None):
            how = (
                "killed after the grace period"
                if out.killed
                else f"stopped at step {out.payload.get('step')}"
            )
            store.mark_cancelled(e, job.id, wid, f"cancelled while running: {how}")
        elif out.stop_reason == "shutdown" and out.kind in ("stopped", None):
            store.release(e, job.id, wid, "worker shutting down")
        elif out.kind == "error":
            store.fail(
                e, job.id, wid, out.payload["error"], out.payload.get("traceback"), out.payload["retry"]
            )
        else:
            code = out.payload.get("exitcode")
            why = (
                f"signal {signal.Signals(-code).name}"
                if isinstance(code, int) and code < 0
                else f"exit code {code}"
            )
            crash = layout.crash_log(Path(self.settings.data_dir), job.id)
            stacks = crash.read_text(errors="replace").strip() if crash.exists() else ""
            store.fail(e, job.id, wid, f"the job process died ({why})", stacks or None, retry=True)

    # ------------------------------------------------------------ plumbing

    def _safe(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a store function; a database hiccup is logged and retried next round, not fatal.
        LeaseLost is not a hiccup: it propagates."""
        try:
            return fn(*args)
        except SQLAlchemyError:
            log.exception("database error in %s", fn.__name__)
            return None

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # embedded in a server thread: the server handles signals
        old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in old:
            signal.signal(sig, lambda *_: self.stop())

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)

        return restore


class _InProcess:
    """The subset of multiprocessing.Process the supervisor uses, for a job run in a thread: quick,
    trusted jobs (the noop smoke test) where a process start would cost more than the job."""

    def __init__(self, job: dict[str, Any], data_dir: Path, send: Any, stop: Any) -> None:
        self.exitcode: int | None = None

        def target() -> None:
            try:
                layout.run_dir(data_dir, job["id"]).mkdir(parents=True, exist_ok=True)
                runner.execute(job, data_dir, lambda kind, payload: send.send((kind, payload)), stop.is_set)
            finally:
                send.close()
                self.exitcode = 0

        self._thread = threading.Thread(target=target, name=f"job-run-{job['id']}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> None:
        log.error("a job running in-process cannot be killed; it ends when it next checks should_stop")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    """`cltune worker [--burst] [--max-jobs N] [--devices N] [--id ID]`: settings from CLTUNE_* env."""
    p = argparse.ArgumentParser(prog="cltune worker", description="claim and run training jobs")
    p.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    p.add_argument(
        "--devices", type=int, default=1, help="GPUs this worker drives (one job per GPU by default)"
    )
    p.add_argument(
        "--devices-per-job",
        type=int,
        default=None,
        help="train each job data-parallel on this many of them (accelerate; default CLTUNE_DEVICES_PER_JOB or 1)",
    )
    p.add_argument("--id", dest="worker_id", default=None, help="worker id (default host:pid:rand)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between claims when idle")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run jobs in a thread of the worker (no crash isolation; for quick smoke-test jobs)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings or get_settings()
    worker = Worker(
        settings,
        args.worker_id,
        args.devices,
        args.poll,
        isolate=not args.in_process,
        devices_per_job=args.devices_per_job,
    )
    init_db(worker.engine)
    log.info("worker %s on %s", worker.worker_id, worker.engine.url.render_as_string(hide_password=True))
    n = worker.run(burst=args.burst, max_jobs=args.max_jobs)
    log.info("worker %s stopped after %d jobs", worker.worker_id, n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
