"""seq_lora: the baseline. One LoRA adapter, trained on task 1, then on task 2, and so on.

After another method's task it continues from what that task served (I-LoRA's slow adapter, DEMA's
group, an unlearned adapter) when the LoRA layout matches; otherwise from its own adapter, with a warning,
and it refuses when examples were unlearned in the run (its own older weights never forgot them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from cltune.methods.base import LossOutput, MethodState, TaskContext, continues_other
from cltune.methods.common import (
    adapter_parameters,
    attach_adapter,
    ce_loss,
    continue_served,
    only_train,
    peft_lora_config,
)


class SeqLoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeqLora:
    name: ClassVar[str] = "seq_lora"
    Params: ClassVar[type[BaseModel]] = SeqLoraParams
    train_defaults: ClassVar[Mapping[str, float]] = {"lr": 1e-3}  # docs/benchmarks.md, "Learning rates"

    def __init__(self, params: SeqLoraParams | None = None) -> None:
        self.params = params or SeqLoraParams()
        self.serve_adapter = "default"

    def prepare(self, model: nn.Module, task: TaskContext, state: MethodState | None) -> nn.Module:
        model = attach_adapter(model, self.serve_adapter, peft_lora_config(task.lora))
        source = continues_other(self.name, state)
        if source is not None:
            continue_served(model, source, (self.serve_adapter,), task, self.name)
        model.set_adapter(self.serve_adapter)
        only_train(model, self.trainable_parameters(model))
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return adapter_parameters(model, self.serve_adapter)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        return ce_loss(model, batch)

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def after_task(self, model: nn.Module, task: TaskContext) -> MethodState:
        return MethodState(meta={"method": self.name})

    def state_dict(self) -> MethodState:
        return MethodState()

    def load_state_dict(self, state: MethodState) -> None:
        pass
