"""A continual run: train a sequence of tasks, evaluate every task after each one (the R matrix),
register each task's adapter, and resume a run that was stopped or whose process died."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from transformers import set_seed

from cltune.config import RunConfig, TaskConfig
from cltune.data import Example, TokenStats, file_sha256, read_jsonl, split_holdout, tokenize
from cltune.errors import ConfigError
from cltune.evaluate import cl_metrics, save_heatmap, score_task, write_results
from cltune.methods import METHODS, build_method
from cltune.methods.base import MethodState, TaskContext
from cltune.models import LoadedModel, load_model
from cltune.registry import AdapterRecord, Registry
from cltune.train import Callbacks, adapter_tensors, load_model_tensors, train_task

CODEBOOK_SIZE = 200  # instructions kept per adapter for routing


@dataclass
class TaskData:
    config: TaskConfig
    train: list[Example]
    eval: list[Example]
    retain: list[Example] | None
    sha256: dict[str, str]  # role -> file sha256


@dataclass
class RunResult:
    R: list[list[float]]
    metrics: dict[str, Any]
    tasks: list[str]
    adapters: list[dict[str, Any]]
    run_dir: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    heatmap: Path | None = None


def read_task_data(task: TaskConfig, seed: int, unlearning: bool = False) -> TaskData:
    """Validate and split one task's files (no tokenizer needed: fails before the model loads).

    unlearning: `train` is a forget set; nothing is held out and, without an `eval` file, the task is
    scored on the forget set itself (lower is better).
    """
    _, train = read_jsonl(task.train)
    sha = {"train": file_sha256(task.train)}
    if task.eval:
        _, held = read_jsonl(task.eval)
        sha["eval"] = file_sha256(task.eval)
    elif unlearning:
        held = list(train)
    else:
        train, held = split_holdout(train, task.eval_fraction, seed)
    retain = None
    if task.retain:
        _, retain = read_jsonl(task.retain)
        sha["retain"] = file_sha256(task.retain)
    return TaskData(task, train, held[: task.max_eval], retain, sha)


def _log(cb: Callbacks, message: str, **data: Any) -> None:
    if cb.log is not None:
        cb.log(message, **data)


def evaluate_all(
    loaded: LoadedModel, model: Any, data: list[TaskData], cfg: RunConfig, adapter: str | None
) -> list[float]:
    row = []
    for d in data:
        score, _ = score_task(
            model,
            loaded.tokenizer,
            d.eval,
            d.config.scorer,
            max_new_tokens=d.config.max_new_tokens or cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            adapter=adapter,
        )
        row.append(score)
    return row


def run_sequence(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    registry: Registry | None = None,
    callbacks: Callbacks | None = None,
    cache_dir: str | Path | None = None,
    loaded: LoadedModel | None = None,
    created_by: str = "cli",
    resume: bool = True,
    accelerator: Any = None,
) -> RunResult:
    """Train `cfg.tasks` in order with their methods; evaluate; register adapters.

    Progress is kept in `run_dir`, so calling again with the same config resumes: finished tasks
    are restored from their saved adapters, the current task from its last checkpoint.

    Raises:
        DataError: a dataset is malformed (raised before the model is loaded).
        ConfigError: `run_dir` holds a different run.
        StopRequested: `callbacks.should_stop()` fired; the run can be resumed.
    """
    cb = callbacks or Callbacks()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_json = cfg.model_dump(mode="json")
    progress_path = run_dir / "progress.json"
    progress: dict[str, Any] = {"config": cfg_json, "R": [], "completed": 0, "adapters": [], "train": []}
    if resume and progress_path.exists():
        saved = json.loads(progress_path.read_text())
        if saved["config"] != cfg_json:
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds a different run; use a new directory", errors=[]
            )
        progress = saved
    unlearn = [bool(getattr(METHODS[cfg.method_for(t).name], "unlearning", False)) for t in cfg.tasks]
    data = [read_task_data(t, cfg.train.seed, u) for t, u in zip(cfg.tasks, unlearn, strict=True)]
    loaded = loaded or load_model(cfg.model, cache_dir)
    tok = loaded.tokenizer
    names = [t.name for t in cfg.tasks]
    model: Any = loaded.model

    def save_progress() -> None:
        tmp = progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress, indent=1))
        tmp.replace(progress_path)

    if not progress["R"]:
        _log(cb, "evaluating the base model on every task")
        progress["R"].append(evaluate_all(loaded, model, data, cfg, adapter=None))
        save_progress()
        _log(
            cb,
            "base model: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, progress["R"][0], strict=True)),
            row=progress["R"][0],
            task=None,
        )

    state: MethodState | None = None
    for t, d in enumerate(data):
        task = d.config
        method_cfg = cfg.method_for(task)
        method = build_method(method_cfg.name, method_cfg.params)
        tokens, stats = tokenize(d.train, tok, cfg.train.max_len)
        retain = tokenize(d.retain, tok, cfg.train.max_len)[0] if d.retain else None
        ctx = TaskContext(
            t,
            task.name,
            tokens,
            d.train,
            cfg.lora,
            cfg.train,
            tok.pad_token_id,
            loaded.device,
            retain=retain,
            log=cb.log,
            rank=accelerator.process_index if accelerator is not None else 0,
            world=accelerator.num_processes if accelerator is not None else 1,
        )
        set_seed(cfg.train.seed + t)  # LoRA init in prepare and dropout: same config, same adapters
        model = method.prepare(model, ctx, state)
        if accelerator is not None and cfg.train.sharding == "fsdp":
            from cltune.distributed import shard_frozen_layers

            if shard_frozen_layers(model, accelerator):
                _log(cb, f"fsdp: frozen decoder layers sharded across {accelerator.num_processes} devices")
        task_dir = run_dir / "tasks" / f"{t:02d}-{task.name}"
        if t < progress["completed"]:  # finished before a restart: restore, don't retrain
            load_model_tensors(model, task_dir / "adapters.safetensors")
            state = MethodState.load(task_dir / "state")
            continue
        _log(
            cb,
            f"task {t + 1}/{len(data)}: {task.name} with {method.name}",
            task=task.name,
            tokens=stats.as_dict(),
        )
        if stats.truncated:
            _log(
                cb,
                f"{stats.truncated} of {stats.examples} examples truncated to max_len={cfg.train.max_len}",
                level="warning",
                truncated=stats.truncated,
            )

        def on_eval(step: int, d: TaskData = d, model: Any = model, method: Any = method) -> None:
            score, _ = score_task(
                model,
                tok,
                d.eval,
                d.config.scorer,
                max_new_tokens=d.config.max_new_tokens or cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size,
                adapter=method.serve_adapter,
            )
            _log(
                cb,
                f"step {step}: {d.config.name} score {score:.3f}",
                step=step,
                score=score,
                task=d.config.name,
            )

        cb_task = dataclasses.replace(cb, on_eval=on_eval)  # keeps every other callback (on_checkpoint)
        result = train_task(
            model,
            method,
            ctx,
            cfg.train,
            checkpoint_dir=run_dir / "checkpoint",
            resume=resume,
            callbacks=cb_task,
            accelerator=accelerator,  # data-parallel: cltune/distributed.py
        )
        state = method.after_task(model, ctx)
        state.meta.setdefault("serve_adapter", method.serve_adapter)  # the next task may continue from it
        task_dir.mkdir(parents=True, exist_ok=True)
        save_file(adapter_tensors(model), task_dir / "adapters.safetensors")
        state.save(task_dir / "state")
        row = evaluate_all(loaded, model, data, cfg, adapter=method.serve_adapter)
        _log(
            cb,
            f"after {task.name}: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, row, strict=True)),
            row=row,
            task=task.name,
        )
        progress["R"].append(row)
        train_info = {
            "task": task.name,
            "method": method.name,
            "steps": result.steps,
            "seconds": result.seconds,
            "tokens": result.tokens,
            "final_loss": result.final_loss,
            **stats.as_dict(),
        }
        progress["train"].append(train_info)
        if registry is not None:
            rec = _register(
                registry, cfg, loaded, model, method, d, t, row, stats, state, progress, created_by
            )
            progress["adapters"].append(rec.model_dump(mode="json"))
            _log(cb, f"registered adapter {rec.ref}", adapter=rec.ref)
        progress["completed"] = t + 1
        save_progress()
        for leftover in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(run_dir / leftover, ignore_errors=True)

    R = progress["R"]
    metrics = cl_metrics(R, cfg.eval.bwt_normalizer) if len(R) == len(data) + 1 else {}
    heat = save_heatmap(R, names, run_dir / "R.png") if cfg.eval.heatmap else None
    out = RunResult(R, metrics, names, progress["adapters"], run_dir, progress["train"], heat)
    write_results(
        run_dir / "results.json",
        {
            "tasks": names,
            "R": R,
            "metrics": metrics,
            "adapters": [a["name"] + "@" + str(a["version"]) for a in out.adapters],
            "train": out.train,
            # forget-set columns: lower is better (AP/BWT treat them as scores)
            "unlearning_tasks": [n for n, u in zip(names, unlearn, strict=True) if u],
        },
    )
    return out


def _register(
    registry: Registry,
    cfg: RunConfig,
    loaded: LoadedModel,
    model: Any,
    method: Any,
    d: TaskData,
    t: int,
    row: list[float],
    stats: TokenStats,
    state: MethodState,
    progress: dict[str, Any],
    created_by: str,
) -> AdapterRecord:
    task = d.config
    parent = progress["adapters"][-1] if progress["adapters"] else None
    record = {
        "name": cfg.adapter_name or task.name,
        "base_model": loaded.name,
        "base_fingerprint": loaded.fingerprint,
        "method": method.name,
        "method_params": method.params.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "task": task.name,
        "parent": f"{parent['name']}@{parent['version']}" if parent else None,
        "datasets": [
            {
                "task": task.name,
                "role": role,
                "sha256": sha,
                "examples": len(d.train) if role == "train" else None,
            }
            for role, sha in d.sha256.items()
        ],
        "metrics": {
            "score": row[t],
            "scorer": task.scorer,
            "R_row": row,
            "tasks": [x.name for x in cfg.tasks],
            "train": stats.as_dict(),
        },
        "group": state.meta.get("group", task.name),
        "codebook": [ex.instruction for ex in d.train[:CODEBOOK_SIZE]],
        "notes": state.meta.get("notes", {}),
        "created_by": created_by,
    }
    return registry.save(model, method.serve_adapter, record, state)
