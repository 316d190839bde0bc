"""Mechanics shared by the methods, as functions (no base classes): adapter attach/toggle,
trainable-parameter listing, tensor pairing across adapters, EMA, the causal-LM loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import peft
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from cltune.data import collate
from cltune.errors import ConfigError
from cltune.methods.base import LossOutput, TaskContext
from cltune.models import unwrap
from cltune.sections import LoraConfig


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
    """dst <- decay * dst + (1 - decay) * src, for each (src, dst) pair (one fused call per dtype)."""
    if not pairs:
        return
    srcs, dsts = zip(*pairs, strict=True)
    if all(s.dtype == d.dtype for s, d in pairs):
        torch._foreach_lerp_(list(dsts), list(srcs), 1.0 - decay)  # dst + (1 - decay) (src - dst)
        return
    for src, dst in pairs:
        dst.lerp_(src.to(dst.dtype), 1.0 - decay)


@torch.no_grad()
def copy_adapter(model: nn.Module, src: str, dst: str) -> None:
    for s, d in paired_lora_tensors(model, src, dst):
        d.copy_(s)


def adopt_adapter(model: nn.Module, source: str, dst: str) -> bool:
    """Copy adapter `source`'s weights into `dst` when both exist with the same LoRA layout (the same
    layers, ranks and shapes); return whether `dst` now holds `source`'s weights."""
    if source == dst:
        return True
    pairs = paired_lora_tensors(model, source, dst)
    n_src, n_dst = len(adapter_parameters(model, source)), len(adapter_parameters(model, dst))
    if not pairs or not len(pairs) == n_src == n_dst or any(s.shape != d.shape for s, d in pairs):
        return False
    copy_adapter(model, source, dst)
    return True


def continue_served(
    model: nn.Module, source: str, adapters: tuple[str, ...], task: TaskContext, method: str
) -> bool:
    """Start each of `adapters` from `source`, the adapter another method's task served just before; True
    when done. When `source`'s layout differs (another rank, target or layer set): refuse if examples were
    unlearned in the run (the method's own older weights never forgot them), else warn and return False
    (the method continues from its own)."""
    if all(adopt_adapter(model, source, a) for a in adapters):
        return True
    if task.forgotten:
        raise ConfigError(
            f"{method}: task {task.name!r} cannot continue from adapter {source!r} (another rank, target "
            "set or layer set), and its own older adapters would bring back what was unlearned; use the "
            "same lora config for every task",
            errors=[{"task": task.name, "adapter": source}],
        )
    task.emit(
        f"{method}: adapter {source!r} of the previous task has another layout; continuing from its own",
        level="warning",
    )
    return False


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


@dataclass
class AnswerLogits:
    """Logits at the answer positions only: position t of row b predicts labels[b, t + 1] != -100."""

    logits: torch.Tensor  # [N, V] model dtype, N = answer tokens in the batch
    targets: torch.Tensor  # [N] token ids
    rows: torch.Tensor  # [N] the row (sequence) of each answer token
    batch_size: int  # B
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embedding output + one [B, T, H] per layer

    def token_logp(self) -> torch.Tensor:
        """log pi(target) per answer token, fp32. Returns [N]."""
        logp = torch.log_softmax(self.logits.float(), dim=-1)
        return logp.gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)

    def ce(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """Token-mean cross-entropy over the answer tokens, or over those `where` [N] (bool) selects;
        0 (with a graph) when there are none."""
        logits, targets = self.logits, self.targets
        if where is not None:
            logits, targets = logits[where], targets[where]
        if not len(targets):
            return self.logits.sum() * 0.0
        return nn.functional.cross_entropy(logits.float(), targets)

    def sequence_nll(self) -> torch.Tensor:
        """-log pi(answer | prompt) summed over each row's answer tokens, fp32. Returns [B]."""
        nll = -self.token_logp()
        return nll.new_zeros(self.batch_size).index_add(0, self.rows, nll)


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) of a causal LM whose logits are exactly lm_head(decoder(x)); else None."""
    root = unwrap(model)
    config = getattr(root, "config", None)
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None  # logits are post-processed after the head: take the model's own forward
    get_decoder, get_head = getattr(root, "get_decoder", None), getattr(root, "get_output_embeddings", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = get_head() if callable(get_head) else None
    return (decoder, head) if decoder is not None and head is not None and decoder is not root else None


def answer_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], *, hidden_states: bool = False, **kwargs: Any
) -> AnswerLogits:
    """Forward that applies the lm_head only where a label is predicted.

    Prompt and padding positions never need logits; skipping them saves the head's matmul (a fifth of
    SmolLM2's forward: 49k vocab x 576) and the [B, T, V] fp32 log-softmax in forward and backward.
    Exactly the model's own logits at those positions (models that post-process logits use the full path).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    answer = labels[:, 1:] != -100  # [B, T-1]: position t predicts token t + 1
    rows = answer.nonzero()[:, 0]  # [N]
    targets = labels[:, 1:][answer]  # [N]
    parts = _decoder_and_head(model)
    extra = {"output_hidden_states": True} if hidden_states else {}
    if parts is None:
        out = model(input_ids=ids, attention_mask=mask, **extra, **kwargs)
        logits = out.logits[:, :-1][answer]
    else:
        decoder, head = parts
        out = decoder(input_ids=ids, attention_mask=mask, **extra, **kwargs)
        logits = head(out.last_hidden_state[:, :-1][answer])  # [N, V]
    hs = tuple(out.hidden_states) if hidden_states else None
    return AnswerLogits(logits, targets, rows, ids.shape[0], hs)


def ce_loss(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> LossOutput:
    """The plain fine-tuning objective: answer-token cross-entropy, logged as "ce"."""
    ce = answer_logits(model, batch, **kwargs).ce()
    return LossOutput(ce, {"ce": ce.item()})


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


@contextmanager
def using_adapter(model: Any, adapter: str | None) -> Iterator[None]:
    """Eval mode with `adapter` active (None: the base model, adapters disabled); afterwards the
    active adapter, requires_grad flags and train/eval mode are as they were."""
    is_peft = isinstance(model, PeftModel)
    with preserved_training_state(model):
        model.eval()
        if is_peft and adapter is not None:
            model.set_adapter(adapter)
        with model.disable_adapter() if is_peft and adapter is None else nullcontext():
            yield


@torch.no_grad()
def mean_answer_ce(
    model: nn.Module, items: list[dict[str, Any]], pad_id: int, device: Any, batch_size: int = 16
) -> float:
    """Cross-entropy per labelled token over tokenised `items` ({input_ids, labels}), in the model's
    current mode and adapter; exp() of it is the perplexity."""
    total, count = 0.0, 0
    for s in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[s : s + batch_size], pad_id).items()}
        out = answer_logits(model, batch)
        total += out.ce().item() * len(out.targets)
        count += len(out.targets)
    return total / max(count, 1)
