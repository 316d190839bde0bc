"""A continual run: train a sequence of tasks, evaluate every task after each one (the R matrix),
register each task's adapter, and resume a run that was stopped or whose process died.

`run_continual` runs it in one process; `run_continual_rank` is one rank of a data-parallel run
(cltune.distributed launches the ranks)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from transformers import set_seed

from cltune.checkpoints import Keeper, write_task
from cltune.checkpoints import task_dir as kept_dir
from cltune.config import RunConfig, parse_config
from cltune.data import TokenStats, tokenize
from cltune.distributed import accelerator as rank_accelerator
from cltune.distributed import check_world, rank_run_dir, shard_frozen_layers
from cltune.errors import ConfigError
from cltune.evaluate import cl_metrics, write_results
from cltune.general import GeneralEval
from cltune.init_adapter import InitAdapter, attach, check_started, open_init
from cltune.methods import METHODS, build_method
from cltune.methods.base import FORGOTTEN_EXAMPLES, Method, MethodState, TaskContext
from cltune.models import LoadedModel, load_model
from cltune.plots import save_heatmap, save_learning_curves
from cltune.registry import AdapterRecord, Registry
from cltune.served import (
    BASE_MODEL,
    Scoring,
    measure_served,
    prompt_router,
    record_gap,
    score_examples,
    score_row,
    served_scoring,
)
from cltune.stats import score_interval
from cltune.task_data import TaskData, read_task_data
from cltune.tracking import LOG_DIR as TENSORBOARD_DIR
from cltune.tracking import TensorBoardLog
from cltune.train import (
    Callbacks,
    TaskResult,
    Validator,
    adapter_tensors,
    load_model_tensors,
    train_task,
    validation_loss,
)

CODEBOOK_SIZE = 200  # instructions kept per adapter for routing


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


@dataclass
class _Run:
    """What every step of one continual run reads and writes: its config, tasks, directory, progress
    (progress.json), the loaded model, callbacks and where adapters are registered."""

    cfg: RunConfig
    run_dir: Path
    progress: dict[str, Any]
    data: list[TaskData]
    unlearn: list[bool]  # per task: its method unlearns (`train` is a forget set)
    loaded: LoadedModel
    cb: Callbacks
    general: GeneralEval
    registry: Registry | None
    created_by: str
    resume: bool
    accelerator: Any  # data-parallel runs (cltune/distributed.py); None: one process
    board: TensorBoardLog | None = None
    init: InitAdapter | None = None  # tasks[0].init_adapter: the adapter the first task starts from

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.cfg.tasks]

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    def save_progress(self) -> None:
        path = self.run_dir / "progress.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.progress, indent=1))
        tmp.replace(path)

    def log(self, message: str, **data: Any) -> None:
        _log(self.cb, message, **data)


def _log(cb: Callbacks, message: str, **data: Any) -> None:
    if cb.log is not None:
        cb.log(message, **data)


def evaluate_all(
    loaded: LoadedModel, model: Any, data: list[TaskData], cfg: RunConfig, scoring: Scoring = BASE_MODEL
) -> tuple[list[float], dict[str, Any]]:
    """One row of R: every task scored with what is served (`scoring`: the base model, the served
    adapter, or DEMA's groups routed per prompt). Returns (row, {how, columns: task -> {adapter: n}})."""
    return score_row(loaded, model, data, cfg, scoring)


def run_continual(
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
    run = _start_run(
        cfg,
        Path(run_dir),
        registry=registry,
        callbacks=callbacks or Callbacks(),
        cache_dir=cache_dir,
        loaded=loaded,
        created_by=created_by,
        resume=resume,
        accelerator=accelerator,
    )
    _score_base_model(run)  # row 0 of R, and the general-ability probes
    model: Any = run.loaded.model
    handover = Handover()
    for t in range(len(run.data)):
        model, method, ctx, stats = _prepare_task(run, model, t, handover)
        if t < run.progress["completed"]:  # finished before a restart: restore, don't retrain
            _restore_task(run, model, method, t, handover)
            continue
        result = _train_one_task(run, model, method, ctx, stats)
        state = _end_task(run, model, method, ctx, handover)
        _evaluate_and_register(run, model, method, state, handover, t, result, stats)
    return _finish_run(run)


def _start_run(
    cfg: RunConfig,
    run_dir: Path,
    *,
    registry: Registry | None,
    callbacks: Callbacks,
    cache_dir: str | Path | None,
    loaded: LoadedModel | None,
    created_by: str,
    resume: bool,
    accelerator: Any,
) -> _Run:
    """Open the run's progress, read and validate every task file (before the model loads), load the
    model and the adapter the first task starts from (tasks[0].init_adapter), open TensorBoard."""
    data, unlearn = _read_tasks(cfg)
    progress = _open_progress(cfg, data, run_dir, resume)
    loaded = loaded or load_model(cfg.model, cache_dir)
    init = open_init(cfg, registry, loaded)  # checked before anything is trained
    if init is not None:
        progress["init_adapter"] = init.record.model_dump(mode="json")  # the first adapter's parent
    cb, board = _with_tensorboard(cfg, run_dir, progress, callbacks, accelerator)
    general = GeneralEval(cfg.eval.general, cfg.eval.general_examples, cfg.train.max_len, cfg.eval.batch_size)
    return _Run(
        cfg,
        run_dir,
        progress,
        data,
        unlearn,
        loaded,
        cb,
        general,
        registry,
        created_by,
        resume,
        accelerator,
        board,
        init,
    )


def run_identity(cfg: RunConfig, data: list[TaskData]) -> dict[str, Any]:
    """What makes two runs the same run: the config with each task's dataset files named by the sha256
    of their content, not their path. The same data at other paths (another host's data directory, a
    moved checkout) resumes; a file whose content changed under the same path does not."""
    identity = cfg.model_dump(mode="json")
    for task, d in zip(identity["tasks"], data, strict=True):
        task.update({role: f"sha256:{sha}" for role, sha in d.sha256.items()})
    return identity


def _open_progress(cfg: RunConfig, data: list[TaskData], run_dir: Path, resume: bool) -> dict[str, Any]:
    """The run's progress (progress.json): new, or the saved one to resume from (its `config` then
    names this host's files); refuses a run directory that holds a different run (`run_identity`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_json, identity = cfg.model_dump(mode="json"), run_identity(cfg, data)
    progress_path = run_dir / "progress.json"
    progress: dict[str, Any] = {
        "config": cfg_json,
        "identity": identity,
        "R": [],
        "completed": 0,
        "adapters": [],
        "train": [],
    }
    if resume and progress_path.exists():
        saved = json.loads(progress_path.read_text())
        same = saved["identity"] == identity if "identity" in saved else saved["config"] == cfg_json
        if not same:  # (a progress file written before identities: the old rule, the same config)
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds a different run (another config, or changed data "
                "files); use a new directory",
                errors=[],
            )
        progress = {**saved, "config": cfg_json}
    return progress


def _read_tasks(cfg: RunConfig) -> tuple[list[TaskData], list[bool]]:
    """Read, validate and split every task's files (no model needed). Returns (data, unlearning per task)."""
    unlearn = [bool(getattr(METHODS[cfg.method_for(t).name], "unlearning", False)) for t in cfg.tasks]
    data = [read_task_data(t, cfg.train.seed, u, cfg.train) for t, u in zip(cfg.tasks, unlearn, strict=True)]
    return data, unlearn


def _with_tensorboard(
    cfg: RunConfig, run_dir: Path, progress: dict[str, Any], cb: Callbacks, accelerator: Any
) -> tuple[Callbacks, TensorBoardLog | None]:
    """`cb` also teed into TensorBoard event files with `train.tensorboard` (on rank 0 only)."""
    if not cfg.train.tensorboard or (accelerator is not None and accelerator.process_index != 0):
        return cb, None
    board = TensorBoardLog(run_dir / TENSORBOARD_DIR, [t.name for t in cfg.tasks])
    return board.tee(cb, lambda: sum(int(x["steps"]) for x in progress["train"])), board


def _score_base_model(run: _Run) -> None:
    """Row 0 of R (every task scored with the base model) and the general-ability probes' base row,
    unless a resumed run has them already."""
    progress, model = run.progress, run.loaded.model
    progress.setdefault("general", [])
    if not progress["R"]:
        run.log("evaluating the base model on every task")
        base_row, scored = evaluate_all(run.loaded, model, run.data, run.cfg)
        progress["R"].append(base_row)
        progress.setdefault("scored_with", {})["base"] = scored
        run.save_progress()
        run.log(
            "base model: "
            + ", ".join(f"{n}={v:.3f}" for n, v in zip(run.names, progress["R"][0], strict=True)),
            row=progress["R"][0],
            task=None,
        )
    if run.general.probes and not progress["general"]:
        progress["general"].append(
            _general_row(run.cb, run.general, model, run.loaded.tokenizer, None, "base model")
        )
        run.save_progress()


def _groups_before(handover: Handover) -> dict[str, Any]:
    """TaskContext's `grouped` and `route`: the adapter groups the previous task served from, if any."""
    served = handover.previous.meta.get("serve_adapter") if handover.previous is not None else None
    grouped = handover.grouped(str(served)) if served else None
    routed = prompt_router(grouped, str(served)) if grouped is not None else None
    return {"grouped": grouped, "route": routed[0] if routed else None}


def _prepare_task(
    run: _Run, model: Any, t: int, handover: Handover
) -> tuple[Any, Method, TaskContext, TokenStats]:
    """Build task t's method, tokenise its examples and let the method prepare the model (task 0
    first gets the init adapter; FSDP runs shard the frozen layers). Returns (model, method, ctx, stats)."""
    cfg, d, tok, acc, init = run.cfg, run.data[t], run.loaded.tokenizer, run.accelerator, run.init
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
        run.loaded.device,
        retain=retain,
        log=run.cb.log,
        rank=run.rank,
        world=acc.num_processes if acc is not None else 1,
        own_state=handover.own.get(method.name),
        forgotten=frozenset(handover.forgotten),
        **_groups_before(handover),
    )
    set_seed(cfg.train.seed + t)  # LoRA init in prepare and dropout: same config, same adapters
    if t == 0 and init is not None:  # the adapter plays the task before the first
        model, handover.previous = attach(model, cfg.lora, init)
        run.log(f"{task.name} starts from adapter {init.ref}", adapter=init.ref)
    model = method.prepare(model, ctx, handover.previous)
    if t == 0 and init is not None:
        check_started(model, method, init)
    if acc is not None and cfg.train.sharding == "fsdp" and shard_frozen_layers(model, acc):
        run.log(f"fsdp: frozen decoder layers sharded across {acc.num_processes} devices")
    return model, method, ctx, stats


def _task_dir(run: _Run, t: int) -> Path:
    return run.run_dir / "tasks" / f"{t:02d}-{run.cfg.tasks[t].name}"


def _restore_task(run: _Run, model: Any, method: Method, t: int, handover: Handover) -> None:
    """A task finished before a restart: its saved adapters and method state, instead of training."""
    task_dir = _task_dir(run, t)
    load_model_tensors(model, task_dir / "adapters.safetensors")
    if hasattr(method, "after_restore"):  # back to the served form (Control-LLM unwraps layers)
        method.after_restore(model)
    handover.record(method.name, MethodState.load(task_dir / "state") or MethodState())


def _train_one_task(run: _Run, model: Any, method: Method, ctx: TaskContext, stats: TokenStats) -> TaskResult:
    """Train one task with the loop (cltune/train.py): periodic scores (`eval_every`), early stopping
    on the validation split (`steps: auto`), servable checkpoints kept (cltune/checkpoints.py)."""
    cfg, t, tok = run.cfg, ctx.index, run.loaded.tokenizer
    d = run.data[t]
    lr = cfg.train.lr_for(method.train_defaults)
    run.log(
        f"task {t + 1}/{len(run.data)}: {d.config.name} with {method.name} (lr {lr:g})",
        task=d.config.name,
        lr=lr,
        tokens=stats.as_dict(),
    )
    if stats.truncated:
        run.log(
            f"{stats.truncated} of {stats.examples} examples truncated to max_len={cfg.train.max_len}",
            level="warning",
            truncated=stats.truncated,
        )

    def on_eval(step: int) -> None:
        score = score_examples(model, tok, d, cfg, d.eval, method.serve_adapter)
        run.log(
            f"step {step}: {d.config.name} score {score:.3f}",
            step=step,
            score=score,
            task=d.config.name,
        )

    return train_task(
        model,
        method,
        ctx,
        cfg.train,
        checkpoint_dir=run.run_dir / "checkpoint",
        resume=run.resume,
        callbacks=dataclasses.replace(run.cb, on_eval=on_eval),  # keeps every other callback (on_checkpoint)
        accelerator=run.accelerator,  # data-parallel: cltune/distributed.py
        validate=_validator(cfg, d, tok, run.loaded.device) if d.val else None,
        keeper=_keeper(cfg, run.run_dir, run.loaded, method, d, t, run.progress, run.created_by, ctx.rank),
    )


def _end_task(run: _Run, model: Any, method: Method, ctx: TaskContext, handover: Handover) -> MethodState:
    """The method's `after_task` (with the trained-vs-served gap of a method that serves an
    approximation); the task's adapters and state saved in the run directory and handed over."""
    d = run.data[ctx.index]
    # a method that serves an approximation of what it trained: measure both forms (the gap)
    approx = getattr(method, "approximate_serving", False)
    trained = measure_served(run.loaded, model, method, d, run.cfg) if approx else None
    state = method.after_task(model, ctx)
    state.meta.setdefault("serve_adapter", method.serve_adapter)  # the next task may continue from it
    if trained is not None:
        record_gap(state, trained, measure_served(run.loaded, model, method, d, run.cfg))
    task_dir = _task_dir(run, ctx.index)
    task_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model), task_dir / "adapters.safetensors")
    state.save(task_dir / "state")
    handover.record(method.name, state)
    return state


