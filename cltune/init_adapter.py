"""A run that starts from a registry adapter (`tasks[0].init_adapter`): an imported one, or any adapter
an earlier run registered.

The adapter plays the task before the first. It is attached as peft's "default" adapter and handed to
the first task's method as the previous task's state, so each method continues from it as it continues
from another method's task: seq_lora and the NPO family train it in place, I-LoRA copies it into its
slow adapter, DEMA into its first group (methods with their own LoRA layout, `starts_from_adapter =
False`, are refused by RunConfig). After `prepare`, `check_started` verifies that the served adapter
starts as the given one. The registered adapter's `parent` is its name@version (lineage).

Its weights fix the LoRA shape: lora.r, alpha, target_modules and layers_to_transform are taken from the
adapter where the config leaves them out (`pin`: at submit, or in `cltune train`) and must equal it where
the config sets them; dropout stays the job's. `pin` also fixes the version, so a job trains from the
version that was the latest when it was submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file

from cltune.adapter_files import WEIGHTS
from cltune.adapter_import import adapter_lora
from cltune.config import LoraConfig, ModelConfig, RunConfig, parse_config
from cltune.errors import ConfigError, InvalidAdapterError, InvalidNameError, NotFoundError
from cltune.methods.base import MethodState
from cltune.methods.common import adapter_state, attach_adapter, load_adapter_state, peft_lora_config
from cltune.models import LoadedModel
from cltune.registry import AdapterRecord, Registry

INIT = "default"  # the peft adapter it is attached as: the one seq_lora and NPO train in place
FIELD = "tasks.0.init_adapter"
SHAPE = ("r", "alpha", "target_modules", "layers_to_transform")  # what the weights fix


def _same(a: Any, b: Any) -> bool:
    """Equal LoRA settings, whatever order a target list is in."""
    return (sorted(a) if isinstance(a, list) else a) == (sorted(b) if isinstance(b, list) else b)


def _lora_of(registry: Registry, record: AdapterRecord) -> dict[str, Any]:
    return adapter_lora(registry.path(record.name, record.version))


def pin(config: dict[str, Any], registry: Registry) -> list[dict[str, Any]]:
    """Resolve `tasks[0].init_adapter` of a config mapping (as sent: only what the user set) in place:
    the ref becomes name@version, lora fields it leaves out become the adapter's. Returns the problems
    as ConfigError field errors ([] when there are none, or when no task starts from an adapter)."""
    tasks = config.get("tasks")
    first = tasks[0] if isinstance(tasks, list) and tasks and isinstance(tasks[0], dict) else {}
    ref = first.get("init_adapter")
    if not isinstance(ref, str):
        return []  # none, or not a string: parse_config reports it
    try:
        record = registry.get(ref)
        theirs = _lora_of(registry, record)
    except (NotFoundError, InvalidNameError) as e:
        return [
            _error(
                FIELD,
                ref,
                f"unknown adapter {ref[:80]!r} ({e.message}); use NAME or NAME@VERSION "
                "of one of your adapters (GET /v1/adapters; import one with POST /v1/adapters)",
            )
        ]
    except InvalidAdapterError as e:
        return [_error(FIELD, ref, f"adapter {ref[:80]!r} cannot be trained on: {e.message}")]
    first["init_adapter"] = record.ref
    return _check_base(config, record) + _adopt_lora(config, theirs, record.ref)


def _check_base(config: dict[str, Any], record: AdapterRecord) -> list[dict[str, Any]]:
    model = config.get("model")
    name = (model if isinstance(model, dict) else {}).get("name", ModelConfig.model_fields["name"].default)
    if record.base_model == name:
        return []
    return [
        _error(
            FIELD,
            record.ref,
            f"adapter {record.ref} is for base model {record.base_model!r}, this job trains {name!r}: "
            f"set model.name to {record.base_model!r} or start from an adapter of {name!r}",
        )
    ]


def _adopt_lora(config: dict[str, Any], theirs: dict[str, Any], ref: str) -> list[dict[str, Any]]:
    """Fill the lora fields the weights fix from the adapter; the ones the config sets must agree."""
    lora = config.setdefault("lora", {})
    errors = []
    for field in SHAPE if isinstance(lora, dict) else ():  # not a mapping: parse_config reports it
        if field not in lora:
            lora[field] = theirs[field]
        elif not _same(lora[field], theirs[field]):
            message = (
                f"{lora[field]!r} differs from init_adapter {ref}'s {theirs[field]!r}: leave lora.{field} "
                "out to take the adapter's, or set it to that"
            )
            errors.append(_error(f"lora.{field}", lora[field], message))
    return errors


def pin_config(cfg: RunConfig, registry: Registry) -> RunConfig:
    """`pin` for a parsed config (`cltune train`): the fields its file left out are still unset."""
    if cfg.tasks[0].init_adapter is None:
        return cfg
    data = cfg.model_dump(mode="json", exclude_unset=True)
    errors = pin(data, registry)
    if errors:
        raise ConfigError(
            "invalid run config: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        )
    return parse_config(data)


def _error(field: str, value: Any, message: str) -> dict[str, Any]:
    return {
        "field": field,
        "input": value if isinstance(value, str | int | None) else repr(value)[:80],
        "message": message,
    }


@dataclass
class InitAdapter:
    record: AdapterRecord
    tensors: dict[str, torch.Tensor]  # peft's on-disk keys

    @property
    def ref(self) -> str:
        return self.record.ref


def open_init(cfg: RunConfig, registry: Registry | None, loaded: LoadedModel) -> InitAdapter | None:
    """The adapter the run starts from, checked against the loaded base and the run's LoRA config;
    None when the first task starts fresh.

    Raises:
        ConfigError: no registry to find it in, another base model's weights, another LoRA shape.
        NotFoundError: the adapter (version) is not in the registry (deleted since it was pinned).
    """
    ref = cfg.tasks[0].init_adapter
    if ref is None:
        return None
    if registry is None:
        raise ConfigError(
            f"{FIELD} {ref!r} names a registry adapter, and this run has no registry to find it in",
            errors=[_error(FIELD, ref, "needs a registry (cltune train uses <data_dir>/adapters)")],
        )
    record = registry.get(ref)
    errors = []
    if record.base_fingerprint != loaded.fingerprint:
        errors.append(
            _error(
                FIELD,
                ref,
                f"adapter {record.ref} was trained on {record.base_model!r} ({record.base_fingerprint}); "
                f"this run loads {loaded.name!r} ({loaded.fingerprint})",
            )
        )
    theirs, mine = _lora_of(registry, record), cfg.lora.model_dump(mode="json")
    errors += [
        _error(f"lora.{f}", mine[f], f"{mine[f]!r} differs from init_adapter {record.ref}'s {theirs[f]!r}")
        for f in SHAPE
        if not _same(mine[f], theirs[f])
    ]
    if errors:
        raise ConfigError(
            "cannot start from the adapter: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors),
            errors=errors,
        )
    return InitAdapter(record, load_file(registry.path(record.name, record.version) / WEIGHTS))


def attach(model: Any, lora: LoraConfig, init: InitAdapter) -> tuple[Any, MethodState]:
    """Attach the adapter's weights as peft adapter INIT; return the model and the state that hands it
    to the first task's method as the adapter "the previous task" served."""
    model = attach_adapter(model, INIT, peft_lora_config(lora))
    try:
        load_adapter_state(model, INIT, init.tensors)
    except ValueError as e:  # tensors the attached adapter has no place for
        raise ConfigError(f"cannot start from adapter {init.ref}: {e}", errors=[]) from None
    return model, MethodState(meta={"method": "init_adapter", "serve_adapter": INIT, "adapter": init.ref})


def check_started(model: Any, method: Any, init: InitAdapter) -> None:
    """Refuse to train when the method's served adapter does not start as the given adapter (a method
    that ignores the weights it is handed would train from scratch under the adapter's name)."""
    served = adapter_state(model, method.serve_adapter)
    differ = [
        k
        for k, v in init.tensors.items()
        if k not in served or not torch.equal(served[k], v.to(served[k].dtype))
    ]
    if differ:
        raise ConfigError(
            f"method {method.name!r} does not start its adapter {method.serve_adapter!r} from init_adapter "
            f"{init.ref} ({len(differ)} of {len(init.tensors)} tensors differ, e.g. {differ[0]})",
            errors=[_error(FIELD, init.ref, f"method {method.name!r} cannot start from an adapter")],
        )
