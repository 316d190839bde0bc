"""Servable checkpoints: the served adapter at points of a task's training, kept in peft format.

The resumable checkpoint (`run_dir/checkpoint/`) holds everything needed to continue training and is
replaced each time; these are what a user may want to *serve* instead of the task's final adapter (an
earlier step that generalised better, a step before a divergence). Each is small (the served adapter
only) and can be published as a registry version (`publish`).

Layout:  run_dir/kept/<NN>-<task>/task.json               the registry record fields of the task
                                  step-000040/adapter_config.json, adapter_model.safetensors
                                              meta.json   {task, task_index, step, train_loss, validation}

With `steps: auto` a checkpoint is kept at every validation; otherwise every `checkpoint_every` steps
and at the task's end. The `keep_checkpoints` most recent ones are kept, plus the best (the one the
task registers).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cltune.errors import ConfigError, NotFoundError
from cltune.registry import AdapterRecord, Registry, write_peft

KEPT = "kept"
TASK_FILE = "task.json"
META = "meta.json"


def task_dir(run_dir: Path, index: int, task: str) -> Path:
    return run_dir / KEPT / f"{index:02d}-{task}"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class Keeper:
    """Keeps one task's servable checkpoints in `directory` (see the module docstring)."""

    directory: Path
    keep: int
    task: str
    task_index: int
    metric: str | None = None  # what `validation` measures: "loss" or "1 - score"

    def save(
        self,
        model: Any,
        adapter: str,
        step: int,
        train_loss: float,
        validation: float | None = None,
        best_step: int | None = None,
    ) -> Path:
        """Write the served adapter at `step` (atomically: a temp dir, then a rename) and prune."""
        dest = self.directory / step_name(step)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_peft(model, adapter, tmp)
        meta = {
            "task": self.task,
            "task_index": self.task_index,
            "step": step,
            "train_loss": train_loss,
            "validation": validation,
            "validation_metric": self.metric if validation is not None else None,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(dest, ignore_errors=True)  # a step saved by an earlier attempt of the task
        tmp.rename(dest)
        self.prune(best_step)
        return dest

    def prune(self, best_step: int | None) -> None:
        """Keep the `keep` most recent checkpoints and the best one; delete the rest."""
        on_disk = sorted(int(p.name[5:]) for p in self.directory.glob("step-*") if p.name[5:].isdigit())
        wanted = set(on_disk[-self.keep :] if self.keep else []) | ({best_step} if best_step else set())
        for step in on_disk:
            if step not in wanted:
                shutil.rmtree(self.directory / step_name(step), ignore_errors=True)


def write_task(directory: Path, record: dict[str, Any]) -> None:
    """The registry record fields of the task (name, base model, method, lora, lineage, routing), so a
    checkpoint can be published without the run's config or model."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TASK_FILE).write_text(json.dumps(record, indent=1))


def list_kept(run_dir: Path) -> list[dict[str, Any]]:
    """Every kept checkpoint of a run, in task order then step order: its meta.json."""
    out = []
    for d in sorted((run_dir / KEPT).glob("*/step-*")):
        if (d / META).is_file() and not d.name.endswith(".tmp"):
            out.append(json.loads((d / META).read_text()))
    return out


def find(run_dir: Path, task: str, step: int) -> Path:
    """The folder of a kept checkpoint. Raises NotFoundError naming the steps that are kept."""
    dirs = [d for d in (run_dir / KEPT).glob("*") if d.name.split("-", 1)[-1] == task]
    if not dirs:
        tasks = sorted({d.name.split("-", 1)[-1] for d in (run_dir / KEPT).glob("*")})
        raise NotFoundError(f"no kept checkpoints of task {task!r}; tasks with some: {tasks}", task=task)
    path = dirs[0] / step_name(step)
    if not (path / META).is_file():
        steps = [m["step"] for m in list_kept(run_dir) if m["task"] == task]
        raise NotFoundError(f"task {task!r} has no kept checkpoint at step {step}; kept: {steps}", task=task)
    return path


def publish(
    registry: Registry,
    run_dir: Path,
    task: str,
    step: int,
    *,
    name: str | None = None,
    created_by: str | None = None,
    registered: dict[str, Any] | None = None,
) -> AdapterRecord:
    """Register a kept checkpoint as the next version of `name` (default: the task's adapter name).

    The record is the task's (base model, method, lora, lineage: `parent` is the adapter the task
    continued from), with `notes.checkpoint_step` and `notes.checkpoint_of` (the run), and the
    checkpoint's train loss and validation under `metrics`. `registered`: the record the task itself
    registered, if it finished; its routing group and codebook are reused so `model="auto"` reaches
    the checkpoint as it reaches the task's adapter.
    """
    path = find(run_dir, task, step)
    base_file = path.parent / TASK_FILE
    if not base_file.is_file():
        raise ConfigError(f"kept checkpoint {task}@{step} has no {TASK_FILE}: written by an older cltune")
    base = json.loads(base_file.read_text())
    meta = json.loads((path / META).read_text())
    routing = {k: registered[k] for k in ("group", "codebook")} if registered else {}
    record = {
        **base,
        **routing,
        "name": name or base["name"],
        "metrics": {k: meta[k] for k in ("train_loss", "validation", "validation_metric")},
        "notes": {**base.get("notes", {}), "checkpoint_step": step, "checkpoint_of": created_by},
        "created_by": created_by,
    }
    return registry.save_files(path, record)
