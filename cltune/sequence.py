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

from cltune import checkpoints
from cltune.checkpoints import Keeper
from cltune.config import RunConfig, TaskConfig, TrainConfig
from cltune.data import Example, TokenStats, file_sha256, read_jsonl, split_holdout, tokenize
from cltune.errors import ConfigError
from cltune.evaluate import cl_metrics, write_results
from cltune.general import GeneralEval
from cltune.init_adapter import attach, check_started, open_init
from cltune.methods import METHODS, build_method
from cltune.methods.base import FORGOTTEN_EXAMPLES, MethodState, TaskContext
from cltune.models import LoadedModel, load_model
from cltune.plots import save_heatmap, save_learning_curves
from cltune.registry import AdapterRecord, Registry
from cltune.served import (
    BASE_MODEL,
    Scoring,
    measure_served,
    record_gap,
    score_examples,
    score_row,
    served_scoring,
)
from cltune.stats import score_interval
from cltune.tracking import LOG_DIR as TENSORBOARD_DIR
from cltune.tracking import TensorBoardLog
from cltune.train import (
    Callbacks,
    Validator,
    adapter_tensors,
    load_model_tensors,
    train_task,
    validation_loss,
)

CODEBOOK_SIZE = 200  # instructions kept per adapter for routing


@dataclass
class TaskData:
    config: TaskConfig
    train: list[Example]
    eval: list[Example]
    retain: list[Example] | None
    sha256: dict[str, str]  # role -> file sha256
    val: list[Example] = field(default_factory=list)  # steps: auto; carved out of `train`


@dataclass
class RunResult:
    R: list[list[float]]
    metrics: dict[str, Any]
    tasks: list[str]
    adapters: list[dict[str, Any]]
    run_dir: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    heatmap: Path | None = None
    scored_with: dict[str, Any] = field(default_factory=dict)  # row -> how R's row was scored (served.py)
    general: dict[str, Any] = field(default_factory=dict)  # GeneralEval.summary: probe -> values per R row


@dataclass
class Handover:
    """What the tasks before pass to the next one, in a sequence that may mix methods.

    previous: the previous task's state (its `serve_adapter`: the weights to continue from).
    own: method name -> the state of that method's last task, kept across other methods' tasks
        (I-LoRA's buffer, DEMA's groups, Control-LLM's unscaled weights).
    forgotten: example_sha256 of every example an unlearning task forgot so far.
    A resumed run rebuilds it from the finished tasks' saved states, in order.
    """

    previous: MethodState | None = None
    own: dict[str, MethodState] = field(default_factory=dict)
    forgotten: set[str] = field(default_factory=set)

    def record(self, method: str, state: MethodState) -> None:
        self.previous = self.own[method] = state
        self.forgotten.update(state.meta.get(FORGOTTEN_EXAMPLES, []))

    def grouped(self, adapter: str) -> MethodState | None:
        """The last state that keeps adapter groups (DEMA's) with `adapter` among them, if any."""
        for state in self.own.values():
            if any(g.get("adapter") == adapter for g in state.meta.get("groups", [])):
                return state
        return None


