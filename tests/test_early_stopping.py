"""`train.steps: auto`: validation every `val_every` steps, patience, budgets, the best checkpoint kept
and restored, resume mid-task with the early-stopping state, and the validation split in a sequence."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TASK_A, assert_same_tensors, pc_rows, seq_lora_start, stop_after

from cltune.config import LoraConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig
from cltune.continual import run_continual
from cltune.errors import StopRequested
from cltune.task_data import read_task_data
from cltune.train import (
    Callbacks,
    adapter_tensors,
    total_steps,
    train_task,
    validation_interval,
    validation_loss,
)

LORA = LoraConfig(r=4, alpha=8, dropout=0.1)
AUTO = TrainConfig(steps="auto", batch_size=4, lr=5e-3, max_len=64, val_every=2, patience=2, max_steps=40)


def fresh(cfg: TrainConfig = AUTO):
    return seq_lora_start(LORA, cfg)


class Scripted:
    """A validator returning scripted values; remembers the adapters it saw at each call."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.seen = list(values), list[dict[str, torch.Tensor]]()

    def __call__(self, model, method) -> float:
        self.seen.append(adapter_tensors(model))
        return self.values[len(self.seen) - 1] if len(self.seen) <= len(self.values) else self.values[-1]


def test_auto_stops_when_validation_plateaus_and_keeps_the_best_adapters():
    model, method, task = fresh()
    val = Scripted([5.0, 4.0, 3.0, 3.5, 3.2, 1.0])  # best at the 3rd check (step 6); 2 worse ones follow
    result = train_task(model, method, task, AUTO, validate=val)
    assert result.stop_reason == "plateau"
    assert result.steps == 10 and len(val.seen) == 5  # stopped after the 2nd check without improvement
    assert result.best_step == 6 and result.best_value == 3.0
    assert [v["step"] for v in result.validation] == [2, 4, 6, 8, 10]
    assert_same_tensors(adapter_tensors(model), val.seen[2])  # the adapters of step 6, not of step 10
    assert not model.training


def test_an_improvement_smaller_than_min_delta_does_not_reset_patience():
    model, method, task = fresh()
    val = Scripted([1.0, 0.995, 0.999, 0.5])  # -0.5% is below the default 1% relative min_delta
    result = train_task(model, method, task, AUTO, validate=val)
    assert result.stop_reason == "plateau" and result.best_step == 2 and result.steps == 6


def test_auto_ends_at_the_step_budget_with_the_best_adapters():
    cfg = AUTO.model_copy(update={"max_steps": 6, "patience": 100})
    model, method, task = fresh(cfg)
    val = Scripted([3.0, 2.0, 2.5])
    result = train_task(model, method, task, cfg, validate=val)
    assert result.stop_reason == "max_steps" and result.steps == 6 and result.best_step == 4
    assert_same_tensors(adapter_tensors(model), val.seen[1])


def test_auto_ends_at_the_epoch_budget():
    cfg = AUTO.model_copy(update={"max_epochs": 1.0, "patience": 100})  # 20 examples / 4 = 5 steps
    assert total_steps(cfg, 20) == 5
    model, method, task = fresh(cfg)
    result = train_task(model, method, task, cfg, validate=Scripted([3.0, 2.0, 1.0]))
    assert result.stop_reason == "max_epochs" and result.steps == 5
    assert [v["step"] for v in result.validation] == [2, 4, 5]  # the last step is always validated


def test_auto_ends_at_the_wall_clock_budget():
    cfg = AUTO.model_copy(update={"max_minutes": 1e-9, "patience": 100})
    model, method, task = fresh(cfg)
    result = train_task(model, method, task, cfg, validate=Scripted([1.0]))
    assert result.stop_reason == "max_minutes" and result.steps == 1


def test_without_a_validator_auto_trains_the_fixed_epochs():
    cfg = AUTO.model_copy(update={"epochs": 2.0})
    model, method, task = fresh(cfg)
    result = train_task(model, method, task, cfg)
    assert result.stop_reason == "epochs" and result.steps == 10 and result.best_step is None


def test_validation_interval_defaults_to_half_an_epoch_within_5_to_50_steps():
    cfg = TrainConfig(batch_size=8)
    assert validation_interval(cfg, 200) == 12  # 25 steps per epoch
    assert validation_interval(cfg, 16) == 5
    assert validation_interval(cfg, 10_000) == 50
    assert validation_interval(cfg.model_copy(update={"val_every": 3}), 10_000) == 3


