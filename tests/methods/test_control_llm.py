"""Control LLM invariants (docs/methods.md section 3): layer choice, identity at init, lerp, divergence,
generation through the wrapped layers, merge-back, unwrap / rewrap across tasks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    TASK_A,
    TASK_B,
    assert_gradients_are_the_oracles,
    batch_logits,
    method_task,
    randomise_lora,
)
from peft.tuners.lora import LoraLayer

from cltune.data import collate, left_pad
from cltune.errors import ConfigError, StopRequested
from cltune.methods.control_llm import (
    ADAPTER,
    ControlLlm,
    ControlLlmParams,
    InterpolatedForward,
    expansion_layers,
)
from cltune.models import LoadedModel, build_tiny_llama, decoder_layers
from cltune.train import Callbacks, train_task


@pytest.fixture
def tiny4() -> LoadedModel:
    """A 4-layer tiny Llama: K=2 expands layers 1 and 3."""
    model, tok, fp = build_tiny_llama(seed=0, layers=4)
    return LoadedModel(model.eval(), tok, "tiny4", fp, torch.device("cpu"), torch.float32)


def _task(loaded, pairs=TASK_A, index=0, steps=3):
    return method_task(loaded, pairs, index, steps=steps, lr=1e-2)


def _randomise_b(model, seed: int = 0, std: float = 0.2) -> None:
    """Give lora_B non-zero values so the adapted pass differs from the frozen one."""
    randomise_lora(model, ADAPTER, seed, std, part="lora_B")


def _wrapped(model) -> list[int]:
    return [
        i
        for i, layer in enumerate(decoder_layers(model))
        if isinstance(layer.__dict__.get("forward"), InterpolatedForward)
    ]


def test_expansion_layers_are_every_split_th_layer():
    assert expansion_layers(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert expansion_layers(4, 2) == [1, 3]
    assert expansion_layers(2, 1) == [1]
    assert expansion_layers(30, 8) == [8, 11, 14, 17, 20, 23, 26, 29]  # split 3 gives 10: the deepest 8
    with pytest.raises(ConfigError, match="num_expanded=5"):
        expansion_layers(4, 5)


def test_logits_equal_base_logits_and_divergence_is_zero_at_init(tiny4):
    task = _task(tiny4)
    batch = collate(task.train[:4], task.pad_id)
    base = batch_logits(tiny4.model, batch)
    m = ControlLlm(ControlLlmParams(num_expanded=2))
    model = m.prepare(tiny4.model, task, None)
    model.eval()
    assert torch.equal(batch_logits(model, batch), base)
    model.train()
    out = m.loss(model, batch)
    assert out.parts["divergence"] == 0.0
    assert out.parts["ce"] == pytest.approx(out.total.item())


def test_only_expansion_layers_have_trainable_tensors(tiny4):
    m = ControlLlm(ControlLlmParams(num_expanded=2))
    model = m.prepare(tiny4.model, _task(tiny4), None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = {int(n.split("layers.")[1].split(".")[0]) for n in names}
    assert layers == {1, 3}
    assert all("lora_" in n for n in names)
    assert len(names) == 2 * 7 * 2  # 2 layers x 7 linear modules (all-linear) x (A, B)
    assert {id(p) for p in m.trainable_parameters(model)} == {
        id(p) for _, p in model.named_parameters() if p.requires_grad
    }


def test_wrapped_layer_returns_lerp_of_frozen_and_adapted_passes(tiny4):
    m = ControlLlm(ControlLlmParams(num_expanded=2, init_logit=1.0))
    model = m.prepare(tiny4.model, _task(tiny4), None)
    _randomise_b(model)
    model.eval()
    root = model.get_base_model().model
    layer = decoder_layers(model)[1]
    h = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))  # [B, T, H]
    pos = torch.arange(5).unsqueeze(0)
    kw = {"position_ids": pos, "position_embeddings": root.rotary_emb(h, pos)}
    with torch.no_grad():
        out = layer(h, **kw)
        h_e = layer.__dict__["forward"].inner(h, **kw)  # adapters on
        with model.disable_adapter():
            h_p = layer(h, **kw)  # disabled: the wrapper is the plain frozen layer
    w = torch.sigmoid(torch.tensor(1.0))
    assert not torch.allclose(h_e, h_p)
    torch.testing.assert_close(out, (1 - w) * h_p + w * h_e, rtol=1e-5, atol=1e-6)


def test_divergence_averages_over_non_padding_positions_only(tiny4):
    m = ControlLlm(ControlLlmParams(num_expanded=2))
    model = m.prepare(tiny4.model, _task(tiny4), None)
    _randomise_b(model)
    model.eval()  # no dropout: the two batches must see identical hidden states
    task = _task(tiny4)
    one = collate(task.train[:1], task.pad_id)
    padded = collate([task.train[0], max(task.train, key=lambda x: len(x["input_ids"]))], task.pad_id)
    padded = {k: v[:1] for k, v in padded.items()}  # row 0 now carries right padding
    assert padded["input_ids"].shape[1] > one["input_ids"].shape[1]
    d1 = m.loss(model, one).parts["divergence"]
    d2 = m.loss(model, padded).parts["divergence"]
    assert d1 > 0
    assert d2 == pytest.approx(d1, rel=1e-5)


def _ce_and_divergence_oracle(model, m, batch):
    """CE and the per-layer divergence written out: forward hooks on the expanded layers recompute the
    frozen (LoRA off) and adapted passes from the layer's input; each layer's value is the mean of
    (h_e - h_p)^2 over features and real (unpadded) positions. Returns (ce, [per-layer divergence])."""
    mask = batch["attention_mask"].float()
    per_layer = []

    def hook(layer, args, kwargs, output):
        wrapper = layer.__dict__["forward"]
        h, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        for lora in wrapper.loras:
            lora._disable_adapters = True
        try:
            h_p = wrapper.inner(h, *rest, **kwargs)
        finally:
            for lora in wrapper.loras:
                lora._disable_adapters = False
        h_e = wrapper.inner(h, *rest, **kwargs)
        h_p, h_e = (x[0] if isinstance(x, tuple) else x for x in (h_p, h_e))
        per_layer.append((((h_e - h_p) ** 2).mean(-1) * mask).sum() / mask.sum())

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(hook, with_kwargs=True) for i in m.layers]
    try:
        keys = ("input_ids", "attention_mask", "labels")
        ce = model(**{k: batch[k] for k in keys}, use_cache=False).loss
    finally:
        for handle in handles:
            handle.remove()
    return ce, per_layer


def test_loss_adds_weight_times_divergence_averaged_over_the_expanded_layers_with_its_gradient(tiny4):
    weight = 20.0  # large enough for the divergence to be a tenth of the loss
    m = ControlLlm(ControlLlmParams(num_expanded=2, divergence_weight=weight))
    task = _task(tiny4)
    model = m.prepare(tiny4.model, task, None)
    _randomise_b(model)
    model.eval()  # no dropout: the oracle's forward must see the same network
    batch = collate(task.train[8:12], task.pad_id)  # "add one to 8" ... "11": different lengths
    assert (batch["attention_mask"] == 0).any()  # padded rows: the divergence averages real tokens only
    params = m.trainable_parameters(model)
    out = m.loss(model, batch)
    got = torch.autograd.grad(out.total, params)
    ce, per_layer = _ce_and_divergence_oracle(model, m, batch)
    assert len(per_layer) == 2 and min(d.item() for d in per_layer) > 0
    div = (per_layer[0] + per_layer[1]) / 2  # the mean over the K = 2 expanded layers, not their sum
    expected = ce + weight * div
    assert weight * div.item() > 0.05 * ce.item()
    assert out.parts["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert out.parts["divergence"] == pytest.approx(div.item(), rel=1e-5)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_gradients_are_the_oracles(got, expected, ce, params, "the divergence")


def test_generation_through_wrapped_layers_matches_generation_without_cache(tiny4):
    m = ControlLlm(ControlLlmParams(num_expanded=2))
    model = m.prepare(tiny4.model, _task(tiny4), None)
    _randomise_b(model, std=0.5)
    model.eval()
    task = _task(tiny4)
    ids, mask = left_pad(
        [x["input_ids"][:6] for x in task.train[:3]] + [task.train[5]["input_ids"][:9]], task.pad_id
    )
    kw = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 8,
        "do_sample": False,
        "pad_token_id": task.pad_id,
        "eos_token_id": None,
    }
    with torch.no_grad():
        cached = model.generate(**kw)
        uncached = model.generate(**kw, use_cache=False)
        with model.disable_adapter():
            base = model.generate(**kw)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)  # the adapter does change the output


def test_served_adapter_is_w_times_the_trained_delta(tiny4):
    m = ControlLlm(ControlLlmParams(num_expanded=2, init_logit=0.7, train_w=True))
    task = _task(tiny4)
    model = m.prepare(tiny4.model, task, None)
    assert any(p is m.f for p in m.trainable_parameters(model))
    train_task(model, m, task, task.train_cfg)
    state = m.after_task(model, task)
    w = state.meta["w"]
    assert w != pytest.approx([torch.sigmoid(torch.tensor(0.7)).item()] * 2)  # f was trained
    assert state.meta["notes"]["expanded_layers"] == [1, 3]
    assert "first order" in state.meta["notes"]["approximation"]
    assert _wrapped(model) == []  # plain peft model again
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and ADAPTER in mod.lora_A:
            key = name + ".lora_{}.weight"  # peft on-disk names
            a = state.tensors["adapter." + key.format("A")]
            b = state.tensors["adapter." + key.format("B")]
            k = [1, 3].index(int(name.split("layers.")[1].split(".")[0]))
            served = mod.lora_B[ADAPTER].weight @ mod.lora_A[ADAPTER].weight
            assert b.abs().sum() > 0
            torch.testing.assert_close(served, w[k] * (b @ a), rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked == 14


def test_next_task_restores_unscaled_weights_and_rewraps(tiny4):
    m1 = ControlLlm(ControlLlmParams(num_expanded=2))
    t0 = _task(tiny4)
    model = m1.prepare(tiny4.model, t0, None)
    assert _wrapped(model) == [1, 3]
    train_task(model, m1, t0, t0.train_cfg)
    state = m1.after_task(model, t0)
    m2 = ControlLlm(ControlLlmParams(num_expanded=2))
    model = m2.prepare(model, _task(tiny4, TASK_B, index=1), state)
    assert _wrapped(model) == [1, 3]  # exactly once each, not wrapped twice
    params = dict(model.named_parameters())
    for key, v in state.tensors.items():
        if key.startswith("adapter."):
            live = params[key.removeprefix("adapter.").replace(".weight", f".{ADAPTER}.weight")]
            assert torch.equal(live.detach(), v)  # the unscaled weights, not the served ones
    with pytest.raises(ConfigError, match="layers"):
        ControlLlm(ControlLlmParams(num_expanded=1)).prepare(model, _task(tiny4, TASK_B, index=1), state)


def test_dlerp_gate_trains_and_its_mean_gate_is_served(tiny4):
    m = ControlLlm(ControlLlmParams(num_expanded=2, merge="dlerp"))
    task = _task(tiny4)
    model = m.prepare(tiny4.model, task, None)
    assert any(p is m.gate_w for p in m.trainable_parameters(model))
    batch = collate(task.train[:4], task.pad_id)
    model.eval()
    base_model_logits = batch_logits(model, batch)
    with model.disable_adapter():
        # identity at init holds for dlerp too
        assert torch.equal(batch_logits(model, batch), base_model_logits)
    train_task(model, m, task, task.train_cfg)
    assert m.gate_w.abs().sum() > 0
    state = m.after_task(model, task)
    assert len(state.meta["w"]) == 2 and all(0.0 < x < 1.0 for x in state.meta["w"])
    assert state.meta["w"] == pytest.approx((m.w_sum / m.w_count).tolist())


def test_stopped_task_resumes_to_the_same_weights_as_an_uninterrupted_run(tiny4, tmp_path):
    task = _task(tiny4, steps=4)
    params = ControlLlmParams(num_expanded=2, train_w=True)

    def trained(model, method):
        return [p.detach().clone() for p in method.trainable_parameters(model)]

    m = ControlLlm(params)
    torch.manual_seed(0)  # the same lora_A init in both runs
    model = m.prepare(copy.deepcopy(tiny4.model), task, None)
    train_task(model, m, task, task.train_cfg)
    expected = trained(model, m)

    m = ControlLlm(params)
    torch.manual_seed(0)  # the same lora_A init in both runs
    model = m.prepare(copy.deepcopy(tiny4.model), task, None)
    stops = iter([False, False, True])
    with pytest.raises(StopRequested):
        train_task(
            model,
            m,
            task,
            task.train_cfg,
            checkpoint_dir=tmp_path / "ck",
            callbacks=Callbacks(should_stop=lambda: next(stops)),
        )
    m = ControlLlm(params)  # a new process would build a new method; the old wrappers are still installed
    model = m.prepare(model, task, None)
    assert _wrapped(model) == [1, 3]
    train_task(model, m, task, task.train_cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    got = trained(model, m)
    assert len(got) == len(expected) == 2 * 7 * 2 + 1  # LoRA tensors + f
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(m.f.detach(), torch.zeros(2))  # f moved, and came back through the checkpoint
