"""One job on several devices: the job process launches one rank per device (cltune.distributed, through
accelerate: NCCL on GPUs, gloo on CPU) and relays rank 0's progress and log messages to the worker.

The job process keeps the runner's contract: it talks to the worker through `send`, watches
`should_stop`, and sends one outcome. Ranks get a queue (rank 0's messages) and a stop event (the
training loop makes every rank stop at the same step). Shared-store copies happen only where all ranks
are in step: after each checkpoint (behind a barrier, in the ranks) and once all ranks have exited.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cltune.errors import CLTuneError, StopRequested

RELAY_POLL_SECONDS = 0.1


def run_parallel(
    job: dict[str, Any],
    data: dict[str, Any],
    data_dir: Path,
    devices: int,
    send: Callable[[str, dict[str, Any]], None],
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Run the job's (already restored) config `data` on `devices` ranks; return the runner's summary.

    Raises:
        StopRequested: the stop fired; every rank checkpointed at the same step.
        CLTuneError: a rank failed with a domain error (bad data or config: not retried).
        RuntimeError: a rank failed otherwise (retried by the worker).
    """
    import torch.multiprocessing as tmp

    from cltune.distributed import launch
    from service.runner import run_dir_of, summary

    ctx = mp.get_context("spawn")
    messages: Any = ctx.Queue()
    stop = ctx.Event()
    done = threading.Event()

    def relay() -> None:
        while True:
            if should_stop():
                stop.set()
            try:
                kind, payload = messages.get(timeout=RELAY_POLL_SECONDS)
                send(kind, payload)
            except queue.Empty:
                if done.is_set():
                    return

    t = threading.Thread(target=relay, name="rank0-relay", daemon=True)
    t.start()
    try:
        launch(rank_main, devices, job, data, str(data_dir), messages, stop)
    except tmp.ProcessRaisedException as e:
        raise _domain_error(str(e), stop.is_set()) from None
    finally:
        done.set()
        t.join()
    run_dir = run_dir_of(data_dir, job["id"])
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


def _domain_error(text: str, stopping: bool) -> Exception:
    """A rank's exception arrives as its traceback text: rebuild the error the runner knows how to file."""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    m = re.match(r"cltune\.errors\.(\w+): (.*)", last)
    if m and m.group(1) == "StopRequested" or (stopping and "StopRequested" in text):
        step = re.search(r"stopped at step (\d+)", text)
        return StopRequested(m.group(2) if m else "stopped", step=int(step.group(1)) if step else None)
    if m:
        return CLTuneError(f"{m.group(1)}: {m.group(2)}")
    return RuntimeError(f"a data-parallel rank failed:\n{text[-4000:]}")


def rank_main(job: dict[str, Any], data: dict[str, Any], data_dir: str, messages: Any, stop: Any) -> None:
    """One rank: the same run_sequence as a single-process job, with this rank's accelerator."""
    from cltune.config import parse_config
    from cltune.distributed import accelerator, check_world, rank_run_dir
    from cltune.registry import Registry
    from cltune.sequence import run_sequence
    from service.artifacts import SharedArtifacts
    from service.runner import job_callbacks, run_dir_of

    acc = accelerator()
    cfg = parse_config(data)
    check_world(cfg.train.batch_size, acc.num_processes)
    if cfg.model.device == "auto":  # one device per rank
        cfg.model.device = "cpu" if acc.device.type == "cpu" else f"cuda:{acc.local_process_index}"
    main = acc.process_index == 0
    root = Path(data_dir)
    shared = SharedArtifacts.open(job, root) if main else None  # restored by the job process already

    def send(kind: str, payload: dict[str, Any]) -> None:
        if main:
            messages.put((kind, payload))

    run_sequence(
        cfg,
        rank_run_dir(run_dir_of(root, job["id"]), acc.process_index),
        registry=(shared.registry(job["id"]) if shared else Registry(root / "adapters" / job["tenant_id"]))
        if main
        else None,
        callbacks=job_callbacks(
            job, len(cfg.tasks), send, stop.is_set, shared, barrier=acc.wait_for_everyone
        ),
        cache_dir=root / "models",
        created_by=job["id"],
        resume=True,
        accelerator=acc,
    )
    acc.wait_for_everyone()
