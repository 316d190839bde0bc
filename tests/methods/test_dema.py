"""DEMA invariants (docs/methods.md section 2): the dynamic alpha, its fallback, served == EMA, grouping."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TASK_A, TASK_B, method_task, train_with_restart

from cltune.methods.base import MethodState
from cltune.methods.dema import Dema, DemaParams, dema_update_, dynamic_alpha
from cltune.train import train_task

TASK_A2 = [(f"add one to {i}", str(i + 1)) for i in range(40, 60)]  # task A's template, new numbers


def test_alpha_on_hand_made_tensors_equals_the_formula():
    ema = torch.zeros(4)
    p = torch.full((4,), 10.0)  # a = ||p - ema||_1 = 40
    g = torch.full((4,), 0.1)  # b = 0.4
    g_prev = g - 1.0  # c = ||g - g_prev||_1 = 4
    alpha, fell = dema_update_(ema, p, g, g_prev, fallback=0.01)
    expected = 2 * (1 + 0.4) / (40 * 4)  # 0.0175
    assert not fell and alpha.item() == pytest.approx(expected)
    torch.testing.assert_close(ema, torch.full((4,), expected * 10.0))  # (1 - alpha) * 0 + alpha * p


def test_alpha_falls_back_without_a_previous_gradient_and_out_of_range():
    one = torch.tensor(1.0)
    alpha, fell = dynamic_alpha(one, one, None, 0.01)  # step 1 of a task: no g_prev
    assert fell and alpha.item() == pytest.approx(0.01)
    alpha, fell = dynamic_alpha(torch.tensor(0.1), one, torch.tensor(0.1), 0.01)  # 2*2/0.01 = 400 > 1
    assert fell and alpha.item() == pytest.approx(0.01)
    alpha, fell = dynamic_alpha(torch.tensor(0.0), one, one, 0.01)  # a * c == 0
    assert fell and alpha.item() == pytest.approx(0.01)
    alpha, fell = dynamic_alpha(torch.tensor(100.0), one, one, 0.01)  # 4/100 = 0.04 is in range
    assert not fell and alpha.item() == pytest.approx(0.04)


def test_first_step_of_a_task_starts_the_ema_at_the_weights_and_falls_back(tiny):
    m = Dema(DemaParams(grouping=False))
    t = method_task(tiny, TASK_A, steps=1)
    model = m.prepare(tiny.model, t, None)
    train_task(model, m, t, t.train_cfg)
    m._flush()
    assert m.counts["fallbacks"] == m.counts["updates"] == len(m.trainable_parameters(model))
    for name, p in m._named:  # ema = p, then (1 - 0.01) p + 0.01 p = p
        torch.testing.assert_close(m.ema[name], p.detach())


def test_served_weights_equal_the_ema_after_the_task_and_raw_weights_are_kept(tiny):
    m = Dema(DemaParams(grouping=False))
    t = method_task(tiny, TASK_A, steps=4)
    model = m.prepare(tiny.model, t, None)
    logs = []
    t.log = lambda msg, **data: logs.append((msg, data))
    train_task(model, m, t, t.train_cfg)
    raw = {n: p.detach().clone() for n, p in m._named}
    ema = {n: v.clone() for n, v in m.ema.items()}
    state = m.after_task(model, t)
    for n, p in m._named:
        assert torch.equal(p, ema[n]), n
    assert any(not torch.equal(raw[n], ema[n]) for n in raw)  # the EMA lags: served != raw
    stored_raw = {k for k in state.tensors if k.startswith("raw/")}
    assert len(stored_raw) == len(raw)
    fraction = state.meta["notes"]["dema"]["fallback_fraction"]
    assert 0.0 < fraction <= 1.0
    assert any(d.get("dema_fallback_fraction") == fraction for _, d in logs)


def test_dissimilar_tasks_expand_and_a_familiar_template_retrains_its_group(tiny):
    decisions, groups = [], []
    model, state = tiny.model, None
    for i, pairs in enumerate([TASK_A, TASK_B, TASK_A2]):
        m = Dema()
        t = method_task(tiny, pairs, index=i, name=["add", "rev", "add2"][i])
        model = m.prepare(model, t, state)
        decisions.append((m.decision.action, m.dema_on, m.serve_adapter))
        if i == 0:  # give the first group non-trivial weights, to see the expansion copy them
            with torch.no_grad():
                for p in m.trainable_parameters(model):
                    p.add_(0.01)
        if i == 1:
            for (n0, p0), (n1, p1) in zip(_adapter(model, "g0"), _adapter(model, "g1"), strict=True):
                assert torch.equal(p0, p1), (n0, n1)  # a new group starts from the most recent adapter
        state = m.after_task(model, t)
        groups.append(state.meta["group"])
    assert decisions == [("expand", False, "g0"), ("expand", False, "g1"), ("retrain", True, "g0")]
    assert groups == ["add", "rev", "add"]
    notes = state.meta["notes"]
    assert notes["decision"]["group"] == "add" and notes["decision"]["score"] >= 0.5
    assert notes["decision"]["scores"]["rev"] < 0.5
    add = next(g for g in state.meta["groups"] if g["name"] == "add")
    assert add["tasks"] == ["add", "add2"] and "add one to 45" in add["codebook"]


def test_groups_and_their_adapters_come_back_in_a_new_process(tiny, tmp_path: Path):
    base = copy.deepcopy(tiny.model)
    model, state = tiny.model, None
    for i, pairs in enumerate([TASK_A, TASK_B]):
        m = Dema()
        t = method_task(tiny, pairs, index=i, steps=2)
        model = m.prepare(model, t, state)
        train_task(model, m, t, t.train_cfg)
        state = m.after_task(model, t)
    state.save(tmp_path)
    m = Dema()
    fresh = m.prepare(base, method_task(tiny, TASK_A2, index=2), MethodState.load(tmp_path))
    assert m.serve_adapter == "g0" and m.dema_on
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(fresh_params[name], p), name


def test_mid_task_checkpoint_resume_matches_an_uninterrupted_run(tiny, tmp_path: Path):
    def run(stop_at: int | None, ck: Path):
        t = method_task(tiny, TASK_A, steps=5)

        def start():
            m = Dema(DemaParams(grouping=False))
            return m.prepare(copy.deepcopy(tiny.model), t, None), m

        return train_with_restart(start, t, ck, stop_at)[1]

    torch.manual_seed(0)
    a = run(None, tmp_path / "a")
    torch.manual_seed(0)
    b = run(3, tmp_path / "b")
    a._flush()
    b._flush()
    assert a.counts == pytest.approx(b.counts) and a.counts["updates"] == 5 * len(a._named)
    for name in a.ema:
        torch.testing.assert_close(a.ema[name], b.ema[name], rtol=0, atol=1e-7)
        torch.testing.assert_close(a.g_prev[name], b.g_prev[name], rtol=0, atol=1e-7)


def _adapter(model, name):
    return [(n, p) for n, p in model.named_parameters() if f".{name}." in n]
