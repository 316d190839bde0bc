"""Run configuration: a RunConfig is what `cltune train CONFIG` reads from YAML and what the service
receives over HTTP. YAML files hold overrides only; every default is declared here or in the sections
module (model, lora, train, eval), which the lower layers import without the method registry.

Method names, method params and scorer names are checked against the registries (imported late, so that
reading a config does not load torch). `parse_config` reports every problem at once as structured errors:
{field, message, input[, valid]}, with a method's own params reported as `method.params.<name>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cltune.errors import ConfigError, InvalidNameError
from cltune.sections import (
    NAME_RE,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    Strict,
    TrainConfig,
    check_name,
    valid_range,
)

__all__ = [
    "NAME_RE",
    "EvalConfig",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "check_name",
    "load_config",
    "parse_config",
]


class MethodConfig(Strict):
    name: str = "seq_lora"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_and_valid(self) -> MethodConfig:
        from cltune.methods import METHODS  # late: methods import this module

        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; valid: {', '.join(sorted(METHODS))}")
        params = METHODS[self.name].Params
        try:
            params.model_validate(self.params)
        except ValidationError as e:  # carried whole to parse_config, which reports each param apart
            errors = _field_errors(e, params, prefix="params")
            raise PydanticCustomError(
                "method_params",
                "method {name}: {problems}",
                {"name": repr(self.name), "problems": _joined(errors), "errors": errors},
            ) from None
        return self


class TaskConfig(Strict):
    name: str
    train: str  # JSONL path (chat, alpaca or prompt/completion); for unlearning: the forget set
    eval: str | None = None  # held-out JSONL; None: hold out `eval_fraction` of `train`
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_eval: int = Field(100, ge=1, le=100_000)
    scorer: str = "exact_match"
    max_new_tokens: int | None = Field(None, ge=1, le=4096)  # None: EvalConfig.max_new_tokens
    retain: str | None = None  # unlearning: JSONL of data to keep
    method: MethodConfig | None = None  # None: RunConfig.method
    # first task only: start from this registry adapter ("name" = latest, or "name@N"), e.g. an imported
    # one; its LoRA shape fixes lora.r, alpha, target_modules, layers_to_transform (cltune/init_adapter.py)
    init_adapter: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_name(v, "task name")
        except InvalidNameError as e:
            raise ValueError(e.message) from None

    @field_validator("init_adapter")
    @classmethod
    def _init_adapter(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name, sep, version = v.partition("@")
        try:
            check_name(name, "adapter name")
        except InvalidNameError as e:
            raise ValueError(e.message) from None
        if sep and not (version.isdigit() and int(version) >= 1):
            raise ValueError(f"invalid adapter version {version!r} in {v!r}: use name@N with N >= 1")
        return v

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        from cltune.evaluate import SCORERS

        if v not in SCORERS:
            raise ValueError(f"unknown scorer {v!r}; valid: {', '.join(sorted(SCORERS))}")
        return v


class RunConfig(Strict):
    name: str = "run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    tasks: list[TaskConfig] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    adapter_name: str | None = None  # registry name for every task's adapter; None: the task name

    @field_validator("name", "adapter_name")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return check_name(v)
        except InvalidNameError as e:
            raise ValueError(e.message) from None

    @model_validator(mode="after")
    def _unique_tasks(self) -> RunConfig:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        return self

    @model_validator(mode="after")
    def _init_adapter_first(self) -> RunConfig:
        """Only the first task starts from an adapter (the later ones continue from the task before),
        and only with a method that continues from the weights it is handed."""
        from cltune.methods import METHODS  # late: methods import this module

        later = [i for i, t in enumerate(self.tasks) if i and t.init_adapter]
        if later:
            raise ValueError(
                f"tasks.{later[0]}.init_adapter: only the first task can start from an adapter; "
                "later tasks continue from the task before"
            )
        method = self.method_for(self.tasks[0]).name
        if self.tasks[0].init_adapter is None:
            return self
        if not getattr(METHODS[method], "starts_from_adapter", True):
            able = sorted(n for n, m in METHODS.items() if getattr(m, "starts_from_adapter", True))
            raise ValueError(
                f"tasks.0.init_adapter: method {method!r} chooses its own LoRA layout and cannot start "
                f"from an adapter; use one of: {', '.join(able)}"
            )
        return self

    def method_for(self, task: TaskConfig) -> MethodConfig:
        return task.method or self.method


def _field_errors(e: ValidationError, model: type[BaseModel], prefix: str = "") -> list[dict[str, Any]]:
    """Each problem of `e` as {field, message, input[, valid]}; a method-params problem becomes one entry
    per param, and an out-of-range value names its whole valid range ("1 <= r <= 1024")."""
    out: list[dict[str, Any]] = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "method_params":  # raised by MethodConfig with its params' own errors
            head = ".".join([prefix, *loc] if prefix else loc)
            out += [{**x, "field": f"{head}.{x['field']}"} for x in err["ctx"]["errors"]]
            continue
        msg = err["msg"].removeprefix("Value error, ")
        entry = {"field": ".".join([prefix, *loc] if prefix else loc) or "(root)", "message": msg}
        entry["input"] = _short(err.get("input"))
        owner = _model_at(model, loc[:-1]) if loc else None
        valid = None
        if owner and err["type"] == "extra_forbidden":
            valid = ", ".join(owner.model_fields)
        elif owner and loc[-1] in owner.model_fields and ("greater" in msg or "less" in msg):
            valid = valid_range(owner, loc[-1])
        if valid:
            entry |= {"message": f"{msg} (valid: {valid})", "valid": valid}
        out.append(entry)
    return out


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model reached from `model` along the field path `loc` (list indices skipped)."""
    for part in (p for p in loc if not p.isdigit()):
        info = model.model_fields.get(part)
        nested = _nested_model(info.annotation) if info else None
        if nested is None:
            return None
        model = nested
    return model


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `TaskConfig`, `list[TaskConfig]`, `MethodConfig | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _nested_model(arg)
        if found:
            return found
    return None


def _joined(errors: list[dict[str, Any]]) -> str:
    return "; ".join(f"{x['field']}: {x['message']}" for x in errors)


def _short(v: Any) -> Any:
    s = repr(v)
    return v if len(s) <= 80 and isinstance(v, str | int | float | bool | type(None)) else s[:80]


def parse_config(data: dict[str, Any]) -> RunConfig:
    """Validate a mapping into a RunConfig, reporting every problem at once.

    Raises:
        ConfigError: with `details["errors"]` = [{field, message, input}, ...].
    """
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        errors = _field_errors(e, RunConfig)
        raise ConfigError(f"invalid run config: {_joined(errors)}", errors=errors) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value", errors=[])
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        value = yaml.safe_load(raw)
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file of overrides, apply `key=value` overrides, validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist", errors=[]) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}", errors=[]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level", errors=[])
    return parse_config(apply_overrides(data, overrides or []))
