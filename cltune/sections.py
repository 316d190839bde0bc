"""The sections of a run config that the library's lower layers take: model, lora, train, eval.

Plain pydantic models with their defaults and valid ranges, and the one rule for user-given names. This
module imports nothing else of cltune's but its errors, so methods, models and the training loop can use
it; `cltune.config` assembles the whole run config and checks it against the methods and scorers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cltune.errors import InvalidNameError

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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
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


class LoraConfig(Strict):
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # module names (or name suffixes) of Linear layers; the service checks them against the model at submit
    target_modules: list[Annotated[str, Field(min_length=1)]] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"], min_length=1
    )
    layers_to_transform: list[Annotated[int, Field(ge=0)]] | None = None  # decoder layer indices


DEFAULT_LR = 1e-3  # a method without its own default (every registered method has one)
DEFAULT_EPOCHS = 1.0


class TrainConfig(Strict):
    # "auto": train in epochs over the task's data, score a validation split every `val_every` steps,
    # stop when it has not improved for `patience` validations or a budget (max_epochs, max_steps,
    # max_minutes) ends, and keep the best checkpoint. An int: exactly that many optimizer steps;
    # None: exactly `epochs` epochs. Unlearning methods have no validation target: "auto" = `epochs`.
    steps: int | Literal["auto"] | None = "auto"
    # steps: None (and unlearning under "auto"); None here: the method's default (`epochs_for`)
    epochs: float | None = Field(None, gt=0, le=1000)
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
    lr: float | None = Field(None, gt=0, le=1.0)  # None: the method's measured default (`lr_for`)
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

    def lr_for(self, defaults: Mapping[str, float]) -> float:
        """The learning rate: `lr` when set, else the method's default (its `train_defaults`, chosen from
        the sweeps in docs/benchmarks.md), else DEFAULT_LR."""
        return self.lr if self.lr is not None else defaults.get("lr", DEFAULT_LR)

    def epochs_for(self, defaults: Mapping[str, float]) -> float:
        """Epochs of a fixed-length task (`steps: null`, or unlearning): `epochs` when set, else the
        method's default, else DEFAULT_EPOCHS."""
        return self.epochs if self.epochs is not None else defaults.get("epochs", DEFAULT_EPOCHS)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, int) and not 1 <= v <= 10_000_000):
            raise ValueError(f"steps {v!r} must be 'auto', null (use epochs) or an integer 1..10000000")
        return v

    @property
    def auto(self) -> bool:
        return self.steps == "auto"


class EvalConfig(Strict):
    max_new_tokens: int = Field(16, ge=1, le=4096)
    batch_size: int = Field(32, ge=1, le=4096)
    bwt_normalizer: Literal["T-1", "T"] = "T-1"  # "T" is TRACE's convention; both are recorded
    heatmap: bool = True
    # general abilities no task trains, scored after every task (cltune/general.py): perplexity of
    # general text and of GSM8K solutions by default; "gsm8k" (few-shot accuracy) is slow, opt-in
    general: list[Literal["text_ppl", "gsm8k_ppl", "gsm8k"]] = ["text_ppl", "gsm8k_ppl"]
    general_examples: int = Field(32, ge=1, le=1319)  # per probe


def valid_range(model: type[BaseModel], name: str) -> str | None:
    """The bounds declared on `model`'s field `name`, as text ("1 <= r <= 1024"); None if it has none."""
    info = model.model_fields.get(name)
    if info is None:
        return None
    lo = hi = ""
    for m in info.metadata:
        if isinstance(m, Ge):
            lo = f"{m.ge} <= "
        elif isinstance(m, Gt):
            lo = f"{m.gt} < "
        elif isinstance(m, Le):
            hi = f" <= {m.le}"
        elif isinstance(m, Lt):
            hi = f" < {m.lt}"
    return f"{lo}{name}{hi}" if lo or hi else None