def _evaluate_and_register(
    run: _Run,
    model: Any,
    method: Method,
    state: MethodState,
    handover: Handover,
    t: int,
    result: TaskResult,
    stats: TokenStats,
) -> None:
    """Score every task with what is now served (the next row of R) and the general probes, record
    the task's training, register its served adapter and mark it finished in progress.json."""
    cfg, progress, task = run.cfg, run.progress, run.cfg.tasks[t]
    scoring = served_scoring(method, state, handover.grouped(method.serve_adapter))
    row, scored = evaluate_all(run.loaded, model, run.data, cfg, scoring)
    progress.setdefault("scored_with", {})[task.name] = scored
    run.log(
        f"after {task.name}: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(run.names, row, strict=True)),
        row=row,
        task=task.name,
    )
    progress["R"].append(row)
    if run.general.probes:
        progress["general"].append(
            _general_row(run.cb, run.general, model, run.loaded.tokenizer, method.serve_adapter, task.name)
        )
    progress["train"].append(_train_info(cfg, method, state, result, stats, task.name))
    if run.registry is not None:
        rec = _register(
            run.registry,
            cfg,
            run.loaded,
            model,
            method,
            run.data[t],
            t,
            row,
            stats,
            state,
            progress,
            run.created_by,
            result.best_step or result.steps,
        )
        progress["adapters"].append(rec.model_dump(mode="json"))
        run.log(f"registered adapter {rec.ref}", adapter=rec.ref)
    progress["completed"] = t + 1
    run.save_progress()
    for leftover in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(run.run_dir / leftover, ignore_errors=True)


