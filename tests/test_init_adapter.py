"""A run's first task starting from a registry adapter (tasks[0].init_adapter): each method that can
start from one begins with exactly its weights; the config is pinned and its LoRA shape taken from the
adapter; what cannot start from it is refused with the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TASK_A, make_task
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from cltune.config import LoraConfig, ModelConfig, parse_config
from cltune.errors import ConfigError
from cltune.init_adapter import attach, check_started, open_init, pin, pin_config
from cltune.methods import build_method
from cltune.methods.common import adapter_state, peft_lora_config
from cltune.methods.ilora import FAST, SLOW
from cltune.models import build_tiny_llama, load_model
from cltune.registry import Registry

LORA = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry holding `start@1`: random (non-zero) A and B on tiny-llama seed 0."""
    reg = Registry(tmp_path_factory.mktemp("init") / "adapters")
    model, _, fp = build_tiny_llama(0)
    pm = get_peft_model(model, peft_lora_config(LORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, LoraLayer):
                for w in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    reg.save(
        pm,
        "default",
        {"name": "start", "base_model": "tiny-llama", "base_fingerprint": fp, "method": "imported"},
    )
    return reg


def config(**first: object) -> dict:
    return {
        "model": {"name": "tiny-llama", "device": "cpu"},
        "tasks": [{"name": "a", "train": "a.jsonl", "init_adapter": "start", **first}],
    }


@pytest.mark.parametrize("method", ["seq_lora", "ilora", "dema", "npo"])
def test_the_first_task_starts_from_the_adapters_weights(registry: Registry, method: str) -> None:
    loaded = load_model(ModelConfig(name="tiny-llama", device="cpu"))
    cfg = parse_config({**config(), "lora": LORA.model_dump(), "method": {"name": method}})
    init = open_init(cfg, registry, loaded)
    assert init is not None and init.ref == "start@1"
    model, previous = attach(loaded.model, cfg.lora, init)
    m = build_method(method)
    model = m.prepare(model, make_task(loaded, TASK_A[:4], lora=cfg.lora), previous)
    check_started(model, m, init)  # raises when the served adapter does not start as the given one
    adapters = [FAST, SLOW] if method == "ilora" else [m.serve_adapter]
    for name in adapters:
        served = adapter_state(model, name)
        assert served.keys() == init.tensors.keys()
        assert all(torch.equal(served[k], v) for k, v in init.tensors.items()), name
    assert any(v.abs().sum() > 0 for k, v in init.tensors.items() if "lora_B" in k)  # not peft's zero init


def test_a_method_that_ignores_the_handed_adapter_is_caught(registry: Registry) -> None:
    loaded = load_model(ModelConfig(name="tiny-llama", device="cpu"))
    cfg = parse_config({**config(), "lora": LORA.model_dump()})
    init = open_init(cfg, registry, loaded)
    assert init is not None
    model, _ = attach(loaded.model, cfg.lora, init)
    m = build_method("seq_lora")
    m.serve_adapter = "fresh"  # as if it trained an adapter of its own beside the one it was handed ...
    model = m.prepare(model, make_task(loaded, TASK_A[:4], lora=cfg.lora), None)  # ... ignoring it
    with pytest.raises(ConfigError, match="does not start its adapter 'fresh' from init_adapter start@1"):
        check_started(model, m, init)


def test_pin_fixes_the_version_and_takes_the_lora_shape_from_the_adapter(registry: Registry) -> None:
    data = {**config(), "lora": {"dropout": 0.1}}
    assert pin(data, registry) == []
    assert data["tasks"][0]["init_adapter"] == "start@1"
    assert data["lora"] == {
        "dropout": 0.1,  # the job's own
        "r": 4,
        "alpha": 8.0,
        "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": None,
    }
    same = {**config(), "lora": {"target_modules": ["v_proj", "q_proj"], "r": 4}}  # order does not matter
    assert pin(same, registry) == []


def test_pin_names_the_field_of_each_problem(registry: Registry) -> None:
    errors = pin({**config(), "lora": {"r": 8}}, registry)
    assert [e["field"] for e in errors] == ["lora.r"] and "start@1's 4" in errors[0]["message"]
    errors = pin(config(init_adapter="nope@3"), registry)
    assert errors[0]["field"] == "tasks.0.init_adapter" and "unknown adapter 'nope@3'" in errors[0]["message"]
    other = {**config(), "model": {"name": "smollm2-135m"}}
    errors = pin(other, registry)
    assert (
        errors[0]["field"] == "tasks.0.init_adapter"
        and "is for base model 'tiny-llama'" in errors[0]["message"]
    )
    assert pin({"tasks": [{"name": "a", "train": "x"}]}, registry) == []  # no init_adapter: nothing to do


def test_pin_config_keeps_what_the_file_set_and_fills_the_rest(registry: Registry) -> None:
    cfg = pin_config(parse_config({**config(), "lora": {"dropout": 0.0}}), registry)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 8.0, 0.0)
    assert cfg.tasks[0].init_adapter == "start@1" and cfg.model.name == "tiny-llama"
    with pytest.raises(ConfigError, match="lora.alpha"):
        pin_config(parse_config({**config(), "lora": {"alpha": 32}}), registry)


def test_run_time_checks_the_base_weights_and_the_lora_shape(registry: Registry, tmp_path: Path) -> None:
    other_seed = load_model(ModelConfig(name="tiny-llama", device="cpu", seed=1))
    cfg = parse_config({**config(), "lora": LORA.model_dump()})
    with pytest.raises(ConfigError, match=r"was trained on 'tiny-llama' \(tiny-llama:"):
        open_init(cfg, registry, other_seed)
    loaded = load_model(ModelConfig(name="tiny-llama", device="cpu"))
    with pytest.raises(ConfigError, match="lora.r: 8 differs from init_adapter start@1's 4"):
        open_init(parse_config(config()), registry, loaded)  # lora left at r=8: not pinned
    with pytest.raises(ConfigError, match="has no registry"):
        open_init(cfg, None, loaded)


def test_the_config_refuses_init_adapter_on_later_tasks_and_for_methods_with_their_own_layout() -> None:
    later = config()
    later["tasks"] = [{"name": "a", "train": "a"}, {"name": "b", "train": "b", "init_adapter": "start"}]
    with pytest.raises(ConfigError, match="tasks.1.init_adapter: only the first task"):
        parse_config(later)
    with pytest.raises(ConfigError, match="method 'kappatune' chooses its own LoRA layout.*seq_lora"):
        parse_config({**config(), "method": {"name": "kappatune"}})
    with pytest.raises(ConfigError, match="invalid adapter version '0'"):
        parse_config(config(init_adapter="start@0"))
    with pytest.raises(ConfigError, match="invalid adapter name"):
        parse_config(config(init_adapter="../x"))
