"""The contract every registered method keeps (docs/architecture.md, the Method protocol), run over
METHODS as found at run time: two tasks of prepare -> 3 steps -> after_task -> Registry.save, and after
each one PeftModel.from_pretrained(fresh base, saved dir) gives the served adapter's logits; the frozen
base weights stay bit-identical; the method state survives a save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TASK_A, TASK_B, make_task
from peft import PeftModel
from safetensors.torch import load_file

from cltune.config import LoraConfig, TrainConfig
from cltune.data import collate
from cltune.methods import METHODS, build_method
from cltune.methods.base import MethodState
from cltune.methods.common import preserved_training_state
from cltune.models import build_tiny_llama
from cltune.registry import Registry
from cltune.train import train_task

TASKS = [("a", TASK_A, TASK_B[:8]), ("b", TASK_B, TASK_A[:8])]  # (name, train pairs, retain pairs)
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _assert_state_round_trips(state: MethodState, directory) -> None:
    state.save(directory)
    back = MethodState.load(directory)
    assert back is not None
    assert back.meta == json.loads(json.dumps(state.meta))
    assert set(back.tensors) == set(state.tensors)
    for k, v in state.tensors.items():
        assert torch.equal(back.tensors[k], v.detach().cpu()), k


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_saves_and_reloads_to_the_served_logits(name, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CLTUNE_DATA_DIR", str(tmp_path / "data"))  # method caches (kappa table)
    frozen = [(n, p, p.detach().clone()) for n, p in tiny.model.named_parameters()]
    registry = Registry(tmp_path / "registry")
    model, state = tiny.model, None
    for t, (task_name, pairs, retain) in enumerate(TASKS):
        task = make_task(
            tiny,
            pairs,
            index=t,
            name=task_name,
            lora=LORA,
            retain=retain,
            train=TrainConfig(steps=3, batch_size=4, max_len=64),
        )
        method = build_method(name)
        model = method.prepare(model, task, state)
        params = method.trainable_parameters(model)
        assert params and all(p.requires_grad for p in params)
        train_task(model, method, task, task.train_cfg)

        checkpoint = method.state_dict()  # mid-task checkpoint shape: save, load, load_state_dict
        _assert_state_round_trips(checkpoint, tmp_path / f"ckpt-{t}")
        method.load_state_dict(MethodState.load(tmp_path / f"ckpt-{t}") or MethodState())

        state = method.after_task(model, task)
        assert state.meta.get("method") == name  # the next task's method tells its own state apart
        _assert_state_round_trips(state, tmp_path / f"state-{t}")
        rec = registry.save(
            model,
            method.serve_adapter,
            {
                "name": "contract",
                "base_model": tiny.name,
                "base_fingerprint": tiny.fingerprint,
                "method": name,
                "notes": state.meta.get("notes", {}),
            },
            state,
        )
        saved = registry.path(rec.name, rec.version)
        tensors = load_file(saved / "adapter_model.safetensors")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items()), (
            "served adapter never trained"
        )

        batch = collate(task.train[:4], task.pad_id)
        with preserved_training_state(model):
            model.eval()
            model.set_adapter(method.serve_adapter)
            served = _logits(model, batch)
        fresh = PeftModel.from_pretrained(build_tiny_llama(seed=0)[0], str(saved)).eval()
        torch.testing.assert_close(_logits(fresh, batch), served, rtol=1e-5, atol=1e-5)
        assert registry.method_state(rec.ref) is not None

    for n, p, before in frozen:
        assert torch.equal(p.detach(), before), f"{name} changed frozen base weight {n}"
