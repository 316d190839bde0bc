"""THE training loop, written out. Methods extend it through hooks (cltune/methods/base.py).

One call trains one task: AdamW, warm-up + cosine/linear/constant schedule, gradient accumulation,
clipping, periodic checkpoints (adapters, optimizer, scheduler, step, RNG states, method state) and
an exact resume from them, a cooperative `should_stop`, and a progress callback.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cltune.config import TrainConfig
from cltune.data import batches, collate
from cltune.errors import StopRequested
from cltune.methods.base import Method, MethodState, TaskContext


@dataclass
class Progress:
    task: str
    task_index: int
    step: int
    total_steps: int
    loss: float
    parts: dict[str, float]
    lr: float
    tokens_per_s: float
    eta_s: float


@dataclass
class Callbacks:
    should_stop: Callable[[], bool] = lambda: False
    on_progress: Callable[[Progress], None] = lambda p: None
    on_eval: Callable[[int], None] | None = None  # called every `eval_every` steps with the step
    log: Callable[..., None] | None = None  # log(message, **data): job events
    on_checkpoint: Callable[[int], None] | None = None  # after each periodic checkpoint, with its step


@dataclass
class TaskResult:
    steps: int
    seconds: float
    tokens: int
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * n_examples / per_step))


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = min(cfg.warmup_steps, max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- checkpoints


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor in the model (all adapters, not only the trained one)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    method: Method,
    opt: Any,
    sched: Any,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a resumable checkpoint atomically (into a temp dir, then renames; see checkpoint_location)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a write that crashed
    tmp.mkdir(parents=True)
    save_file(adapter_tensors(model), tmp / "adapters.safetensors")
    method.state_dict().save(tmp / "method")
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "rng": rng_state(),
            "extra": extra or {},
        },
        tmp / "trainer.pt",
    )
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def load_model_tensors(model: nn.Module, path: Path) -> None:
    saved = load_file(path)
    params = dict(model.named_parameters())
    missing = [k for k in saved if k not in params]
    if missing:
        raise ValueError(f"checkpoint has tensors the model lacks: {missing[:3]}")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)


def checkpoint_location(directory: Path) -> Path | None:
    """The complete checkpoint to resume from: `directory`, or its `.old` copy when a crash hit
    between the two renames of save_checkpoint."""
    for d in (directory, directory.with_name(directory.name + ".old")):
        if (d / "trainer.pt").exists():
            return d
    return None


def read_checkpoint(directory: Path) -> dict[str, Any] | None:
    d = checkpoint_location(directory)
    return None if d is None else torch.load(d / "trainer.pt", weights_only=False)


# ---------------------------------------------------------------- the loop


def train_task(
    model: nn.Module,
    method: Method,
    task: TaskContext,
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: Callbacks | None = None,
    accelerator: Any = None,
) -> TaskResult:
    """Train `model` (already prepared by `method.prepare`) on one task.

    `accelerator` (data-parallel runs, cltune/distributed.py): this rank takes its share of every
    batch and gradients are averaged across ranks before each optimizer step; None: one process.

    Raises:
        StopRequested: `should_stop()` returned True; a checkpoint was written first when
            `checkpoint_dir` is set, so the run can resume where it stopped.
    """
    cb = callbacks or Callbacks()
    params = method.trainable_parameters(model)
    if not params:
        raise ValueError(f"method {method.name!r} left no trainable parameters for task {task.name!r}")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = total_steps(cfg, len(task.train))
    sched = make_scheduler(opt, cfg, total)
    start = 0
    found = checkpoint_location(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if found is not None:
        ck = torch.load(found / "trainer.pt", weights_only=False)
        load_model_tensors(model, found / "adapters.safetensors")
        method.load_state_dict(MethodState.load(found / "method") or MethodState())
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        start = ck["step"]
    order = batches(
        len(task.train), cfg.batch_size, cfg.seed + 7919 * task.index, start=start * cfg.grad_accum
    )
    result = TaskResult(steps=start, seconds=0.0, tokens=0, final_loss=float("nan"))
    model.train()
    t_start = time.perf_counter()
    rank, world = (
        (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    )
    for step in range(start, total):
        stop = cb.should_stop()
        if accelerator is not None:  # all ranks stop at the same step, or the others hang in all-reduce
            stop = bool(accelerator.reduce(torch.tensor([float(stop)]).to(task.device), "sum").item() > 0)
        if stop:
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, model, method, opt, sched, step)
            raise StopRequested(f"stopped at step {step} of task {task.name!r}", step=step)
        t0 = time.perf_counter()
        loss_sum, parts_sum, tokens = 0.0, dict[str, float](), 0
        for _ in range(cfg.grad_accum):
            rows = next(order)
            items = [task.train[i] for i in rows][rank::world]  # this rank's share of the batch
            batch = {k: v.to(task.device) for k, v in collate(items, task.pad_id).items()}
            batch["global_index"] = torch.tensor(rows, dtype=torch.long)  # all ranks' rows (replay buffers)
            out = method.loss(model, batch)
            (out.total / cfg.grad_accum).backward()
            loss_sum += out.total.item() / cfg.grad_accum
            for k, v in out.parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        if accelerator is not None:
            from cltune.distributed import average_gradients

            average_gradients(params, accelerator)  # DDP's all-reduce, once per optimizer step
            loss_sum = float(accelerator.reduce(torch.tensor([loss_sum]).to(task.device), "mean").item())
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        method.after_step(model, step + 1)  # gradients are still present (DEMA reads them)
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        done = step + 1
        result.steps, result.tokens, result.final_loss = done, result.tokens + tokens, loss_sum
        elapsed = time.perf_counter() - t_start
        if done % cfg.log_every == 0 or done == total:
            eta = elapsed / (done - start) * (total - done)
            lr = float(sched.get_last_lr()[0])
            result.history.append({"step": done, "loss": loss_sum, **parts_sum})
            cb.on_progress(
                Progress(task.name, task.index, done, total, loss_sum, parts_sum, lr, tokens / dt, eta)
            )
        if (
            checkpoint_dir is not None
            and cfg.checkpoint_every
            and done % cfg.checkpoint_every == 0
            and done < total
        ):
            save_checkpoint(checkpoint_dir, model, method, opt, sched, done)
            if cb.on_checkpoint is not None:  # e.g. copy it to a shared store so another host can resume
                cb.on_checkpoint(done)
        if cb.on_eval is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            cb.on_eval(done)
            model.train()
    result.seconds = time.perf_counter() - t_start
    model.eval()
    return result
