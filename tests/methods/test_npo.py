"""NPO / NPO+RT / NPO+KL / gradient ascent: the invariants of docs/methods.md section 5 on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import NO_DROPOUT, TASK_A, TASK_B, make_task, pc_rows

from cltune.config import LoraConfig, TrainConfig
from cltune.data import collate
from cltune.errors import ConfigError
from cltune.methods import build_method
from cltune.methods.base import MethodState
from cltune.methods.common import adapter_parameters
from cltune.methods.npo import REF_ADAPTER, npo_loss, token_kl
from cltune.methods.seq_lora import SeqLora
from cltune.train import train_task


def forget_batch(loaded, task, n=4):
    return {k: v.to(loaded.device) for k, v in collate(task.train[:n], task.pad_id).items()}


def trained_start(loaded, seed=1):
    """A 'default' adapter with non-zero weights (as if a previous task had trained it)."""
    task = make_task(loaded, TASK_B, lora=NO_DROPOUT)
    model = SeqLora().prepare(loaded.model, task, None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, MethodState(meta={"method": "seq_lora", "serve_adapter": "default"})


def grads(model, method, loss):
    params = method.trainable_parameters(model)
    return torch.autograd.grad(loss, params)


# ---------------------------------------------------------------- the loss on hand-made numbers


def test_npo_loss_is_2_over_beta_ln2_when_nll_equals_ref():
    nll = torch.tensor([3.0, 7.5, 0.2])
    for beta in (0.1, 1.0, 5.0):
        assert npo_loss(nll, nll.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_loss_sign_conventions_on_hand_made_numbers():
    # NLL_theta 3 > NLL_ref 1 (already forgotten a little): -(2/0.5) logsigmoid(0.5 * 2) = 4 log(1 + e^-1)
    assert npo_loss(torch.tensor([3.0]), torch.tensor([1.0]), 0.5).item() == pytest.approx(
        4 * math.log1p(math.e**-1)
    )
    # NLL_theta below ref (remembers better than at the start): the loss is larger than at the start
    assert npo_loss(torch.tensor([0.0]), torch.tensor([1.0]), 0.5).item() > 4 * math.log(2)
    # the gradient on NLL_theta is negative: minimising the loss raises the forget-set NLL
    nll = torch.tensor([2.0, 5.0], requires_grad=True)
    npo_loss(nll, torch.tensor([2.0, 1.0]), 0.1).backward()
    assert (nll.grad < 0).all()
    # d/dNLL = -(1/B) * 2 * sigmoid(-beta d): -1/B at d = 0, smaller in size once forgotten (bounded, unlike GA)
    assert nll.grad[0].item() == pytest.approx(-0.5)
    assert -0.5 < nll.grad[1].item() < 0


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Oracle from the model's full logits [B, T, V]: -log p(answer) summed per row. Returns [B]."""
    mask = labels[:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return -(tok * mask).sum(dim=1)


def test_token_kl_is_zero_for_equal_logits_and_the_mean_kl_per_answer_token_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(4, 11)  # 4 answer positions
    assert token_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert token_kl(logits + 3.0, logits).item() == pytest.approx(0.0, abs=1e-6)  # a shift is no change
    other = logits.clone()
    other[2, 3] += 5.0
    p = torch.softmax(logits[2], -1)
    expected = (p * (torch.log_softmax(logits[2], -1) - torch.log_softmax(other[2], -1))).sum() / 4
    assert expected > 0.01
    assert token_kl(other, logits).item() == pytest.approx(expected.item(), rel=1e-5)
    assert token_kl(logits[:0], logits[:0]).item() == 0.0  # no answer tokens: 0, not nan


# ---------------------------------------------------------------- on the tiny model


def test_npo_loss_at_start_equals_2_over_beta_ln2(tiny):
    model, state = trained_start(tiny)
    task = make_task(tiny, TASK_A, lora=NO_DROPOUT)
    method = build_method("npo", {"beta": 0.1})
    model = method.prepare(model, task, state)
    out = method.loss(model, forget_batch(tiny, task))
    assert out.total.item() == pytest.approx(20 * math.log(2), rel=1e-5)


def test_npo_gradient_at_start_equals_gradient_ascent_on_summed_nll(tiny):
    model, state = trained_start(tiny)
    task = make_task(tiny, TASK_A, lora=NO_DROPOUT)
    method = build_method("npo", {"beta": 0.1})
    model = method.prepare(model, task, state)
    batch = forget_batch(tiny, task)
    g_npo = grads(model, method, method.loss(model, batch).total)
    nll = sequence_nll(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    g_ga = grads(model, method, -nll.mean())  # factor: 2/beta * beta/2 = 1 for the batch mean
    assert sum(g.abs().sum() for g in g_ga) > 0
    for a, b in zip(g_npo, g_ga, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_small_beta_approaches_gradient_ascent_away_from_the_start(tiny):
    model, state = trained_start(tiny)
    task = make_task(tiny, TASK_A, lora=NO_DROPOUT)
    method = build_method("npo", {"beta": 1.0})
    model = method.prepare(model, task, state)
    with torch.no_grad():  # move theta away from ref so that the weights 2*sigmoid(-beta*d) matter
        for p in method.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 1.0)
    batch = forget_batch(tiny, task)
    nll = sequence_nll(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    d = nll.detach() - method._ref_nll[batch["index"]]
    assert d.abs().max() > 0.3  # far enough from the start for beta = 5 to differ
    g_ga = torch.cat([g.flatten() for g in grads(model, method, -nll.mean())])

    def rel_err(beta: float) -> float:
        method.params.beta = beta
        g = torch.cat([x.flatten() for x in grads(model, method, method.loss(model, batch).total)])
        return ((g - g_ga).norm() / g_ga.norm()).item()

    assert rel_err(1e-5) < 1e-3
    assert rel_err(5.0) > 0.05


def test_reference_nll_is_computed_once_in_prepare_not_per_step(tiny):
    task = make_task(tiny, TASK_A, train=TrainConfig(steps=3, batch_size=4, max_len=64), retain=TASK_B)
    method = build_method("npo_rt")
    model = method.prepare(tiny.model, task, None)
    ref0 = method._ref_nll.clone()
    assert ref0.shape == (len(TASK_A),)
    calls = []
    hook = model.get_base_model().get_decoder().register_forward_hook(lambda *a: calls.append(1))
    train_task(model, method, task, task.train_cfg)
    hook.remove()
    assert len(calls) == 3 * 2  # one forget + one retain forward per step; no reference model forward
    torch.testing.assert_close(method._ref_nll, ref0)


def test_grad_ascent_loss_is_negative_token_mean_ce(tiny):
    task = make_task(tiny, TASK_A, lora=NO_DROPOUT)
    method = build_method("grad_ascent")
    model = method.prepare(tiny.model, task, None)
    batch = forget_batch(tiny, task)
    out = method.loss(model, batch)
    ce = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    assert out.total.item() == pytest.approx(-ce.item(), rel=1e-5)


def test_npo_rt_adds_the_ce_of_one_retain_example_per_forget_example(tiny):
    model, state = trained_start(tiny)
    task = make_task(tiny, TASK_A, lora=NO_DROPOUT, retain=TASK_B)
    method = build_method("npo_rt", {"beta": 0.1, "retain_weight": 1.0})
    model = method.prepare(model, task, state)
    rng = method._gen.get_state()
    batch = forget_batch(tiny, task)
    out = method.loss(model, batch)
    idx = torch.randint(len(task.retain), (4,), generator=torch.Generator().set_state(rng)).tolist()
    rb = collate([task.retain[i] for i in idx], task.pad_id)
    ce = model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"], labels=rb["labels"]).loss
    assert out.parts["ce_retain"] == pytest.approx(ce.item(), rel=1e-5)
    assert out.total.item() == pytest.approx(20 * math.log(2) + ce.item(), rel=1e-5)


@pytest.mark.parametrize("start", ["base", "adapter"])
def test_npo_kl_reference_is_the_starting_model_not_the_base(tiny, start):
    if start == "adapter":
        model, state = trained_start(tiny)
    else:
        model, state = tiny.model, None
    task = make_task(tiny, TASK_A, lora=NO_DROPOUT, retain=TASK_B)
    method = build_method("npo_kl")
    model = method.prepare(model, task, state)
    rb = {k: v for k, v in collate(task.retain[:4], task.pad_id).items() if k != "index"}
    with torch.no_grad():
        start_logits = model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits
    start_logits = start_logits[:, :-1][rb["labels"][:, 1:] != -100]  # [N, V] at the answer positions
    assert (REF_ADAPTER in model.peft_config) == (start == "adapter")
    # KL is 0 at the start
    assert method.loss(model, forget_batch(tiny, task)).parts["kl_retain"] == pytest.approx(0.0, abs=1e-6)
    train_task(model, method, task, TrainConfig(steps=3, batch_size=4, max_len=64, lr=1e-2))
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = method._ref_logits(model, rb)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}  # the toggle restored them
    assert model.training
    torch.testing.assert_close(ref, start_logits)
    with torch.no_grad():
        now = model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits
    now = now[:, :-1][rb["labels"][:, 1:] != -100]
    assert (now - start_logits).abs().max() > 1e-3  # training moved the adapter; the reference did not


def _answer_positions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits -> [N, V] at the positions that predict an answer token."""
    return logits[:, :-1][labels[:, 1:] != -100]


@pytest.mark.parametrize("start", ["base", "adapter"])
def test_npo_kl_reference_is_the_adapter_at_the_start_not_the_live_one(tiny, start):
    model, state = trained_start(tiny) if start == "adapter" else (tiny.model, None)
    task = make_task(tiny, TASK_A, lora=NO_DROPOUT, retain=TASK_B)
    beta, weight = 0.5, 2.0
    method = build_method("npo_kl", {"beta": beta, "retain_weight": weight})
    model = method.prepare(model, task, state)
    model.eval()
    idx = torch.randint(
        len(task.retain), (4,), generator=torch.Generator().set_state(method._gen.get_state())
    )
    rb = collate([task.retain[i] for i in idx.tolist()], task.pad_id)  # the retain batch loss() draws
    batch = forget_batch(tiny, task)

    def logits(b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    with torch.no_grad():  # pi_ref: the model at the start
        ref_logp = torch.log_softmax(_answer_positions(logits(rb), rb["labels"]), -1)
        ref_nll = sequence_nll(logits(batch), batch["labels"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # theta moves away from the start, as after some unlearning steps
        for p in method.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    out = method.loss(model, batch)
    logp = torch.log_softmax(_answer_positions(logits(rb), rb["labels"]), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()  # KL(pi_ref || pi_theta), token mean
    npo = -(2 / beta) * torch.nn.functional.logsigmoid(
        beta * (sequence_nll(logits(batch), batch["labels"]) - ref_nll)
    )
    expected = npo.mean() + weight * kl
    assert kl.item() > 0.01
    assert out.parts["kl_retain"] == pytest.approx(kl.item(), rel=1e-4)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    params = method.trainable_parameters(model)
    for a, b in zip(
        torch.autograd.grad(out.total, params), torch.autograd.grad(expected, params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_npo_reference_nll_is_computed_in_eval_mode_without_dropout(tiny):
    dropout = LoraConfig(r=4, alpha=8, dropout=0.5)
    task = make_task(tiny, TASK_A, lora=dropout)
    model = SeqLora().prepare(tiny.model, task, None)  # a starting adapter whose LoRA dropout matters
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    everything = collate(task.train, task.pad_id)
    model.eval()
    with torch.no_grad():
        expected = sequence_nll(
            model(input_ids=everything["input_ids"], attention_mask=everything["attention_mask"]).logits,
            everything["labels"],
        )
    model.train()  # prepare is called on a model in training mode
    method = build_method("npo")
    model = method.prepare(model, task, MethodState(meta={"method": "seq_lora", "serve_adapter": "default"}))
    assert model.training  # and leaves it so
    torch.testing.assert_close(method._ref_nll, expected, rtol=1e-5, atol=1e-5)


def test_npo_rt_without_a_retain_set_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="retain"):
        build_method("npo_rt").prepare(tiny.model, make_task(tiny, TASK_A), None)


def test_state_dict_resumes_the_retain_sampler_exactly(tiny):
    task = make_task(tiny, TASK_A, retain=TASK_B)
    method = build_method("npo_rt")
    method.prepare(tiny.model, task, None)
    saved = method.state_dict()
    first = [method._retain_batch(4, tiny.device)["input_ids"] for _ in range(3)]
    other = build_method("npo_rt")
    other.load_state_dict(saved)
    other._retain, other._pad_id = method._retain, method._pad_id
    torch.testing.assert_close(other._ref_nll, method._ref_nll.cpu())
    for a in first:
        torch.testing.assert_close(other._retain_batch(4, tiny.device)["input_ids"], a)


def test_unlearning_moves_the_served_adapter_and_records_a_fingerprint_not_content(tiny):
    model, state = trained_start(tiny)
    state.meta["notes"] = {"forgotten": [{"task": "earlier"}]}
    task = make_task(
        tiny, TASK_A, retain=TASK_B, train=TrainConfig(steps=4, batch_size=4, max_len=64, lr=1e-2)
    )
    method = build_method("npo_rt")
    model = method.prepare(model, task, state)
    assert method.serve_adapter == "default"
    train_task(model, method, task, task.train_cfg)
    out = method.after_task(model, task)
    notes = out.meta["notes"]["forgotten"]
    assert [n["task"] for n in notes] == ["earlier", "t"]
    rec = notes[-1]
    assert len(rec["forget_tokens_sha256"]) == 64 and rec["forget_examples"] == len(TASK_A)
    assert rec["forget_nll_sum_after"] > rec["forget_nll_sum_before"]
    text = json.dumps(out.meta)
    assert not any(f"add one to {i}" in text for i in range(20))


def test_unlearning_task_in_a_sequence_is_scored_on_its_forget_set_and_continues_the_served_adapter(
    tiny, write_jsonl, tmp_path
):
    from cltune.config import parse_config
    from cltune.continual import run_continual
    from cltune.registry import Registry
    from cltune.task_data import read_task_data

    rows = pc_rows(TASK_A)
    learn, forget, retain = (
        write_jsonl(r, f) for r, f in ((rows, "l.jsonl"), (rows[:6], "f.jsonl"), (rows[6:], "r.jsonl"))
    )
    cfg = parse_config(
        {
            "model": {"name": "tiny-llama", "device": "cpu"},
            "lora": {"r": 4, "alpha": 8},
            "tasks": [
                {"name": "learn", "train": str(learn)},
                {
                    "name": "forget",
                    "train": str(forget),
                    "retain": str(retain),
                    "method": {"name": "npo_rt", "params": {"beta": 0.5}},
                },
            ],
            "train": {"steps": 2, "batch_size": 4, "max_len": 64},
            "eval": {"max_new_tokens": 3, "heatmap": False},
        }
    )
    data = read_task_data(cfg.tasks[1], 0, unlearning=True)
    assert data.eval == data.train and len(data.train) == 6  # nothing held out: scored on the forget set
    reg = Registry(tmp_path / "reg")
    out = run_continual(cfg, tmp_path / "run", registry=reg, loaded=tiny)
    assert len(out.R) == 3
    record = reg.get("forget")
    assert record.parent == "learn@1" and record.method == "npo_rt"
    assert record.notes["forgotten"][0]["start"] == "adapter:default"  # continued the served adapter
    assert json.loads((tmp_path / "run" / "results.json").read_text())["unlearning_tasks"] == ["forget"]
