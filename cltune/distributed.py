"""Data-parallel training of one run on several devices (GPUs, or CPU processes on gloo) through accelerate.

`launch(fn, n, *args)` starts n processes (spawn) that form one process group (accelerate picks NCCL on
GPUs, gloo on CPU); `cltune.continual.run_continual_rank` runs the same continual run, the same training
loop (cltune.train.train_task) on each. This module holds the helpers only (process group, accelerator,
sharding, gradient averaging); it imports neither the continual run nor the loop. Per optimizer step
every rank takes its share of the same global batch (`batch_size` examples split across ranks) and the
loop averages gradients across ranks before the optimizer step, which is what DDP does (DDP's module
wrapper is not used: methods call the peft model's own attributes, which a DistributedDataParallel
wrapper would hide). Every rank keeps the same weights, so rank 0 alone registers adapters and reports
progress; each rank checkpoints into its own directory (rank 0: the run dir, rank r: <run dir>/rank<r>)
and resumes from it.

`train.sharding: fsdp` shards the frozen base too (`shard_frozen_layers`): every decoder layer becomes an
FSDP2 unit (torch's `fully_shard`) whose frozen weights are split across the ranks and gathered for the
layer's forward and backward only, so each device holds about 1/N of the decoder. Adapter tensors (and
anything else that trains) are left out of the sharding (`ignored_params`): they stay whole on every
rank, their gradients are averaged as above, and every method's hooks (EMA, DEMA's per-tensor norms,
checkpoints, the registry) see ordinary tensors. Embeddings, the final norm and the lm_head stay
replicated (a few percent of a large model), which keeps the answer-only lm_head of the training losses.
Every rank also runs the evaluation (same numbers on each; it is not split) — in step, which sharded
layers need, since each of their forwards is a collective.
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
    from torch.multiprocessing.spawn import start_processes

    port = free_port()
    start_processes(  # type: ignore[no-untyped-call]
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


def shard_frozen_layers(model: torch.nn.Module, acc: Any) -> int:
    """Shard every decoder layer's frozen weights across the ranks (FSDP2); trainable tensors and all
    LoRA tensors stay whole. Idempotent: layers sharded before are skipped. Returns how many it sharded.

    Call it after the method's `prepare` (KappaTune's selection reads the full base weights first);
    adapters attached later are never sharded (FSDP only manages the tensors it saw here).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from cltune.models import decoder_layers

    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    keep_whole = {p for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}
    count = 0
    for layer in decoder_layers(model):
        if not isinstance(layer, FSDPModule):
            # each layer is its own root (no wrapper around the whole model, so that the loss may call
            # the decoder and the lm_head directly); a root keeps its weights gathered after forward
            # unless told otherwise, which would undo the memory saving
            fully_shard(layer, mesh=mesh, ignored_params=keep_whole, reshard_after_forward=True)
            count += 1
    return count


def rank_run_dir(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) if rank == 0 else Path(run_dir) / f"rank{rank}"
