"""I-LoRA invariants (docs/methods.md section 1): EMA pairing, consistency loss, buffer, state."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import (
    TASK_A,
    TASK_B,
    assert_gradients_are_the_oracles,
    method_task,
    randomise_lora,
    train_with_restart,
)

from cltune.config import LoraConfig
from cltune.data import ReplayBuffer, collate
from cltune.methods.base import MethodState
from cltune.methods.common import paired_lora_tensors
from cltune.methods.ilora import FAST, SLOW, ILora, ILoraParams, consistency_loss, ema_decay_at
from cltune.train import train_task


def _after_first_task(tiny):
    """Model + state after a 2-step first task: the buffer holds task-A examples."""
    m = ILora()
    t0 = method_task(tiny, TASK_A, steps=2)
    model = m.prepare(tiny.model, t0, None)
    train_task(model, m, t0, t0.train_cfg)
    return model, m.after_task(model, t0)


def test_one_ema_step_moves_slow_to_lam_slow_plus_one_minus_lam_fast(tiny):
    m = ILora(ILoraParams(ema_decay=0.9))
    model = m.prepare(tiny.model, method_task(tiny, TASK_A), None)
    randomise_lora(model, FAST, 1)
    randomise_lora(model, SLOW, 2)
    pairs = paired_lora_tensors(model, FAST, SLOW)
    slow0 = [s.detach().clone() for _, s in pairs]
    m.global_step = 10_000  # lam_t = min(1 - 1/10002, 0.9) = 0.9
    m.after_step(model, 1)
    assert len(pairs) == 2 * 2 * 2  # q, v x 2 layers x (A, B)
    for (fast, slow), s0 in zip(pairs, slow0, strict=True):
        torch.testing.assert_close(slow, 0.9 * s0 + 0.1 * fast, rtol=0, atol=1e-7)
        assert not torch.equal(slow, s0)  # the reference's slow adapter never moved


def test_ema_decay_warms_up_from_one_half():
    assert ema_decay_at(1, 0.99) == 0.5
    assert ema_decay_at(3, 0.99) == 0.75
    assert ema_decay_at(10_000, 0.99) == 0.99


def test_consistency_loss_is_zero_when_slow_equals_fast_and_positive_otherwise(tiny):
    m = ILora()
    model = m.prepare(tiny.model, method_task(tiny, TASK_A), None)
    randomise_lora(model, FAST, 1)
    randomise_lora(model, SLOW, 1)
    batch = collate([m._task.train[i] for i in range(4)], tiny.tokenizer.pad_token_id)
    h_fast = list(
        model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states[1:]
    )
    assert consistency_loss(h_fast, m.slow_hidden_states(model, batch), batch["attention_mask"]).item() == 0.0
    randomise_lora(model, SLOW, 2)
    assert consistency_loss(h_fast, m.slow_hidden_states(model, batch), batch["attention_mask"]).item() > 0.0


def test_consistency_loss_ignores_padding_positions():
    h_fast = [torch.zeros(1, 3, 2)]
    h_slow = [torch.tensor([[[1.0, 1.0], [1.0, 1.0], [100.0, 100.0]]])]  # last position is padding
    mask = torch.tensor([[1, 1, 0]])
    assert consistency_loss(h_fast, h_slow, mask).item() == pytest.approx(1.0)  # mean of (0 - 1)^2


def test_consistency_loss_pulls_up_only_where_fast_is_below_slow_by_hand():
    # 2 layers, B=1, T=3 (the last position is padding), H=2
    h_fast = [
        torch.tensor([[[0.0, 3.0], [1.0, -1.0], [5.0, 5.0]]], requires_grad=True),
        torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]], requires_grad=True),
    ]
    h_slow = [
        torch.tensor([[[2.0, 1.0], [1.0, 0.0], [-9.0, 9.0]]], requires_grad=True),
        torch.tensor([[[0.0, 4.0], [-1.0, -1.0], [7.0, 7.0]]], requires_grad=True),
    ]
    mask = torch.tensor([[1, 1, 0]])
    # h_f - max(h_f, h_s) on real positions: layer 1 [[-2, 0], [0, -1]], layer 2 [[0, -3], [0, 0]]
    # squares 4 + 1 + 9 = 14 over 2 positions x 2 features x 2 layers = 8
    loss = consistency_loss(h_fast, h_slow, mask)
    assert loss.item() == pytest.approx(14 / 8)
    loss.backward()
    # d/dh_f = 2 (h_f - max) / 8 where h_f < h_s, else 0; the target gets no gradient
    torch.testing.assert_close(h_fast[0].grad, torch.tensor([[[-0.5, 0.0], [0.0, -0.25], [0.0, 0.0]]]))
    torch.testing.assert_close(h_fast[1].grad, torch.tensor([[[0.0, -0.75], [0.0, 0.0], [0.0, 0.0]]]))
    assert all(h.grad is None or not h.grad.any() for h in h_slow)


def test_ilora_loss_value_and_gradient_are_mean_ce_plus_gamma_times_consistency(tiny):
    model, state = _after_first_task(tiny)
    gamma = 50.0
    m = ILora(ILoraParams(gamma=gamma))
    t1 = method_task(tiny, TASK_B, index=1)
    model = m.prepare(model, t1, state)
    randomise_lora(model, SLOW, 5)  # the slow learner away from the fast one: L_cons matters
    model.eval()  # no dropout: the oracle's separate forwards must see the same network
    current = collate(t1.train[:4], t1.pad_id)
    rng_state = m.buffer._rng.getstate()
    replay = collate(m.buffer.sample(4), t1.pad_id)
    m.buffer._rng.setstate(rng_state)  # loss() draws the same replay batch
    params = m.trainable_parameters(model)
    out = m.loss(model, current)
    got = torch.autograd.grad(out.total, params)

    def forward(b):
        keys = ("input_ids", "attention_mask", "labels")
        return model(**{k: b[k] for k in keys}, output_hidden_states=True)

    fc, fr = forward(current), forward(replay)
    h_fast, h_slow = fr.hidden_states[1:], m.slow_hidden_states(model, replay)
    mask = replay["attention_mask"].unsqueeze(-1).float()
    sq = sum(
        ((hf - torch.maximum(hf, hs)).pow(2) * mask).sum() for hf, hs in zip(h_fast, h_slow, strict=True)
    )
    l_cons = sq / (mask.sum() * h_fast[0].shape[-1] * len(h_fast))
    ce = (fc.loss + fr.loss) / 2
    expected = ce + gamma * l_cons
    assert gamma * l_cons.item() > 0.05 * ce.item()  # the consistency term is not lost in rounding
    assert out.parts["l_cons"] == pytest.approx(l_cons.item(), rel=1e-4)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_gradients_are_the_oracles(got, expected, ce, params, "L_cons")  # L_cons moves the fast adapter


def test_slow_forward_keeps_only_the_fast_adapter_trainable(tiny):
    m = ILora()
    model = m.prepare(tiny.model, method_task(tiny, TASK_A), None)
    batch = collate([m._task.train[0]], tiny.tokenizer.pad_token_id)
    m.slow_hidden_states(model, batch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{FAST}." in n for n in trainable)
    assert {id(p) for p in m.trainable_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert model.active_adapter == FAST


def test_first_task_trains_on_current_batch_only_and_later_tasks_replay(tiny):
    model, state = _after_first_task(tiny)
    m = ILora()
    t1 = method_task(tiny, TASK_B, index=1, steps=2)
    model = m.prepare(model, t1, state)
    res = train_task(model, m, t1, t1.train_cfg)
    assert set(res.history[0]) >= {"ce", "ce_replay", "l_cons"}
    assert state.meta["notes"]["replay_this_task"] is False


def test_buffer_stays_within_capacity_and_samples_uniformly():
    hits = [0] * 100
    for seed in range(300):
        buf = ReplayBuffer(10, seed)
        buf.add([{"input_ids": [i], "labels": [i]} for i in range(100)])
        assert len(buf) == 10 and buf.n_seen == 100
        for x in buf.items:
            hits[x["input_ids"][0]] += 1
    rate_early, rate_late = sum(hits[:50]) / (300 * 50), sum(hits[50:]) / (300 * 50)
    assert rate_early == pytest.approx(0.1, abs=0.02)  # inclusion probability B / n_seen
    assert rate_late == pytest.approx(0.1, abs=0.02)


def test_replayed_examples_are_stored_unpadded_and_collated_with_minus_100(tiny):
    _, state = _after_first_task(tiny)
    m = ILora()
    m.load_state_dict(state)
    lengths = {len(x["input_ids"]) for x in m.buffer.items}
    assert len(lengths) > 1  # otherwise no padding would be needed
    assert all(len(x["labels"]) == len(x["input_ids"]) and x["labels"][-1] != -100 for x in m.buffer.items)
    batch = collate(m.buffer.items, pad_id=0)  # pad id 0: a padded label 0 would be a real token
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (batch["labels"][pad] == -100).all()


def test_state_survives_a_task_boundary_through_disk(tiny, tmp_path: Path):
    base = copy.deepcopy(tiny.model)
    model, state = _after_first_task(tiny)
    state.save(tmp_path)
    loaded = MethodState.load(tmp_path)
    m = ILora()
    fresh = m.prepare(base, method_task(tiny, TASK_B, index=1), loaded)  # a new process: base model only
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(dict(fresh.named_parameters())[name], p), name
    m0 = ILora()
    m0.load_state_dict(state)
    assert m.buffer.items == m0.buffer.items and m.buffer.n_seen == m0.buffer.n_seen == 8
    assert m.global_step == 2 and m.replay
    assert m.buffer._rng.getstate() == m0.buffer._rng.getstate()


def test_mid_task_checkpoint_resume_matches_an_uninterrupted_run(tiny, tmp_path: Path):
    model, state = _after_first_task(tiny)
    lora = LoraConfig(r=4, alpha=8, dropout=0.1)  # dropout: the resumed RNG must match too

    def run(stop_at: int | None, ck: Path):
        t = method_task(tiny, TASK_B, 1, name="b", lora=lora, steps=4, checkpoint_every=0)

        def start():
            m = ILora()
            return m.prepare(copy.deepcopy(model), t, state), m

        return train_with_restart(start, t, ck, stop_at)

    torch.manual_seed(0)
    a, ma = run(None, tmp_path / "a")
    torch.manual_seed(0)
    b, mb = run(2, tmp_path / "b")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n in pa:
        if "lora_" in n:
            torch.testing.assert_close(pa[n], pb[n], rtol=0, atol=1e-6, msg=n)
    assert ma.buffer.items == mb.buffer.items and ma.global_step == mb.global_step == 6


def test_serve_option_picks_the_registered_adapter():
    assert ILora().serve_adapter == SLOW
    assert ILora(ILoraParams(serve="fast")).serve_adapter == FAST
    with pytest.raises(ValueError):
        ILoraParams(ema_decay=1.0)


def test_joint_forward_losses_equal_separate_forwards_of_current_and_replay(tiny):
    model, state = _after_first_task(tiny)
    m = ILora()
    t1 = method_task(tiny, TASK_B, index=1)
    model = m.prepare(model, t1, state)
    model.eval()  # no dropout: both ways must agree to float precision
    current = collate(t1.train[:4], t1.pad_id)
    rng_state = m.buffer._rng.getstate()
    replay = collate(m.buffer.sample(4), t1.pad_id)
    m.buffer._rng.setstate(rng_state)  # loss() draws the same replay batch
    out = m.loss(model, current)
    with torch.no_grad():
        ce_c = model(**{k: current[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        ce_r = model(**{k: replay[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert out.parts["ce"] == pytest.approx(ce_c.item(), rel=1e-5)
    assert out.parts["ce_replay"] == pytest.approx(ce_r.item(), rel=1e-5)
    expected = (ce_c + ce_r) / 2 + m.params.gamma * out.parts["l_cons"]
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
