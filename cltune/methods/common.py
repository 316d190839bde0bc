"""Mechanics shared by the methods, as functions (no base classes): adapter attach/toggle,
trainable-parameter listing, tensor pairing across adapters, EMA, the causal-LM loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peft
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from cltune.config import LoraConfig
from cltune.methods.base import LossOutput

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


def peft_lora_config(cfg: LoraConfig, **overrides: Any) -> peft.LoraConfig:
    kwargs: dict[str, Any] = {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "layers_to_transform": cfg.layers_to_transform,
        "task_type": "CAUSAL_LM",
    }
    kwargs.update(overrides)
    if kwargs["target_modules"] == "all-linear":
        kwargs["target_modules"] = "all-linear"
    return peft.LoraConfig(**kwargs)


def attach_adapter(model: nn.Module, name: str, config: peft.PeftConfig) -> PeftModel:
    """Add adapter `name` (wrapping the base model on first use); keep it if it already exists."""
    if not isinstance(model, PeftModel):
        return get_peft_model(model, config, adapter_name=name)
    if name not in model.peft_config:
        model.add_adapter(name, config)
    return model


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The LoRA tensors of one adapter, in a stable order (what the optimizer gets)."""
    return [p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]


def only_train(model: nn.Module, params: list[nn.Parameter]) -> None:
    """requires_grad on exactly `params` (peft's set_adapter flips flags on its own; undo that)."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def paired_lora_tensors(model: nn.Module, src: str, dst: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(src tensor, dst tensor) for every lora_A / lora_B of two adapters, paired per layer.

    Walks each LoraLayer's own dicts, so names never need to match (the I-LoRA reference bug).
    """
    pairs: list[Any] = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and src in module.lora_A and dst in module.lora_A:
            pairs.append((module.lora_A[src].weight, module.lora_A[dst].weight))
            pairs.append((module.lora_B[src].weight, module.lora_B[dst].weight))
    return pairs


@torch.no_grad()
def ema_(pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float) -> None:
    """dst <- decay * dst + (1 - decay) * src, for each (src, dst) pair."""
    for src, dst in pairs:
        dst.mul_(decay).add_(src.to(dst.dtype), alpha=1.0 - decay)


@torch.no_grad()
def copy_adapter(model: nn.Module, src: str, dst: str) -> None:
    for s, d in paired_lora_tensors(model, src, dst):
        d.copy_(s)


def adapter_state(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors with peft's on-disk names (adapter name stripped)."""
    return {
        k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()
    }


def load_adapter_state(model: PeftModel, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
    result: Any = set_peft_model_state_dict(model, tensors, adapter_name=adapter)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise ValueError(f"adapter {adapter!r}: unexpected tensors {bad[:3]}")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """Forward with labels: token-mean cross-entropy over answer tokens (labels != -100)."""
    return model(**model_inputs(batch), **kwargs)


def ce_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """The plain fine-tuning objective: answer-token cross-entropy, logged as "ce"."""
    out = causal_lm_loss(model, batch)
    return LossOutput(out.loss, {"ce": out.loss.item()})


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL summed over answer tokens per sequence. logits [B, T, V], labels [B, T] -> [B]."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    logp = torch.log_softmax(shift_logits, dim=-1)
    tok = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return -(tok * mask).sum(dim=1)


@contextmanager
def preserved_training_state(model: Any) -> Iterator[None]:
    """Restore requires_grad flags, the active adapter and train/eval mode afterwards
    (evaluation in the middle of training calls set_adapter, which changes all three)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    active = getattr(model, "active_adapter", None) if isinstance(model, PeftModel) else None
    was_training = model.training
    try:
        yield
    finally:
        if active is not None:
            model.set_adapter(active)
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
