"""Data-parallel training of one run on several devices (GPUs, or CPU processes on gloo) through accelerate.

`launch(fn, n, *args)` starts n processes (spawn) that form one process group (accelerate picks NCCL on
GPUs, gloo on CPU); `run_sequence_ddp` runs the same continual run, the same training loop
(cltune.train.train_task) on each. Per optimizer step every rank takes its share of the same global batch
(`batch_size` examples split across ranks) and the loop averages gradients across ranks before the
optimizer step, which is what DDP does (DDP's module wrapper is not used: methods call the peft model's
own attributes, which a DistributedDataParallel wrapper would hide). Every rank keeps the same weights,
so rank 0 alone registers adapters and reports progress; each rank checkpoints into its own directory
(rank 0: the run dir, rank r: <run dir>/rank<r>) and resumes from it.

Limits: FSDP is not wired (LoRA adapters are small; the frozen base is replicated per device), and every
rank also runs the evaluation (same numbers on each; it is not split).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cltune.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, fn: Callable[..., Any], n: int, port: int, args: tuple[Any, ...]) -> None:
    # the variables torchrun / `accelerate launch` would set; accelerate reads them in Accelerator()
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(n),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(n),
        }
    )
    fn(*args)


def launch(fn: Callable[..., Any], num_processes: int, *args: Any) -> None:
    """Run `fn(*args)` in `num_processes` spawned processes of one process group on this host.

    `fn` must be importable (a module-level function); it creates `accelerator()` to join the group.
    Raises torch.multiprocessing.ProcessRaisedException when a rank fails.
    """
    import torch.multiprocessing as tmp

    port = free_port()
    tmp.start_processes(
        _rank_main, args=(fn, num_processes, port, args), nprocs=num_processes, start_method="spawn"
    )


def accelerator(cpu: bool | None = None) -> Any:
    """The Accelerator of this rank. cpu=None: CPU (gloo) when no GPU is visible."""
    from accelerate import Accelerator

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(cpu=cpu)


def check_world(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size={batch_size} must be a multiple of the {world} devices of a data-parallel "
            f"run (each device takes batch_size / devices examples per micro-batch)",
            errors=[{"field": "train.batch_size", "message": f"not a multiple of {world}"}],
        )


def average_gradients(params: list[torch.nn.Parameter], acc: Any) -> None:
    """All-reduce (mean) the gradients of `params` across ranks in one flat buffer: DDP's reduction."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numel]: one collective, not one per tensor
    flat = acc.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def rank_run_dir(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) if rank == 0 else Path(run_dir) / f"rank{rank}"


def run_sequence_ddp(
    cfg_json: dict[str, Any], run_dir: str, registry_root: str | None, kw: dict[str, Any]
) -> None:
    """One rank of `run_sequence` (launch it with `launch(run_sequence_ddp, n, ...)`). `kw` holds
    run_sequence's other arguments; `kw["callbacks"]` (rank 0 only) may be picklable callables."""
    from cltune.config import parse_config
    from cltune.registry import Registry
    from cltune.sequence import run_sequence
    from cltune.train import Callbacks

    acc = accelerator()
    cfg = parse_config(cfg_json)
    check_world(cfg.train.batch_size, acc.num_processes)
    if cfg.model.device == "auto":  # one device per rank: cuda:<local rank>, or cpu
        cfg.model.device = "cpu" if acc.device.type == "cpu" else f"cuda:{acc.local_process_index}"
    main = acc.process_index == 0
    cb = kw.pop("callbacks", None) if main else None
    if not main:
        kw.pop("callbacks", None)
    run_sequence(
        cfg,
        rank_run_dir(run_dir, acc.process_index),
        registry=Registry(registry_root) if main and registry_root else None,
        callbacks=cb or Callbacks(),
        accelerator=acc,
        **kw,
    )
    acc.wait_for_everyone()
    acc.end_training()
