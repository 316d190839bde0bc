"""The Method protocol: the seam between the training loop and a continual-learning method.

The loop (cltune/train.py) calls, per task:
    model = method.prepare(model, task, state)       # attach adapters / wrap layers / select targets
    params = method.trainable_parameters(model)      # the optimizer is built from these only
    for each step:  method.loss(model, batch) -> backward -> clip -> optimizer.step()
                    (batch: input_ids, attention_mask, labels, index = rows of task.train; with several
                     processes this rank's share, and global_index = every rank's rows of the batch)
                    method.after_step(model, step)   # gradients are still present here
    state = method.after_task(model, task)           # saved beside the adapter; fed to the next task
and serves / registers the peft adapter named `method.serve_adapter`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from cltune.data import Example
from cltune.sections import LoraConfig, TrainConfig

STATE_TENSORS = "method_state.safetensors"
STATE_META = "method_state.json"
# state meta key: example_sha256 of each example an unlearning task forgot (the sequence collects them)
FORGOTTEN_EXAMPLES = "forgotten_examples_sha256"


@dataclass
class LossOutput:
    total: torch.Tensor  # scalar that is backpropagated
    parts: dict[str, float] = field(default_factory=dict)  # logged components (ce, l_cons, ...)


@dataclass
class MethodState:
    """What a method carries between tasks (and into a mid-task checkpoint)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}, d / STATE_TENSORS)
        (d / STATE_META).write_text(json.dumps(self.meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> MethodState | None:
        d = Path(directory)
        if not (d / STATE_META).exists():
            return None
        tensors = load_file(d / STATE_TENSORS) if (d / STATE_TENSORS).exists() else {}
        return cls(tensors, json.loads((d / STATE_META).read_text()))


@dataclass
class TaskContext:
    """Everything a method may look at for the task being trained."""

    index: int  # 0-based position in the sequence
    name: str
    train: list[dict[str, Any]]  # tokenised: {input_ids, labels, index}
    examples: list[Example]  # the raw training examples (instructions for codebooks)
    lora: LoraConfig
    train_cfg: TrainConfig
    pad_id: int
    device: torch.device
    retain: list[dict[str, Any]] | None = None  # tokenised retain set (unlearning)
    log: Any = None  # callable(message, **data) for job events; None: silent
    rank: int = 0  # data-parallel runs: this process's rank of `world`; a batch holds its share only
    world: int = 1
    # A sequence that mixes methods: this method's state from its last task in the run (None: its
    # first task), kept across other methods' tasks, and the sha256 of the token ids of every example
    # unlearned earlier in the run (example_sha256), so replayed or stored copies can be dropped.
    own_state: MethodState | None = None
    forgotten: frozenset[str] = frozenset()
    # Adapter groups (DEMA's) that the previous task's served adapter is one of: their last state, and
    # instruction -> the adapter that answers it, as served. An unlearning task unlearns the group its
    # forget set routes to. None: no groups.
    grouped: MethodState | None = None
    route: Callable[[str], str] | None = None

    def emit(self, message: str, **data: Any) -> None:
        if self.log is not None:
            self.log(message, **data)


def own_state(name: str, task: TaskContext, state: MethodState | None) -> MethodState | None:
    """The state method `name` left after its last task: the previous task's `state` when that task
    was this method's, else the one the sequence kept across other methods' tasks (`task.own_state`)."""
    if state is not None and state.meta.get("method") == name:
        return state
    return task.own_state


def continues_other(name: str, state: MethodState | None) -> str | None:
    """The adapter another method's task served just before this one (None: no task before, or the
    previous task was this method's): the weights this task must continue from."""
    if state is None or state.meta.get("method") in (None, name):
        return None
    adapter = state.meta.get("serve_adapter")
    return str(adapter) if adapter else None


def example_sha256(item: dict[str, Any]) -> str:
    """Fingerprint of one tokenised example (its input ids), never its content: lets a method find
    and drop its copies of an example that was unlearned."""
    return hashlib.sha256(",".join(map(str, item["input_ids"])).encode()).hexdigest()


@runtime_checkable
class Method(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    # what an unset `train.lr` / `train.epochs` means for this method, chosen from measured sweeps
    # (docs/benchmarks.md, "Learning rates")
    train_defaults: ClassVar[Mapping[str, float]]
    serve_adapter: str  # the peft adapter that is registered and served

    def prepare(self, model: nn.Module, task: TaskContext, state: MethodState | None) -> nn.Module: ...

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...

    def after_task(self, model: nn.Module, task: TaskContext) -> MethodState: ...

    def state_dict(self) -> MethodState: ...

    def load_state_dict(self, state: MethodState) -> None: ...
