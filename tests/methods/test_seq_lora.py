"""seq_lora after another method's task continues from what that task served."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import NO_DROPOUT, TASK_A, make_task, randomise_lora

from cltune.config import LoraConfig
from cltune.errors import ConfigError
from cltune.methods.base import MethodState
from cltune.methods.common import adapter_state, attach_adapter, peft_lora_config
from cltune.methods.seq_lora import SeqLora

LORA = NO_DROPOUT


def _after_ilora(tiny):
    """A model as I-LoRA leaves it: a fast adapter ("default") and the served slow one, unlike it."""
    model = attach_adapter(tiny.model, "default", peft_lora_config(LORA))
    model = attach_adapter(model, "slow", peft_lora_config(LORA))
    randomise_lora(model, "default", 1, std=1.0)
    randomise_lora(model, "slow", 2, std=1.0)
    return model, MethodState(meta={"method": "ilora", "serve_adapter": "slow"})


def test_seq_lora_after_ilora_continues_from_the_served_slow_adapter(tiny):
    model, state = _after_ilora(tiny)
    slow = adapter_state(model, "slow")
    model = SeqLora().prepare(model, make_task(tiny, TASK_A, lora=LORA), state)
    trained = adapter_state(model, "default")
    assert trained.keys() == slow.keys()
    for k in slow:
        torch.testing.assert_close(trained[k], slow[k])
    assert model.active_adapter == "default"


def test_seq_lora_after_its_own_task_keeps_its_adapter(tiny):
    model, _ = _after_ilora(tiny)
    before = adapter_state(model, "default")
    model = SeqLora().prepare(
        model, make_task(tiny, TASK_A, lora=LORA), MethodState(meta={"method": "seq_lora"})
    )
    for k, v in adapter_state(model, "default").items():
        torch.testing.assert_close(v, before[k])


def test_a_served_adapter_of_another_layout_warns_or_refuses_after_unlearning(tiny):
    model = attach_adapter(tiny.model, "default", peft_lora_config(LORA))
    other = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["k_proj"])
    model = attach_adapter(model, "kappa", peft_lora_config(other))
    state = MethodState(meta={"method": "kappatune", "serve_adapter": "kappa"})
    events: list[tuple[str, dict]] = []
    task = dataclasses.replace(make_task(tiny, TASK_A, lora=LORA), log=lambda m, **d: events.append((m, d)))
    before = adapter_state(model, "default")
    model = SeqLora().prepare(model, task, state)
    assert [d.get("level") for _, d in events] == ["warning"] and "'kappa'" in events[0][0]
    for k, v in adapter_state(model, "default").items():
        torch.testing.assert_close(v, before[k])
    forgot = dataclasses.replace(task, forgotten=frozenset({"ab" * 32}))
    with pytest.raises(ConfigError, match="unlearned"):
        SeqLora().prepare(model, forgot, state)