def read_task_data(
    task: TaskConfig, seed: int, unlearning: bool = False, train_cfg: TrainConfig | None = None
) -> TaskData:
    """Validate and split one task's files (no tokenizer needed: fails before the model loads).

    unlearning: `train` is a forget set; nothing is held out and, without an `eval` file, the task is
    scored on the forget set itself (lower is better).
    train_cfg with `steps: auto`: a validation split (val_fraction, at most val_max) is also carved
    out of the training examples, never out of the held-out evaluation set.
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
    val: list[Example] = []
    if train_cfg is not None and train_cfg.auto and not unlearning and len(train) >= 4:
        n_val = min(train_cfg.val_max, max(2, round(len(train) * train_cfg.val_fraction)))
        train, val = split_holdout(train, n_val / len(train), seed + 1)
    return TaskData(task, train, held[: task.max_eval], retain, sha, val)


def _log(cb: Callbacks, message: str, **data: Any) -> None:
    if cb.log is not None:
        cb.log(message, **data)


def evaluate_all(
    loaded: LoadedModel, model: Any, data: list[TaskData], cfg: RunConfig, scoring: Scoring = BASE_MODEL
) -> tuple[list[float], dict[str, Any]]:
    """One row of R: every task scored with what is served (`scoring`: the base model, the served
    adapter, or DEMA's groups routed per prompt). Returns (row, {how, columns: task -> {adapter: n}})."""
    return score_row(loaded, model, data, cfg, scoring)


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
    data = [read_task_data(t, cfg.train.seed, u, cfg.train) for t, u in zip(cfg.tasks, unlearn, strict=True)]
    loaded = loaded or load_model(cfg.model, cache_dir)
    init = open_init(cfg, registry, loaded)  # tasks[0].init_adapter, checked before anything is trained
    if init is not None:
        progress["init_adapter"] = init.record.model_dump(mode="json")  # the first adapter's parent
    tok = loaded.tokenizer
    names = [t.name for t in cfg.tasks]
    board = None
    if cfg.train.tensorboard and (accelerator is None or accelerator.process_index == 0):
        board = TensorBoardLog(run_dir / TENSORBOARD_DIR, names)
        cb = board.tee(cb, lambda: sum(int(x["steps"]) for x in progress["train"]))
    model: Any = loaded.model

    def save_progress() -> None:
        tmp = progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress, indent=1))
        tmp.replace(progress_path)

    general = GeneralEval(cfg.eval.general, cfg.eval.general_examples, cfg.train.max_len, cfg.eval.batch_size)
    progress.setdefault("general", [])
    if not progress["R"]:
        _log(cb, "evaluating the base model on every task")
        base_row, scored = evaluate_all(loaded, model, data, cfg)
        progress["R"].append(base_row)
        progress.setdefault("scored_with", {})["base"] = scored
        save_progress()
        _log(
            cb,
            "base model: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, progress["R"][0], strict=True)),
            row=progress["R"][0],
            task=None,
        )
    if general.probes and not progress["general"]:
        progress["general"].append(_general_row(cb, general, model, tok, None, "base model"))
        save_progress()

    handover = Handover()
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
            own_state=handover.own.get(method.name),
            forgotten=frozenset(handover.forgotten),
        )
        set_seed(cfg.train.seed + t)  # LoRA init in prepare and dropout: same config, same adapters
        if t == 0 and init is not None:  # the adapter plays the task before the first
            model, handover.previous = attach(model, cfg.lora, init)
            _log(cb, f"{task.name} starts from adapter {init.ref}", adapter=init.ref)
        model = method.prepare(model, ctx, handover.previous)
        if t == 0 and init is not None:
            check_started(model, method, init)
        if accelerator is not None and cfg.train.sharding == "fsdp":
            from cltune.distributed import shard_frozen_layers

            if shard_frozen_layers(model, accelerator):
                _log(cb, f"fsdp: frozen decoder layers sharded across {accelerator.num_processes} devices")
        task_dir = run_dir / "tasks" / f"{t:02d}-{task.name}"
        if t < progress["completed"]:  # finished before a restart: restore, don't retrain
            load_model_tensors(model, task_dir / "adapters.safetensors")
            if hasattr(method, "after_restore"):  # back to the served form (Control-LLM unwraps layers)
                method.after_restore(model)
            handover.record(method.name, MethodState.load(task_dir / "state") or MethodState())
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
            score = score_examples(model, tok, d, cfg, d.eval, method.serve_adapter)
            _log(
                cb,
                f"step {step}: {d.config.name} score {score:.3f}",
                step=step,
                score=score,
                task=d.config.name,
            )

        cb_task = dataclasses.replace(cb, on_eval=on_eval)  # keeps every other callback (on_checkpoint)
        validate = _validator(cfg, d, tok, loaded.device) if d.val else None
        result = train_task(
            model,
            method,
            ctx,
            cfg.train,
            checkpoint_dir=run_dir / "checkpoint",
            resume=resume,
            callbacks=cb_task,
            accelerator=accelerator,  # data-parallel: cltune/distributed.py
            validate=validate,
            keeper=_keeper(cfg, run_dir, loaded, method, d, t, progress, created_by, ctx.rank),
        )
        # a method that serves an approximation of what it trained: measure both forms (the gap)
        approx = getattr(method, "approximate_serving", False)
        trained = measure_served(loaded, model, method, d, cfg) if approx else None
        state = method.after_task(model, ctx)
        state.meta.setdefault("serve_adapter", method.serve_adapter)  # the next task may continue from it
        if trained is not None:
            record_gap(state, trained, measure_served(loaded, model, method, d, cfg))
        task_dir.mkdir(parents=True, exist_ok=True)
        save_file(adapter_tensors(model), task_dir / "adapters.safetensors")
        state.save(task_dir / "state")
        handover.record(method.name, state)
        scoring = served_scoring(method, state, handover.grouped(method.serve_adapter))
        row, scored = evaluate_all(loaded, model, data, cfg, scoring)
        progress.setdefault("scored_with", {})[task.name] = scored
        _log(
            cb,
            f"after {task.name}: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, row, strict=True)),
            row=row,
            task=task.name,
        )
        progress["R"].append(row)
        if general.probes:
            progress["general"].append(_general_row(cb, general, model, tok, method.serve_adapter, task.name))
        train_info = {
            "task": task.name,
            "method": method.name,
            "steps": result.steps,
            "seconds": result.seconds,
            "tokens": result.tokens,
            "final_loss": result.final_loss,
            "stop_reason": result.stop_reason,
            "best_step": result.best_step,
            "best_validation": result.best_value,
            "validation_metric": cfg.train.val_metric if result.validation else None,
            "validation": result.validation,
            "history": [{"step": h["step"], "loss": h["loss"]} for h in result.history],
            **stats.as_dict(),
        }
        if "served_gap" in state.meta.get("notes", {}):
            train_info["served_gap"] = state.meta["notes"]["served_gap"]
        progress["train"].append(train_info)
        if registry is not None:
            rec = _register(
                registry,
                cfg,
                loaded,
                model,
                method,
                d,
                t,
                row,
                stats,
                state,
                progress,
                created_by,
                result.best_step or result.steps,
            )
            progress["adapters"].append(rec.model_dump(mode="json"))
            _log(cb, f"registered adapter {rec.ref}", adapter=rec.ref)
        progress["completed"] = t + 1
        save_progress()
        for leftover in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(run_dir / leftover, ignore_errors=True)

    if board is not None:
        board.close()
    R = progress["R"]
    done = len(R) == len(data) + 1
    metrics = cl_metrics(R, cfg.eval.bwt_normalizer, unlearning=unlearn, names=names) if done else {}
    general_summary = general.summary(progress["general"])
    heat = None
    if cfg.eval.heatmap:
        heat = save_heatmap(R, names, run_dir / "R.png", general=general_summary)
        save_learning_curves(progress["train"], run_dir / "curves.png")
    scored_with = progress.get("scored_with", {})
    out = RunResult(
        R,
        metrics,
        names,
        progress["adapters"],
        run_dir,
        progress["train"],
        heat,
        scored_with,
        general_summary,
    )
    write_results(
        run_dir / "results.json",
        {
            "tasks": names,
            "R": R,
            "metrics": metrics,
            "adapters": [a["name"] + "@" + str(a["version"]) for a in out.adapters],
            "train": out.train,
            # forget-set columns (lower is better) are left out of AP/BWT/FWT/forgetting:
            # metrics["unlearning"] reports them apart
            "unlearning_tasks": [n for n, u in zip(names, unlearn, strict=True) if u],
            "scored_with": scored_with,  # row (base or task) -> how it was scored, adapter per column
            "general": general_summary,
            # each score's own sampling uncertainty: held-out examples per task, Wilson 95% per cell
            "n_eval": {d.config.name: len(d.eval) for d in data},
            "R_interval": [
                [list(score_interval(v, len(d.eval))) for v, d in zip(row, data, strict=True)] for row in R
            ],
        },
    )
    return out