def test_steps_must_be_auto_null_or_a_positive_integer():
    for bad in (0, -1, True, "often"):
        with pytest.raises(ValueError):
            TrainConfig(steps=bad)
    assert TrainConfig().steps == "auto" and TrainConfig(steps=None).steps is None


def test_a_resumed_auto_run_keeps_its_best_snapshot_and_patience(tmp_path):
    values = [5.0, 4.0, 3.0, 3.5, 3.2]
    model, method, task = fresh()
    uninterrupted = train_task(model, method, task, AUTO, validate=Scripted(values))
    expected = adapter_tensors(model)

    model, method, task = fresh()
    first = Scripted(values)
    with pytest.raises(StopRequested):
        train_task(
            model,
            method,
            task,
            AUTO,
            validate=first,
            checkpoint_dir=tmp_path / "ck",
            callbacks=Callbacks(should_stop=stop_after(7)),
        )
    assert len(first.seen) == 3  # steps 2, 4, 6 validated; the best (step 6) is in the checkpoint
    model, method, task = fresh()
    rest = Scripted(values[3:])
    result = train_task(model, method, task, AUTO, validate=rest, checkpoint_dir=tmp_path / "ck", resume=True)
    assert result.stop_reason == "plateau" and result.best_step == 6 == uninterrupted.best_step
    assert result.validation == uninterrupted.validation
    assert_same_tensors(adapter_tensors(model), expected)


def test_validation_loss_falls_as_the_task_is_learned():
    model, method, task = fresh()
    validate = validation_loss(task.train[:8], task.pad_id, task.device)
    model.train()
    before = validate(model, method)
    assert model.training  # the validator restores the mode it found
    result = train_task(model, method, task, AUTO.model_copy(update={"patience": 3}), validate=validate)
    assert result.best_value is not None and result.best_value < before


def test_a_sequence_under_auto_holds_out_a_validation_split_and_reports_why_it_stopped(tmp_path, write_jsonl):
    rows = pc_rows(TASK_A * 2)
    path = write_jsonl(rows, "a.jsonl")
    train = AUTO.model_copy(update={"val_max": 6, "max_steps": 8})
    task = TaskConfig(name="a", train=str(path), eval_fraction=0.2)
    d = read_task_data(task, 0, train_cfg=train)
    assert len(d.val) == 3 and len(d.eval) == 8 and len(d.train) == 29  # 10% of 32 rounds to 3 (<= 6)
    key = lambda e: (e.instruction, e.answer, e.line)  # noqa: E731
    assert not {key(e) for e in d.val} & {key(e) for e in d.train + d.eval}
    assert read_task_data(task, 0, train_cfg=train.model_copy(update={"steps": 5})).val == []

    cfg = RunConfig(model=ModelConfig(name="tiny-llama", device="cpu"), lora=LORA, train=train, tasks=[task])
    run_continual(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["n_eval"] == {"a": 8} and len(results["R_interval"]) == 2  # base + after a
    lo, hi = results["R_interval"][1][0]
    assert lo <= results["R"][1][0] <= hi and hi - lo > 0.2  # 8 held-out examples: a wide interval
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    info = results["train"][0]
    assert info["stop_reason"] in {"plateau", "max_steps"} and info["best_step"] is not None
    assert info["validation_metric"] == "loss" and len(info["validation"]) >= 1
    assert [h["step"] for h in info["history"]][-1] == info["steps"]


def test_val_metric_score_stops_on_one_minus_the_tasks_score(tmp_path, write_jsonl):
    path = write_jsonl(pc_rows(TASK_A * 2), "a.jsonl")
    train = AUTO.model_copy(update={"val_metric": "score", "max_steps": 4})
    task = TaskConfig(name="a", train=str(path), eval_fraction=0.2, max_new_tokens=3)
    cfg = RunConfig(
        model=ModelConfig(name="tiny-llama", device="cpu"),
        lora=LORA,
        train=train,
        tasks=[task],
        eval={"general": [], "heatmap": False},
    )
    run_continual(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "results.json").read_text())["train"][0]
    assert info["validation_metric"] == "score" and [v["step"] for v in info["validation"]] == [2, 4]
    assert all(0.0 <= v["value"] <= 1.0 for v in info["validation"])  # 1 - exact match on 3 examples
