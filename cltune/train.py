"""THE training loop, written out. Methods extend it through hooks (cltune/methods/base.py).

One call trains one task: AdamW, warm-up + cosine/linear/constant schedule, gradient accumulation,
clipping, periodic checkpoints (adapters, optimizer, scheduler, step, RNG states, method state) and
an exact resume from them, a cooperative `should_stop`, and a progress callback.

With `steps: auto` the loop learns the task rather than a step count: it scores a validation split
every `val_every` steps, keeps a copy of the best adapters and method state, stops once the score has
not improved for `patience` validations (or a budget ends) and finishes on the best copy.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cltune.config import TrainConfig
from cltune.data import batches, collate
from cltune.errors import ConfigError, ConflictError, StopRequested
from cltune.methods.base import Method, MethodState, TaskContext
from cltune.methods.common import mean_answer_ce, using_adapter

if TYPE_CHECKING:
    from cltune.checkpoints import Keeper


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
    on_progress: Callable[[Progress], None] = lambda _: None
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
    stop_reason: str = "steps"  # steps | epochs | plateau | max_steps | max_epochs | max_minutes
    best_step: int | None = None  # auto: the step whose adapters were kept
    best_value: float | None = None  # auto: its validation value (loss: lower is better)
    validation: list[dict[str, float]] = field(default_factory=list)  # auto: [{step, value}] per check


def steps_per_epoch(cfg: TrainConfig, n_examples: int) -> int:
    return max(1, math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum)))


def total_steps(
    cfg: TrainConfig,
    n_examples: int,
    *,
    early_stopping: bool | None = None,
    defaults: Mapping[str, float] | None = None,
) -> int:
    """Optimizer steps the task may take: its budget under `steps: auto` with a validation split
    (min of max_steps and max_epochs), else exactly `steps` or `epochs` epochs (`defaults`: the
    method's `train_defaults`, for an unset `epochs`)."""
    auto = cfg.auto if early_stopping is None else early_stopping
    if isinstance(cfg.steps, int):
        return cfg.steps
    epochs = cfg.max_epochs if auto else cfg.epochs_for(defaults or {})
    by_epochs = max(1, math.ceil(epochs * n_examples / (cfg.batch_size * cfg.grad_accum)))
    return min(cfg.max_steps, by_epochs) if auto else by_epochs


def validation_interval(cfg: TrainConfig, n_examples: int) -> int:
    """`val_every`, or half an epoch clamped to 5-50 steps: often enough to stop near the best step,
    rarely enough that validating costs a small share of training."""
    if cfg.val_every is not None:
        return cfg.val_every
    return min(50, max(5, steps_per_epoch(cfg, n_examples) // 2))


# ---------------------------------------------------------------- validation and early stopping

Validator = Callable[[nn.Module, Method], float]  # (model, method) -> value; lower is better


def validation_loss(items: list[dict[str, Any]], pad_id: int, device: Any, batch_size: int = 16) -> Validator:
    """A validator: answer-token cross-entropy of the adapter the method serves, on `items`
    (tokenised), in eval mode (dropout off), averaged over answer tokens."""

    def value(model: nn.Module, method: Method) -> float:
        with using_adapter(model, method.serve_adapter):
            return mean_answer_ce(model, items, pad_id, device, batch_size)

    return value


@dataclass
class Snapshot:
    """The adapters and method state at the best validation so far (CPU copies)."""

    step: int
    value: float
    tensors: dict[str, torch.Tensor]
    state: MethodState


@dataclass
class EarlyStopping:
    """Patience on a lower-is-better value; `min_delta` is relative (1% of the best by default)."""

    patience: int
    min_delta: float
    best: Snapshot | None = None
    bad: int = 0  # validations since the last improvement
    curve: list[dict[str, float]] = field(default_factory=list)

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best.value - self.min_delta * abs(self.best.value)

    def update(self, model: nn.Module, method: Method, step: int, value: float) -> bool:
        """Record a validation; keep a snapshot if it improves. Returns True when patience is spent."""
        self.curve.append({"step": step, "value": value})
        if self.improves(value):
            self.best = Snapshot(step, value, adapter_tensors(model), method.state_dict())
            self.bad = 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def restore(self, model: nn.Module, method: Method) -> None:
        assert self.best is not None
        copy_tensors_(model, self.best.tensors)
        method.load_state_dict(self.best.state)

    def save(self, directory: Path) -> dict[str, Any]:
        """Write the best snapshot beside a checkpoint; returns the bookkeeping for trainer.pt."""
        if self.best is not None:
            save_file(self.best.tensors, directory / "best.safetensors")
            self.best.state.save(directory / "best_method")
        best = None if self.best is None else {"step": self.best.step, "value": self.best.value}
        return {"best": best, "bad": self.bad, "curve": self.curve}

    def load(self, directory: Path, saved: dict[str, Any]) -> None:
        self.bad, self.curve = saved["bad"], saved["curve"]
        if saved["best"] is not None:
            state = MethodState.load(directory / "best_method") or MethodState()
            tensors = load_file(directory / "best.safetensors")
            self.best = Snapshot(saved["best"]["step"], saved["best"]["value"], tensors, state)


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
    early: EarlyStopping | None = None,
) -> None:
    """Write a resumable checkpoint atomically (into a temp dir, then renames; see checkpoint_location)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a write that crashed
    tmp.mkdir(parents=True)
    save_file(adapter_tensors(model), tmp / "adapters.safetensors")
    method.state_dict().save(tmp / "method")
    extra = dict(extra or {})
    if early is not None:
        extra["early_stopping"] = early.save(tmp)
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "rng": rng_state(),
            "extra": extra,
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
    copy_tensors_(model, load_file(path))


def copy_tensors_(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors (adapter_tensors' names) into the model's parameters, in place.

    Raises:
        ConflictError: the saved tensors name parameters the model lacks (another model or method).
    """
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise ConflictError(f"checkpoint has tensors the model lacks: {missing[:3]}", missing=missing[:3])
    with torch.no_grad():
        for k, v in tensors.items():
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
    validate: Validator | None = None,
    keeper: Keeper | None = None,
) -> TaskResult:
    """Train `model` (already prepared by `method.prepare`) on one task.

    `validate` (with `steps: auto`): scores the served adapter, lower is better; the loop stops on a
    plateau and finishes on the best adapters. Without it "auto" trains `epochs` epochs.
    `keeper`: keeps servable checkpoints of the served adapter (cltune.checkpoints) at each
    validation, else every `checkpoint_every` steps and at the end.
    `accelerator` (data-parallel runs, cltune/distributed.py): this rank takes its share of every
    batch and gradients are averaged across ranks before each optimizer step; None: one process.

    Raises:
        ConfigError: the method left no trainable parameters (e.g. its targets match no module).
        ConflictError: the checkpoint to resume from does not fit the model.
        StopRequested: `should_stop()` returned True; a checkpoint was written first when
            `checkpoint_dir` is set, so the run can resume where it stopped.
    """
    cb = callbacks or Callbacks()
    params = method.trainable_parameters(model)
    if not params:
        raise ConfigError(
            f"method {method.name!r} left no trainable parameters for task {task.name!r}", errors=[]
        )
    opt = torch.optim.AdamW(params, lr=cfg.lr_for(method.train_defaults), weight_decay=cfg.weight_decay)
    early = EarlyStopping(cfg.patience, cfg.min_delta) if cfg.auto and validate is not None else None
    total = total_steps(
        cfg, len(task.train), early_stopping=early is not None, defaults=method.train_defaults
    )
    val_every = validation_interval(cfg, len(task.train))
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
        if early is not None and "early_stopping" in ck["extra"]:
            early.load(found, ck["extra"]["early_stopping"])
    order = batches(
        len(task.train), cfg.batch_size, cfg.seed + 7919 * task.index, start=start * cfg.grad_accum
    )
    result = TaskResult(steps=start, seconds=0.0, tokens=0, final_loss=float("nan"))
    result.stop_reason = _budget_reason(cfg, early is not None, total)
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
                save_checkpoint(checkpoint_dir, model, method, opt, sched, step, early=early)
            raise StopRequested(f"stopped at step {step} of task {task.name!r}", step=step)
        t0 = time.perf_counter()
        loss_sum, parts_sum, tokens = 0.0, dict[str, float](), 0
        for _ in range(cfg.grad_accum):
            rows = next(order)
            items = [task.train[i] for i in rows][rank::world]  # this rank's share of the batch
            batch = {k: v.to(task.device) for k, v in collate(items, task.pad_id).items()}
            batch["global_index"] = torch.tensor(rows, dtype=torch.long)  # all ranks' rows (replay buffers)
            out = method.loss(model, batch)
            (out.total / cfg.grad_accum).backward()  # type: ignore[no-untyped-call]  # unannotated in torch
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
            result.history.append({"step": done, "loss": loss_sum, "lr": lr, **parts_sum})
            cb.on_progress(
                Progress(task.name, task.index, done, total, loss_sum, parts_sum, lr, tokens / dt, eta)
            )
        reason = None
        if early is not None and validate is not None and (done % val_every == 0 or done == total):
            patience_spent = early.update(model, method, done, validate(model, method))
            model.train()
            _log_validation(cb, task, early, done)
            if keeper is not None and early.best is not None:
                keeper.save(
                    model, method.serve_adapter, done, loss_sum, early.curve[-1]["value"], early.best.step
                )
            reason = "plateau" if patience_spent else None
        if reason is None and early is not None and cfg.max_minutes is not None:
            reason = "max_minutes" if elapsed >= 60 * cfg.max_minutes else None
        if reason is not None:
            result.stop_reason = reason
            break
        if (
            checkpoint_dir is not None
            and cfg.checkpoint_every
            and done % cfg.checkpoint_every == 0
            and done < total
        ):
            save_checkpoint(checkpoint_dir, model, method, opt, sched, done, early=early)
            if keeper is not None and early is None:
                keeper.save(model, method.serve_adapter, done, loss_sum)
            if cb.on_checkpoint is not None:  # e.g. copy it to a shared store so another host can resume
                cb.on_checkpoint(done)
        if cb.on_eval is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            cb.on_eval(done)
            model.train()
    if early is not None and early.best is not None:
        if early.best.step != result.steps:
            early.restore(model, method)  # finish on the best adapters, not the last ones
        result.best_step, result.best_value = early.best.step, early.best.value
        result.validation = early.curve
    elif keeper is not None and result.steps > start:
        keeper.save(model, method.serve_adapter, result.steps, result.final_loss)
    result.seconds = time.perf_counter() - t_start
    model.eval()
    return result


def _budget_reason(cfg: TrainConfig, early_stopping: bool, total: int) -> str:
    """Why the loop ends if nothing stops it earlier."""
    if not early_stopping:
        return "steps" if isinstance(cfg.steps, int) else "epochs"
    return "max_steps" if total == cfg.max_steps else "max_epochs"


def _log_validation(cb: Callbacks, task: TaskContext, early: EarlyStopping, step: int) -> None:
    if cb.log is None or early.best is None:
        return
    value = early.curve[-1]["value"]
    cb.log(
        f"step {step}: validation {value:.4f} (best {early.best.value:.4f} at step {early.best.step})",
        task=task.name,
        step=step,
        validation=value,
        best_step=early.best.step,
        best_validation=early.best.value,
    )