def _general_row(
    cb: Callbacks, general: GeneralEval, model: Any, tok: Any, adapter: str | None, after: str
) -> dict[str, float]:
    row = general.row(model, tok, adapter)
    _log(
        cb,
        f"general abilities after {after}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()),
        general=row,
    )
    return row


def _validator(cfg: RunConfig, d: TaskData, tok: Any, device: Any) -> Validator:
    """The early-stopping value for `steps: auto`: answer-token CE on the validation split, or
    1 - the task's score on it (`val_metric: score`; greedy generation, slower)."""
    if cfg.train.val_metric == "loss":
        items, _ = tokenize(d.val, tok, cfg.train.max_len)
        return validation_loss(items, tok.pad_token_id, device, batch_size=cfg.eval.batch_size)

    def one_minus_score(model: Any, method: Any) -> float:
        return 1.0 - score_examples(model, tok, d, cfg, d.val, method.serve_adapter)

    return one_minus_score


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
    checkpoint_step: int,
) -> AdapterRecord:
    task = d.config
    group, codebook = _routing(method, d, state, _parent(progress))
    record = {
        **_record_base(cfg, loaded, method, d, progress, created_by),
        "metrics": {
            "score": row[t],
            "scorer": task.scorer,
            "R_row": row,
            "tasks": [x.name for x in cfg.tasks],
            "train": stats.as_dict(),
        },
        "group": group,
        "codebook": codebook,
        "notes": {**state.meta.get("notes", {}), "checkpoint_step": checkpoint_step},
    }
    return registry.save(model, method.serve_adapter, record, state)


