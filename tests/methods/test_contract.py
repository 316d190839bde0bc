"""The contract every registered method keeps (docs/architecture.md, the Method protocol), as a matrix in
the style of peft's tests/test_custom_models.py: METHOD_CASES (one row a method) x one test a property.

Each method runs once per module: two tasks of prepare -> 3 steps -> after_task -> Registry.save. What the
run saw is recorded, and each property test asserts on it, so a (method, property) case fails on its own.
The properties: the trainable parameters, the mid-task checkpoint and the method state surviving a
save/load round trip, the state naming its method, the served adapter trained and saved, after each task
PeftModel.from_pretrained(fresh base, saved dir) giving the served adapter's logits, the registry keeping
the state, and the frozen base weights staying bit-identical."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import NO_DROPOUT, TASK_A, TASK_B, batch_logits, load_tiny, method_task
from peft import PeftModel
from safetensors.torch import load_file

from cltune.data import collate
from cltune.methods import METHODS, build_method
from cltune.methods.base import MethodState
from cltune.methods.common import preserved_training_state
from cltune.models import build_tiny_llama
from cltune.registry import Registry
from cltune.train import train_task

# One row a method: registry name -> build_method params. A new method is one more row here.
METHOD_CASES: dict[str, dict[str, Any]] = {
    "seq_lora": {},
    "control_llm": {},
    "kappatune": {},
    "ilora": {},
    "dema": {},
    "npo": {},
    "npo_rt": {},
    "npo_kl": {},
    "grad_ascent": {},
}
TASKS = [("a", TASK_A, TASK_B[:8]), ("b", TASK_B, TASK_A[:8])]  # (name, train pairs, retain pairs)

over_methods = pytest.mark.parametrize("name", sorted(METHOD_CASES))


@dataclass
class Outcome:
    """A step's result, or the exception it raised: re-raised only by the property test that needs it."""

    value: Any = None
    error: BaseException | None = None

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def attempt(fn: Callable[..., Any], *args: Any) -> Outcome:
    try:
        return Outcome(fn(*args))
    except Exception as e:  # recorded for the property it belongs to; the others still run
        return Outcome(error=e)


@dataclass
class RoundTrip:
    """A state as it was saved (meta as JSON gives it back, tensors on CPU) and as it was loaded back."""

    meta: Any
    tensors: dict[str, torch.Tensor]
    back: MethodState | None


def round_trip(state: MethodState, directory: Path) -> RoundTrip:
    state.save(directory)
    back = MethodState.load(directory)
    saved = {k: v.detach().cpu().clone() for k, v in state.tensors.items()}
    return RoundTrip(json.loads(json.dumps(state.meta)), saved, back)


def checkpoint_round_trip(method: Any, directory: Path) -> RoundTrip:
    return round_trip(method.state_dict(), directory)


def load_checkpoint(method: Any, directory: Path) -> None:
    method.load_state_dict(MethodState.load(directory) or MethodState())


