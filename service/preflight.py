"""Checks of a job's RunConfig against this deployment, made at submit, before the job is queued.

The config model (cltune/config.py) checks each field alone; what a job would only find out at run
time is checked here: LoRA target modules and layer indices against the base model's own layers (read
from its config, no weights), the device and quantization against what the workers have, FSDP against
the devices one job gets, seeds against what the random generators take, and numbers that JSON allows
but training cannot use (NaN, Infinity). Each problem is one error `{field, message, input, valid}`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from cltune.config import RunConfig
from service.settings import Settings

MAX_SEED = 2**31 - 1  # numpy (transformers.set_seed) takes < 2**32; cltune adds task offsets to the seed


def _error(field: str, message: str, value: Any, valid: str) -> dict[str, Any]:
    shown = (
        value if isinstance(value, int | str | bool | None) and len(repr(value)) <= 80 else repr(value)[:80]
    )
    return {"field": field, "message": f"{message} (valid: {valid})", "input": shown, "valid": valid}


def non_finite(data: Any, path: str = "") -> list[dict[str, Any]]:
    """An error for every NaN or infinity anywhere in the (raw) config."""
    if isinstance(data, float) and not math.isfinite(data):
        return [_error(path or "(root)", f"{data} is not a number training can use", data, "a finite number")]
    if isinstance(data, dict):
        return [e for k, v in data.items() for e in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(data, list):
        return [e for i, v in enumerate(data) for e in non_finite(v, f"{path}.{i}")]
    return []


def worker_cuda(settings: Settings) -> bool:
    if settings.worker_cuda is not None:
        return settings.worker_cuda
    import torch

    return bool(torch.cuda.is_available())


def check_job(cfg: RunConfig, settings: Settings) -> list[dict[str, Any]]:
    """Problems of a valid RunConfig that the deployment or the base model would only report at run time."""
    errors = _devices(cfg, settings)
    if not 0 <= cfg.train.seed <= MAX_SEED:
        errors.append(_error("train.seed", "seed out of range", cfg.train.seed, f"0..{MAX_SEED}"))
    errors += _lora(cfg, settings)
    return errors


def _devices(cfg: RunConfig, settings: Settings) -> list[dict[str, Any]]:
    errors = []
    cuda, n = worker_cuda(settings), settings.devices_per_job
    device, quant = cfg.model.device, cfg.model.quantization
    cuda_ids = ", ".join(f"cuda:{i}" for i in range(n))
    devices = f"auto, cpu, cuda, {cuda_ids}" if cuda else "auto, cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m and not cuda:
        errors.append(_error("model.device", f"{device!r}: the workers have no CUDA device", device, devices))
    elif m and m.group(1) is not None and int(m.group(1)) >= n:
        errors.append(
            _error(
                "model.device",
                f"{device!r}: a job gets {n} device(s) (CLTUNE_DEVICES_PER_JOB), numbered from 0",
                device,
                devices,
            )
        )
    elif device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            errors.append(_error("model.device", "'mps': this deployment has no Apple GPU", device, devices))
    if quant != "none":
        if cfg.model.name == "tiny-llama":
            why = "tiny-llama is built in code and is never quantised"
        elif not cuda or device in ("cpu", "mps"):
            why = "4bit/8bit bases (bitsandbytes) need a CUDA device, and the job would run without one"
        else:
            why = ""
        if why:
            errors.append(_error("model.quantization", f"{quant!r}: {why}", quant, "none"))
    if cfg.train.sharding == "fsdp" and n < 2:
        errors.append(
            _error(
                "train.sharding",
                "'fsdp' shards the base model across the devices of one job, and a job here gets 1 "
                "(CLTUNE_DEVICES_PER_JOB)",
                "fsdp",
                "none",
            )
        )
    return errors


def _lora(cfg: RunConfig, settings: Settings) -> list[dict[str, Any]]:
    from cltune.models import model_structure

    structure = model_structure(cfg.model.name, str(settings.models_dir))
    if structure is None:  # a hub id: its config is not on this host, the run reports it
        return []
    errors = []
    targets = cfg.lora.target_modules
    if targets != "all-linear":
        bad = [t for t in targets if not structure.matches(t)]
        if bad:
            valid = ", ".join(["all-linear", *structure.linear_names])
            errors.append(
                _error(
                    "lora.target_modules",
                    f"{', '.join(repr(b[:64]) for b in bad)} name(s) no Linear layer of {cfg.model.name!r}",
                    targets,
                    valid,
                )
            )
    layers = cfg.lora.layers_to_transform or []
    out = [i for i in layers if i >= structure.num_layers]
    if out:
        errors.append(
            _error(
                "lora.layers_to_transform",
                f"{out} beyond the {structure.num_layers} decoder layers of {cfg.model.name!r}",
                layers,
                f"0..{structure.num_layers - 1}",
            )
        )
    return errors