def _parent(progress: dict[str, Any]) -> dict[str, Any] | None:
    """The record of the adapter the current task continues from: the last one registered, or the
    adapter the run starts from (tasks[0].init_adapter)."""
    return progress["adapters"][-1] if progress["adapters"] else progress.get("init_adapter")


def _record_base(
    cfg: RunConfig, loaded: LoadedModel, method: Any, d: TaskData, progress: dict[str, Any], created_by: str
) -> dict[str, Any]:
    """The registry record fields a task's adapter has from its start: what it is, what it was
    trained on and from (lineage). Its kept checkpoints are published with these too."""
    task, parent = d.config, _parent(progress)
    return {
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
        "created_by": created_by,
    }


def _keeper(
    cfg: RunConfig,
    run_dir: Path,
    loaded: LoadedModel,
    method: Any,
    d: TaskData,
    t: int,
    progress: dict[str, Any],
    created_by: str,
    rank: int,
) -> Keeper | None:
    """Where a task's servable checkpoints go, with the record fields to publish them; None when
    none are kept (keep_checkpoints: 0, another rank, or a method whose trained form is not what
    it serves: its mid-task adapters could not be served as they are)."""
    if not cfg.train.keep_checkpoints or rank != 0 or getattr(method, "approximate_serving", False):
        return None
    directory = checkpoints.task_dir(run_dir, t, d.config.name)
    group, codebook = _routing(method, d, MethodState(), _parent(progress))
    base = _record_base(cfg, loaded, method, d, progress, created_by)
    checkpoints.write_task(directory, {**base, "group": group, "codebook": codebook})
    metric = "loss" if cfg.train.val_metric == "loss" else "1 - score"
    return checkpoints.Keeper(directory, cfg.train.keep_checkpoints, d.config.name, t, metric)


def _routing(
    method: Any, d: TaskData, state: MethodState, parent: dict[str, Any] | None
) -> tuple[str, list[str]]:
    """(group, codebook) of a task's adapter record, for `model="auto"` routing.

    An unlearned adapter replaces its parent in the parent's group with the parent's codebook minus the
    forgotten instructions: its own `train` file is the forget set, whose text must neither be stored
    nor attract prompts, and the parent's group must now reach the unlearned adapter, not the parent.
    """
    if not getattr(method, "unlearning", False):
        return state.meta.get("group", d.config.name), [ex.instruction for ex in d.train[:CODEBOOK_SIZE]]
    if parent is None:  # unlearned from the base model: nothing to route to
        return d.config.name, []
    forgotten = {ex.instruction for ex in d.train}
    return parent["group"] or parent["name"], [c for c in parent["codebook"] if c not in forgotten]
