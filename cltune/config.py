"""Run configuration: the one place where defaults live.

A RunConfig is what `cltune train CONFIG` reads from YAML and what the service receives over HTTP.
YAML files hold overrides only; every default is declared here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cltune.errors import ConfigError, InvalidNameError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a safe single path component, else raise InvalidNameError.

    Valid: 1-64 characters from letters, digits, '.', '_', '-', starting with a letter or digit
    (so no '..', no separators, no absolute paths, no control characters).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-64 characters from letters, digits, '.', '_', '-', "
            "starting with a letter or digit, without '..'",
            name=str(name),
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = "smollm2-135m"  # catalog name (smollm2-135m, tiny-llama) or a local model directory
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    quantization: Literal["none", "4bit", "8bit"] = "none"  # QLoRA base via bitsandbytes
    seed: int = Field(0, ge=0, le=2**31 - 1)  # weights of the random tiny-llama

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r} is not one of auto, cpu, mps, cuda, cuda:N")
        return v


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # module names (or name suffixes) of Linear layers; the service checks them against the model at submit
    target_modules: list[Annotated[str, Field(min_length=1)]] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"], min_length=1
    )
    layers_to_transform: list[Annotated[int, Field(ge=0)]] | None = None  # decoder layer indices


class MethodConfig(_Strict):
    name: str = "seq_lora"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_and_valid(self) -> MethodConfig:
        from cltune.methods import METHODS  # late: methods import this module

        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; valid: {', '.join(sorted(METHODS))}")
        try:
            METHODS[self.name].Params.model_validate(self.params)
        except ValidationError as e:  # name the params' own fields: "params.ema_decay: ..."
            problems = "; ".join(
                f"params.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(f"method {self.name!r}: {problems}") from None
        return self


class TaskConfig(_Strict):
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


class TrainConfig(_Strict):
    # "auto": train in epochs over the task's data, score a validation split every `val_every` steps,
    # stop when it has not improved for `patience` validations or a budget (max_epochs, max_steps,
    # max_minutes) ends, and keep the best checkpoint. An int: exactly that many optimizer steps;
    # None: exactly `epochs` epochs. Unlearning methods have no validation target: "auto" = `epochs`.
    steps: int | Literal["auto"] | None = "auto"
    epochs: float = Field(1.0, gt=0, le=1000)  # steps: None (and unlearning under "auto")
    max_epochs: float = Field(20.0, gt=0, le=1000)  # auto: budget in passes over the training split
    max_steps: int = Field(1000, ge=1, le=10_000_000)  # auto: budget in optimizer steps
    max_minutes: float | None = Field(None, gt=0, le=7 * 24 * 60)  # auto: wall-clock budget per task
    patience: int = Field(3, ge=1, le=1000)  # auto: validations without improvement before stopping
    min_delta: float = Field(0.01, ge=0.0, lt=1.0)  # auto: a loss must fall by this fraction to count
    val_every: int | None = Field(None, ge=1)  # auto: steps between validations; None: half an epoch (5-50)
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)  # auto: share of the training split held out ...
    val_max: int = Field(48, ge=2, le=10_000)  # ... capped at this many examples
    val_metric: Literal["loss", "score"] = "loss"  # auto: answer-token CE (cheap) or the task's scorer
    batch_size: int = Field(8, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024)
    lr: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    max_len: int = Field(256, ge=8, le=131_072)
    seed: int = Field(0, ge=0, le=2**31 - 1)  # transformers' set_seed hands it to numpy (32-bit)
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps; 0: only when stopped
    # servable checkpoints (the served adapter, peft format) kept per task: taken at each validation
    # (auto) or every checkpoint_every steps; the most recent N plus the best are kept; 0: none
    keep_checkpoints: int = Field(3, ge=0, le=1000)
    eval_every: int = Field(0, ge=0)  # optimizer steps; 0: only at task end
    log_every: int = Field(1, ge=1)
    tensorboard: bool = False  # also write TensorBoard event files to run_dir/tensorboard (cltune.tracking)
    # several devices (cltune worker --devices-per-job N): "none" keeps a full copy of the base model on
    # each device; "fsdp" shards the frozen decoder layers across them (FSDP2), adapters stay replicated
    sharding: Literal["none", "fsdp"] = "none"

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, int) and not 1 <= v <= 10_000_000):
            raise ValueError(f"steps {v!r} must be 'auto', null (use epochs) or an integer 1..10000000")
        return v

    @property
    def auto(self) -> bool:
        return self.steps == "auto"


class EvalConfig(_Strict):
    max_new_tokens: int = Field(16, ge=1, le=4096)
    batch_size: int = Field(32, ge=1, le=4096)
    bwt_normalizer: Literal["T-1", "T"] = "T-1"  # "T" is TRACE's convention; both are recorded
    heatmap: bool = True
    # general abilities no task trains, scored after every task (cltune/general.py): perplexity of
    # general text and of GSM8K solutions by default; "gsm8k" (few-shot accuracy) is slow, opt-in
    general: list[Literal["text_ppl", "gsm8k_ppl", "gsm8k"]] = ["text_ppl", "gsm8k_ppl"]
    general_examples: int = Field(32, ge=1, le=1319)  # per probe


class RunConfig(_Strict):
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


def _format_errors(e: ValidationError) -> list[dict[str, Any]]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")
        out.append({"field": loc, "message": msg, "input": _short(err.get("input"))})
    return out


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
        errors = _format_errors(e)
        lines = "; ".join(f"{x['field']}: {x['message']}" for x in errors)
        raise ConfigError(f"invalid run config: {lines}", errors=errors) from None


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