def _train_info(
    cfg: RunConfig, method: Method, state: MethodState, result: TaskResult, stats: TokenStats, task: str
) -> dict[str, Any]:
    """A task's entry in the run's `train` list (progress.json, results.json, curves.png)."""
    info = {
        "task": task,
        "method": method.name,
        "lr": cfg.train.lr_for(method.train_defaults),  # the run's, else the method's default
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
        info["served_gap"] = state.meta["notes"]["served_gap"]
    return info


def _finish_run(run: _Run) -> RunResult:
    """The continual-learning metrics (once every task is done), results.json, the heatmap and the
    learning curves."""
    if run.board is not None:
        run.board.close()
    cfg, progress, data, names = run.cfg, run.progress, run.data, run.names
    R = progress["R"]
    done = len(R) == len(data) + 1
    metrics = cl_metrics(R, cfg.eval.bwt_normalizer, unlearning=run.unlearn, names=names) if done else {}
    general_summary = run.general.summary(progress["general"])
    heat = None
    if cfg.eval.heatmap:
        heat = save_heatmap(R, names, run.run_dir / "R.png", general=general_summary)
        save_learning_curves(progress["train"], run.run_dir / "curves.png")
    scored_with = progress.get("scored_with", {})
    out = RunResult(
        R,
        metrics,
        names,
        progress["adapters"],
        run.run_dir,
        progress["train"],
        heat,
        scored_with,
        general_summary,
    )
    write_results(
        run.run_dir / "results.json",
        {
            "tasks": names,
            "R": R,
            "metrics": metrics,
            "adapters": [a["name"] + "@" + str(a["version"]) for a in out.adapters],
            "train": out.train,
            # forget-set columns (lower is better) are left out of AP/BWT/FWT/forgetting:
            # metrics["unlearning"] reports them apart
            "unlearning_tasks": [n for n, u in zip(names, run.unlearn, strict=True) if u],
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


def run_continual_rank(
    config: dict[str, Any],
    run_dir: str | Path,
    registry: str | Path | Callable[[], Registry] | None = None,
    callbacks: Callable[[Any], Callbacks] | None = None,
    **kw: Any,
) -> None:
    """One rank of a data-parallel `run_continual`: launch it with
    `cltune.distributed.launch(run_continual_rank, n, config, run_dir, registry)`, or call it inside a
    rank started otherwise (the rank joins the process group through `cltune.distributed.accelerator`).

    config: the RunConfig as JSON (each rank parses its own); `model.device: auto` becomes this rank's
        device (cuda:<local rank>, or cpu).
    run_dir: rank 0's run directory; rank r checkpoints under <run_dir>/rank<r> (`rank_run_dir`).
    registry: where rank 0 registers adapters: a directory, or a function that opens the registry
        (called on rank 0 only); the other ranks register nothing.
    callbacks: builds this rank's callbacks from its accelerator; called on every rank (every rank
        watches `should_stop` and must reach a checkpoint barrier). None: no callbacks.
    kw: run_continual's other keyword arguments (cache_dir, created_by, resume).
    """
    acc = rank_accelerator()
    cfg = parse_config(config)
    check_world(cfg.train.batch_size, acc.num_processes)
    if cfg.model.device == "auto":  # one device per rank: cuda:<local rank>, or cpu
        cfg.model.device = "cpu" if acc.device.type == "cpu" else f"cuda:{acc.local_process_index}"
    reg = None
    if acc.process_index == 0 and registry is not None:
        reg = registry() if callable(registry) else Registry(registry)
    run_continual(
        cfg,
        rank_run_dir(run_dir, acc.process_index),
        registry=reg,
        callbacks=callbacks(acc) if callbacks is not None else None,
        accelerator=acc,
        **kw,
    )
    acc.wait_for_everyone()
    acc.end_training()


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
    directory = kept_dir(run_dir, t, d.config.name)
    group, codebook = _routing(method, d, MethodState(), _parent(progress))
    base = _record_base(cfg, loaded, method, d, progress, created_by)
    write_task(directory, {**base, "group": group, "codebook": codebook})
    metric = "loss" if cfg.train.val_metric == "loss" else "1 - score"
    return Keeper(directory, cfg.train.keep_checkpoints, d.config.name, t, metric)


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
    forgotten = {ex.instruction for ex in d.train}
    group = getattr(method, "unlearned_group", None)  # a DEMA group the forget set routed to
    if group is not None:
        return group["name"], [c for c in group["codebook"] if c not in forgotten][:CODEBOOK_SIZE]
    if parent is None:  # unlearned from the base model: nothing to route to
        return d.config.name, []
    return parent["group"] or parent["name"], [c for c in parent["codebook"] if c not in forgotten]
