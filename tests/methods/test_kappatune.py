"""KappaTune invariants (docs/methods.md section 4): ranking by condition number, exclusions, the base
weights of a wrapped model, caching per weights, rank matching, the selection stored with the adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import NO_DROPOUT, TASK_A, TASK_B, method_task
from peft.helpers import KappaTuneSelector
from torch import nn

from cltune.errors import ConfigError
from cltune.methods.common import attach_adapter, peft_lora_config
from cltune.methods.kappatune import (
    ADAPTER,
    KappaTune,
    KappaTuneParams,
    adapted_modules,
    base_linear_modules,
    cached_kappa_table,
    condition_number,
    kappa_table,
    rank_modules,
    select_modules,
)
from cltune.models import LoadedModel, build_tiny_llama
from cltune.train import train_task


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("CLTUNE_DATA_DIR", str(tmp_path / "data"))


def _with_singular_values(lin: nn.Linear, s: list[float], seed: int) -> nn.Linear:
    """Set lin.weight = U diag(s) V^T with random orthogonal U, V."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = lin.weight.shape
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    with torch.no_grad():
        lin.weight.copy_(u[:, : len(s)] @ torch.diag(torch.tensor(s)) @ v[:, : len(s)].T)
    return lin


def test_condition_number_matches_prescribed_spectrum():
    for s, kappa in (([4.0, 2.0, 1.0], 4.0), ([50.0, 5.0], 10.0), ([3.0, 3.0, 3.0], 1.0)):
        g = torch.Generator().manual_seed(len(s))
        u, _ = torch.linalg.qr(torch.randn(len(s), len(s), generator=g))
        v, _ = torch.linalg.qr(torch.randn(len(s), len(s), generator=g))
        w = u @ torch.diag(torch.tensor(s)) @ v.T
        assert condition_number(w) == pytest.approx(kappa, rel=1e-4)


class Prescribed(nn.Module):
    """Square layers with full-rank prescribed spectra, an output head and an embedding projection
    better conditioned than all of them."""

    def __init__(self) -> None:
        super().__init__()
        spectra = {
            "c": [100.0, 5.0, 2.0, 1.0],
            "a": [2.0, 1.5, 1.0, 1.0],
            "b": [30.0, 9.0, 3.0, 3.0],
            "d": [10.0, 7.0, 4.0, 1.0],
            "lm_head": [1.0] * 4,
            "embed_proj": [1.0] * 4,
        }
        for i, (name, s) in enumerate(spectra.items()):
            setattr(self, name, _with_singular_values(nn.Linear(4, 4, bias=False), s, i))


def test_modules_are_ranked_by_prescribed_kappa_with_exclusions_and_name_tie_break():
    model = Prescribed()
    modules = base_linear_modules(model)
    assert set(modules) == {"a", "b", "c", "d"}  # lm_head and embeddings never considered
    table = kappa_table(modules)
    expected = {"a": 2.0, "b": 10.0, "c": 100.0, "d": 10.0}
    for n, k in expected.items():
        assert table[n] == pytest.approx(k, rel=1e-4)
    table["d"] = table["b"]  # exact tie: decided by name
    assert [n for n, _ in rank_modules(table)] == ["a", "b", "d", "c"]
    assert select_modules(table, top_p=0.5, num_modules=None) == ["a", "b"]
    assert select_modules(table, top_p=0.1, num_modules=None) == ["a"]  # at least one
    assert select_modules(table, top_p=0.2, num_modules=3) == ["a", "b", "d"]
    assert select_modules(table, top_p=1.0, num_modules=None, candidates=["c", "d"]) == ["d", "c"]
    with pytest.raises(ConfigError, match="no candidate"):
        select_modules(table, top_p=1.0, num_modules=None, candidates=["q_proj"])


def test_peft_helper_ranks_the_same_but_would_pick_the_excluded_head():
    model = Prescribed()
    peft_order = KappaTuneSelector(model, show_progress=False).get_best_targets()
    assert "lm_head" in peft_order[:2]  # why the exclusion exists
    ours = [n for n, _ in rank_modules(kappa_table(base_linear_modules(model)))]
    assert [n for n in peft_order if n in ours] == ours