def reloaded_logits(saved: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch_logits(PeftModel.from_pretrained(build_tiny_llama(seed=0)[0], str(saved)).eval(), batch)


@dataclass
class TaskSeen:
    """What one task of the run showed."""

    trainable: list[bool]  # requires_grad of each of trainable_parameters(model)
    checkpoint: Outcome  # RoundTrip of the mid-task state_dict()
    load_checkpoint: Outcome  # method.load_state_dict(the checkpoint loaded back)
    state_method: Any  # after_task's state.meta["method"]
    state_loaded: Outcome  # RoundTrip of after_task's state
    served_tensors: dict[str, torch.Tensor]  # the saved adapter_model.safetensors
    served_logits: torch.Tensor
    reloaded_logits: Outcome  # PeftModel.from_pretrained(fresh base, saved dir)
    registry_state: Outcome  # registry.method_state(ref)


@dataclass
class ContractRun:
    name: str
    tasks: list[TaskSeen] = field(default_factory=list)
    base_changed: list[str] = field(default_factory=list)  # frozen base weights that differ at the end


def run_contract(name: str, root: Path) -> ContractRun:
    tiny = load_tiny()
    seen = ContractRun(name)
    frozen = [(n, p, p.detach().clone()) for n, p in tiny.model.named_parameters()]
    registry = Registry(root / "registry")
    model, state = tiny.model, None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLTUNE_DATA_DIR", str(root / "data"))  # method caches (kappa table)
        for t, (task_name, pairs, retain) in enumerate(TASKS):
            task = method_task(tiny, pairs, t, name=task_name, lora=NO_DROPOUT, retain=retain)
            method = build_method(name, METHOD_CASES[name])
            model = method.prepare(model, task, state)
            trainable = [p.requires_grad for p in method.trainable_parameters(model)]
            train_task(model, method, task, task.train_cfg)

            # mid-task checkpoint shape: save, load, load_state_dict
            checkpoint = attempt(checkpoint_round_trip, method, root / f"ckpt-{t}")
            loaded_checkpoint = attempt(load_checkpoint, method, root / f"ckpt-{t}")

            state = method.after_task(model, task)
            names_method = state.meta.get("method")
            state_loaded = attempt(round_trip, state, root / f"state-{t}")
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
            batch = collate(task.train[:4], task.pad_id)
            with preserved_training_state(model):
                model.eval()
                model.set_adapter(method.serve_adapter)
                served = batch_logits(model, batch)
            reloaded = attempt(reloaded_logits, saved, batch)
            seen.tasks.append(
                TaskSeen(
                    trainable=trainable,
                    checkpoint=checkpoint,
                    load_checkpoint=loaded_checkpoint,
                    state_method=names_method,
                    state_loaded=state_loaded,
                    served_tensors=load_file(saved / "adapter_model.safetensors"),
                    served_logits=served,
                    reloaded_logits=reloaded,
                    registry_state=attempt(registry.method_state, rec.ref),
                )
            )
    seen.base_changed = [n for n, p, before in frozen if not torch.equal(p.detach(), before)]
    return seen


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ContractRun]:
    """contract_run(name): the two-task run of method `name`, run on first use and kept for the module."""
    runs: dict[str, ContractRun] = {}

    def get(name: str) -> ContractRun:
        if name not in runs:
            runs[name] = run_contract(name, tmp_path_factory.mktemp(f"contract-{name}"))
        return runs[name]

    return get


def assert_state_round_trips(rt: RoundTrip) -> None:
    back = rt.back
    assert back is not None
    assert back.meta == rt.meta
    assert set(back.tensors) == set(rt.tensors)
    for k, v in rt.tensors.items():
        assert torch.equal(back.tensors[k], v), k


def test_every_registered_method_has_a_case() -> None:
    assert sorted(METHOD_CASES) == sorted(METHODS)


@over_methods
def test_trainable_parameters_are_given_and_require_grad(name: str, contract_run) -> None:
    for t, seen in enumerate(contract_run(name).tasks):
        assert seen.trainable and all(seen.trainable), f"task {t}: {seen.trainable}"


@over_methods
def test_mid_task_checkpoint_round_trips_and_loads(name: str, contract_run) -> None:
    for seen in contract_run(name).tasks:
        assert_state_round_trips(seen.checkpoint.get())
        seen.load_checkpoint.get()


@over_methods
def test_state_names_its_method(name: str, contract_run) -> None:
    for seen in contract_run(name).tasks:
        assert seen.state_method == name  # the next task's method tells its own state apart


@over_methods
def test_state_round_trips(name: str, contract_run) -> None:
    for seen in contract_run(name).tasks:
        assert_state_round_trips(seen.state_loaded.get())


@over_methods
def test_served_adapter_is_trained(name: str, contract_run) -> None:
    for seen in contract_run(name).tasks:
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in seen.served_tensors.items()), (
            "served adapter never trained"
        )


@over_methods
def test_reloaded_adapter_gives_the_served_logits(name: str, contract_run) -> None:
    for seen in contract_run(name).tasks:
        torch.testing.assert_close(seen.reloaded_logits.get(), seen.served_logits, rtol=1e-5, atol=1e-5)


@over_methods
def test_registry_keeps_the_method_state(name: str, contract_run) -> None:
    for seen in contract_run(name).tasks:
        assert seen.registry_state.get() is not None


@over_methods
def test_frozen_base_weights_stay_bit_identical(name: str, contract_run) -> None:
    assert not contract_run(name).base_changed, f"{name} changed frozen base weights"
