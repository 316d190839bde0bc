"""The shared answer-position forward: the same numbers as the model's own full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import make_task

from cltune.config import LoraConfig
from cltune.data import collate
from cltune.methods.common import answer_logits, attach_adapter, ce_loss, peft_lora_config

PAIRS = [("capital of abc?", "oslo"), ("pet of de", "frog"), ("color of fghij", "green"), ("x", "y")]


def _batch(tiny):
    task = make_task(tiny, PAIRS)
    b = collate(task.train, task.pad_id)
    return {k: v for k, v in b.items() if k != "index"}


@pytest.fixture(params=["plain", "peft"])
def model(request, tiny):
    if request.param == "plain":
        return tiny.model
    m = attach_adapter(tiny.model, "default", peft_lora_config(LoraConfig(r=4, dropout=0.0)))
    with torch.no_grad():  # a non-zero adapter, so the peft path is really exercised
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return m


def test_answer_logits_equal_the_full_forward_at_answer_positions(tiny, model):
    batch = _batch(tiny)
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        out = answer_logits(model, batch, hidden_states=True)
    answer = batch["labels"][:, 1:] != -100
    assert out.logits.shape == (int(answer.sum()), full.logits.shape[-1])
    torch.testing.assert_close(out.logits, full.logits[:, :-1][answer])
    torch.testing.assert_close(out.ce(), full.loss)  # the model's own token-mean CE
    assert out.hidden_states is not None and len(out.hidden_states) == len(full.hidden_states)
    for a, b in zip(out.hidden_states, full.hidden_states, strict=True):
        torch.testing.assert_close(a, b)
    # per-row NLL == the oracle from full logits
    logp = torch.log_softmax(full.logits[:, :-1].float(), -1)
    tok = logp.gather(-1, batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.sequence_nll(), -(tok * answer).sum(1))
    assert out.rows.tolist() == answer.nonzero()[:, 0].tolist()


def test_ce_over_a_row_subset_and_over_no_tokens(tiny):
    batch = _batch(tiny)
    out = answer_logits(tiny.model, batch)
    first = out.rows < 2
    half = {k: v[:2] for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(out.ce(first), tiny.model(**half).loss)
    none = out.ce(torch.zeros_like(first))
    assert none.item() == 0.0  # not nan: a batch may hold no answer token of one kind


def test_gradients_match_the_full_forward(tiny):
    model = attach_adapter(tiny.model, "default", peft_lora_config(LoraConfig(r=4, dropout=0.0)))
    batch = _batch(tiny)
    params = [p for p in model.parameters() if p.requires_grad]
    g_full = torch.autograd.grad(model(**batch).loss, params)
    g_ans = torch.autograd.grad(ce_loss(model, batch).total, params)
    for a, b in zip(g_full, g_ans, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_models_that_rescale_logits_take_the_full_forward(tiny):
    batch = _batch(tiny)
    tiny.model.config.final_logit_softcapping = 30.0  # llama ignores it; the helper must not assume that
    seen = []
    hook = tiny.model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    answer_logits(tiny.model, batch)
    hook.remove()
    assert seen == [batch["input_ids"].shape + (tiny.model.config.vocab_size,)]  # every position