def test_wrapped_model_is_read_through_base_layers_and_merged_one_is_refused(tiny):
    raw = kappa_table(base_linear_modules(tiny.model))
    assert not any("lm_head" in n or "embed" in n for n in raw)
    assert len(raw) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    model = attach_adapter(tiny.model, "default", peft_lora_config(NO_DROPOUT))
    wrapped = kappa_table(base_linear_modules(model))
    assert wrapped == raw  # same names, same values: never lora_A / lora_B / base_layer
    model.merge_adapter()
    with pytest.raises(ConfigError, match="merged"):
        base_linear_modules(model)


def test_kappa_table_is_cached_per_weights(tiny):
    t1, i1 = cached_kappa_table(tiny.model, 16384)
    t2, i2 = cached_kappa_table(tiny.model, 16384)
    assert (i1["cached"], i2["cached"]) == (False, True)
    assert t1 == t2 and i1["fingerprint"] == i2["fingerprint"]
    with torch.no_grad():
        tiny.model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    t3, i3 = cached_kappa_table(tiny.model, 16384)
    assert not i3["cached"] and i3["fingerprint"] != i1["fingerprint"]
    assert t3["model.layers.0.self_attn.q_proj"] != t1["model.layers.0.self_attn.q_proj"]


def _task(tiny, pairs=TASK_A, index=0):
    return method_task(tiny, pairs, index, steps=2)


def test_selection_rank_and_trainable_tensors_are_stored_with_the_adapter(tiny):
    m = KappaTune(KappaTuneParams(top_p=0.2))
    task = _task(tiny)
    model = m.prepare(tiny.model, task, None)
    sel = m.meta["selection"]
    assert len(sel) == int(14 * 0.2)
    assert sel == [n for n, _ in rank_modules(m.meta["table"])][: len(sel)]
    trainable = {
        n.split(".lora_")[0].removeprefix("base_model.model.")
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == set(sel)
    # rank raised so the trainable count matches LoRA r=4 on q, v of both layers
    n_params = sum(p.numel() for p in m.trainable_parameters(model))
    assert n_params == m.meta["trainable_params"]
    per_rank = n_params // m.meta["rank"]
    assert m.meta["baseline_params"] == 2 * 4 * ((128 + 128) + (128 + 64))  # 2 layers; v_proj 128 -> 64 (GQA)
    assert abs(n_params - m.meta["baseline_params"]) <= per_rank / 2
    assert model.peft_config[ADAPTER].lora_alpha / m.meta["rank"] == NO_DROPOUT.alpha / NO_DROPOUT.r
    train_task(model, m, task, task.train_cfg)
    state = m.after_task(model, task)
    assert state.meta["notes"]["selection"] == sel
    assert state.meta["notes"]["kappa"] == {n: m.meta["table"][n] for n in sel}
    assert state.meta["method"] == "kappatune"


def test_next_task_reuses_the_stored_selection(tiny):
    m1 = KappaTune()
    t0 = _task(tiny)
    model = m1.prepare(tiny.model, t0, None)
    state = m1.after_task(model, t0)
    m2 = KappaTune()
    model = m2.prepare(model, _task(tiny, TASK_B, index=1), state)
    assert m2.meta["selection"] == m1.meta["selection"]
    assert list(model.peft_config) == [ADAPTER]  # the same adapter continues


def test_without_param_matching_the_run_rank_is_used(tiny):
    m = KappaTune(KappaTuneParams(match_params=False, num_modules=3))
    m.prepare(tiny.model, _task(tiny), None)
    assert m.meta["rank"] == NO_DROPOUT.r and len(m.meta["selection"]) == 3


def test_a_large_selection_wraps_exactly_the_selected_modules():
    model, tok, fp = build_tiny_llama(seed=0, layers=4)
    loaded = LoadedModel(model, tok, "tiny4", fp, torch.device("cpu"), torch.float32)
    m = KappaTune(KappaTuneParams(top_p=0.9))
    peft_model = m.prepare(model, _task(loaded), None)
    assert len(m.meta["selection"]) == int(28 * 0.9) > 20  # peft shortens target lists of 20 or more names
    assert adapted_modules(peft_model) == sorted(m.meta["selection"])
