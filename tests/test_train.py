"""The training loop: exact checkpoint/resume, periodic checkpoints, schedules, frozen base weights,
the progress and stop callbacks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_tensors, seq_lora_start, stop_after

from cltune.config import LoraConfig, TrainConfig
from cltune.errors import StopRequested
from cltune.train import Callbacks, adapter_tensors, make_scheduler, read_checkpoint, total_steps, train_task

# dropout > 0 and grad_accum 2: the RNG state and the batch cursor must both survive a restart
LORA = LoraConfig(r=4, alpha=8, dropout=0.2)
CFG = TrainConfig(steps=6, batch_size=4, grad_accum=2, lr=5e-3, max_len=64, warmup_steps=2, seed=3)


def fresh(seed_for_lora: int = 0, cfg: TrainConfig = CFG):
    """A fresh tiny base + seq_lora adapter; the global seed fixes the LoRA init and dropout."""
    return seq_lora_start(LORA, cfg, seed_for_lora)


@pytest.fixture(scope="module")
def uninterrupted():
    model, method, task = fresh()
    result = train_task(model, method, task, CFG)
    return adapter_tensors(model), result


def test_resumed_run_gives_the_same_adapter_as_an_uninterrupted_one(uninterrupted, tmp_path):
    expected, full = uninterrupted
    model, method, task = fresh()
    with pytest.raises(StopRequested) as ei:
        train_task(
            model,
            method,
            task,
            CFG,
            checkpoint_dir=tmp_path / "ck",
            callbacks=Callbacks(should_stop=stop_after(3)),
        )
    assert ei.value.details["step"] == 3
    assert read_checkpoint(tmp_path / "ck")["step"] == 3
    torch.manual_seed(1234)  # a different process: other RNG state, other LoRA init
    model2, method2, task2 = fresh(seed_for_lora=99)
    result = train_task(model2, method2, task2, CFG, checkpoint_dir=tmp_path / "ck", resume=True)
    assert result.steps == CFG.steps
    assert result.final_loss == full.final_loss
    assert_same_tensors(adapter_tensors(model2), expected)


def test_resume_from_a_periodic_checkpoint_after_a_crash(uninterrupted, tmp_path):
    cfg = CFG.model_copy(update={"checkpoint_every": 2})
    model, method, task = fresh(cfg=cfg)
    train_task(model, method, task, cfg, checkpoint_dir=tmp_path / "ck")
    # the last periodic checkpoint before the end (step 4 of 6) is what a crashed worker leaves
    assert read_checkpoint(tmp_path / "ck")["step"] == 4
    assert_same_tensors(adapter_tensors(model), uninterrupted[0])  # checkpointing changes nothing
    model2, method2, task2 = fresh(seed_for_lora=5, cfg=cfg)
    result = train_task(model2, method2, task2, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert [h["step"] for h in result.history] == [5, 6]
    assert_same_tensors(adapter_tensors(model2), uninterrupted[0])


def test_a_crash_between_the_checkpoint_renames_resumes_from_the_old_copy(uninterrupted, tmp_path):
    cfg = CFG.model_copy(update={"checkpoint_every": 2})
    model, method, task = fresh(cfg=cfg)
    train_task(model, method, task, cfg, checkpoint_dir=tmp_path / "ck")
    (tmp_path / "ck").rename(tmp_path / "ck.old")  # killed after moving the old one aside
    assert read_checkpoint(tmp_path / "ck")["step"] == 4
    model2, method2, task2 = fresh(seed_for_lora=5, cfg=cfg)
    result = train_task(model2, method2, task2, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert [h["step"] for h in result.history] == [5, 6]
    assert_same_tensors(adapter_tensors(model2), uninterrupted[0])


def test_without_a_checkpoint_resume_starts_from_step_zero(uninterrupted, tmp_path):
    model, method, task = fresh()
    result = train_task(model, method, task, CFG, checkpoint_dir=tmp_path / "empty", resume=True)
    assert [h["step"] for h in result.history] == list(range(1, 7))
    assert_same_tensors(adapter_tensors(model), uninterrupted[0])


def test_stop_without_checkpoint_dir_raises_and_writes_nothing(tmp_path):
    model, method, task = fresh()
    with pytest.raises(StopRequested, match="stopped at step 0"):
        train_task(model, method, task, CFG, callbacks=Callbacks(should_stop=lambda: True))
    assert not any(tmp_path.iterdir())


def test_frozen_base_weights_are_bit_identical_after_training():
    model, method, task = fresh()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    train_task(model, method, task, CFG)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
            assert not p.requires_grad, n
    assert any(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_progress_callback_reports_step_speed_and_eta():
    seen = []
    model, method, task = fresh()
    cfg = CFG.model_copy(update={"steps": 4, "warmup_steps": 0, "schedule": "linear"})
    train_task(model, method, task, cfg, callbacks=Callbacks(on_progress=seen.append))
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert all(p.total_steps == 4 and p.task == task.name and p.task_index == 0 for p in seen)
    assert all(p.tokens_per_s > 0 and math.isfinite(p.loss) and "ce" in p.parts for p in seen)
    assert seen[-1].eta_s == 0.0 and all(p.eta_s >= 0 for p in seen) and seen[0].eta_s > 0
    # lr after each step follows the linear schedule: lr * (1 - step/total)
    assert [p.lr for p in seen] == pytest.approx([cfg.lr * (1 - s / 4) for s in (1, 2, 3, 4)])


def test_an_unset_lr_and_epochs_are_the_methods_defaults_and_set_ones_win():
    model, method, task = fresh()
    method.train_defaults = {"lr": 7e-3, "epochs": 2.0}  # this instance's, so no default can pass by chance
    cfg = CFG.model_copy(update={"lr": None, "epochs": None, "steps": None, "warmup_steps": 0})
    cfg = cfg.model_copy(update={"schedule": "constant", "grad_accum": 1})
    seen = []
    result = train_task(model, method, task, cfg, callbacks=Callbacks(on_progress=seen.append))
    assert [p.lr for p in seen] == pytest.approx([7e-3] * len(seen))
    assert result.steps == 2 * math.ceil(len(task.train) / cfg.batch_size)  # two epochs
    explicit = cfg.model_copy(update={"lr": 2e-3, "epochs": 1.0})
    assert (
        explicit.lr_for(method.train_defaults) == 2e-3 and explicit.epochs_for(method.train_defaults) == 1.0
    )
    assert TrainConfig().lr_for({}) == 1e-3 and TrainConfig().epochs_for({}) == 1.0  # no method default


def test_every_method_declares_its_measured_defaults():
    from cltune.methods import METHODS

    for name, cls in METHODS.items():
        assert 0 < cls.train_defaults["lr"] <= 1e-2, name
        unlearning = getattr(cls, "unlearning", False)
        assert ("epochs" in cls.train_defaults) == unlearning, name  # learning stops on a plateau instead
    # measured (docs/benchmarks.md): without a retain term a high lr collapses the model
    assert METHODS["npo"].train_defaults["lr"] < METHODS["npo_rt"].train_defaults["lr"]


def test_log_every_thins_the_history_but_keeps_the_last_step():
    model, method, task = fresh()
    cfg = CFG.model_copy(update={"steps": 5, "grad_accum": 1, "log_every": 2})
    result = train_task(model, method, task, cfg)
    assert [h["step"] for h in result.history] == [2, 4, 5]


def test_on_eval_runs_every_eval_every_steps_before_the_end():
    calls = []
    model, method, task = fresh()
    cfg = CFG.model_copy(update={"steps": 5, "grad_accum": 1, "eval_every": 2})
    train_task(model, method, task, cfg, callbacks=Callbacks(on_eval=calls.append))
    assert calls == [2, 4]
    assert not model.training  # the loop leaves the model in eval mode


# ---------------------------------------------------------------- schedules and step counts


def lrs(schedule: str, total: int, warmup: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(schedule=schedule, warmup_steps=warmup), total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])  # the lr used by this step
        opt.step()
        sched.step()
    return out


def test_warmup_then_linear_decay():
    assert lrs("linear", 6, 2) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])


def test_warmup_then_cosine_decay():
    got = lrs("cosine", 6, 2)
    assert got == pytest.approx([1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])


def test_constant_schedule_after_warmup():
    assert lrs("constant", 4, 1) == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_warmup_longer_than_training_still_reaches_full_lr():
    assert lrs("constant", 3, 10)[-1] == pytest.approx(1.0)


def test_total_steps_from_epochs_rounds_up():
    assert total_steps(TrainConfig(steps=None, epochs=2, batch_size=4, grad_accum=2), 20) == 5
    assert total_steps(TrainConfig(steps=7, epochs=100), 20) == 7
    assert total_steps(TrainConfig(steps=None, epochs=0.01), 3) == 1
    # steps: auto is bounded by max_epochs and max_steps; without a validation split it trains `epochs`
    assert total_steps(TrainConfig(max_epochs=3, batch_size=4), 20) == 15
    assert total_steps(TrainConfig(max_epochs=3, max_steps=10, batch_size=4), 20) == 10
    assert total_steps(TrainConfig(epochs=2, batch_size=4), 20, early_stopping=False) == 10
