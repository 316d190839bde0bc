"""NPO unlearning (Zhang et al. 2024) and gradient ascent, as four registry names.

  npo          L = -(2/beta) * mean logsigmoid(beta * (NLL_sum_theta - NLL_sum_ref)) on the forget set
  npo_rt       npo + retain_weight * CE(retain batch)                          (the recommended default)
  npo_kl       npo + retain_weight * KL(pi_ref || pi_theta) on retain batches (answer tokens only)
  grad_ascent  -CE on the forget set (the baseline that collapses)

The forget set is the task's `train` file; the retain set is `TaskConfig.retain`. The model unlearned is
the adapter served by the previous task (trained in place, so later tasks continue from the unlearned
weights), or a fresh adapter on the base model when there is none. pi_ref is that model at the start:
NLL_sum_ref is computed once per forget example in `prepare` (eval mode, no dropout), so npo and npo_rt
need no second model. npo_kl needs reference logits on retain batches: with adapters disabled when the
start is the base model, else from a frozen copy of the starting adapter (disabling would compare
against the base, not against the model being unlearned).

Learning rate and epochs: the run's `train.lr` / `train.epochs` when set, else `train_defaults`, measured
on SmolLM2 (docs/benchmarks.md): 10 epochs over the forget set at lr 1e-3 with a retain term (npo_rt,
npo_kl), 1e-4 without one (npo, grad_ascent collapse the model at 3e-4 and above). The paper's 1e-5 is for
full fine-tuning.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cltune.data import collate
from cltune.errors import ConfigError
from cltune.methods.base import (
    FORGOTTEN_EXAMPLES,
    LossOutput,
    MethodState,
    TaskContext,
    example_sha256,
)
from cltune.methods.common import (
    adapter_parameters,
    answer_logits,
    attach_adapter,
    copy_adapter,
    only_train,
    peft_lora_config,
    preserved_training_state,
)

REF_ADAPTER = "npo_ref"  # frozen copy of the starting adapter (npo_kl when not starting from the base)


class GradAscentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NpoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0.0, le=100.0)  # inverse temperature; beta -> 0 recovers gradient ascent


class NpoRetainParams(NpoParams):
    retain_weight: float = Field(1.0, ge=0.0, le=100.0)  # weight of the retain term (CE for rt, KL for kl)


# ---------------------------------------------------------------- the losses, on tensors


def npo_loss(nll: torch.Tensor, nll_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/beta) * mean logsigmoid(beta * (NLL_theta - NLL_ref)). nll, nll_ref: [B] summed NLLs.

    Equals (2/beta) ln 2 at theta == ref and falls towards 0 as NLL_theta grows past NLL_ref.
    """
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - nll_ref)).mean()


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per answer token, averaged. logits, ref_logits: [N, V] at answer positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)  # [N]
    return kl.mean() if kl.numel() else logits.sum() * 0.0


def tokens_sha256(items: list[dict[str, Any]]) -> str:
    """Fingerprint of a tokenised dataset (ids and labels), never its content."""
    h = hashlib.sha256()
    for x in items:
        h.update(b"%d:" % len(x["input_ids"]))
        h.update(",".join(map(str, x["input_ids"])).encode())
        h.update(b"|" + ",".join(map(str, x["labels"])).encode() + b";")
    return h.hexdigest()


@torch.no_grad()
def dataset_nll(
    model: nn.Module, items: list[dict[str, Any]], pad_id: int, device: torch.device, batch_size: int = 16
) -> torch.Tensor:
    """NLL summed over answer tokens per tokenised example, eval mode (dropout off). Returns [N] fp32."""
    out = []
    with preserved_training_state(model):
        model.eval()
        for s in range(0, len(items), batch_size):
            b = {k: v.to(device) for k, v in collate(items[s : s + batch_size], pad_id).items()}
            out.append(answer_logits(model, b).sequence_nll())
    return torch.cat(out).float() if out else torch.empty(0, device=device)


def _source_adapter(model: nn.Module, state: MethodState | None) -> str | None:
    """The adapter to unlearn from: the previous task's served adapter, if the model has it."""
    if not isinstance(model, PeftModel):
        return None
    hint = state.meta.get("serve_adapter") if state is not None else None
    for name in (hint, "default"):
        if name and name in model.peft_config:
            return str(name)
    active = model.active_adapter
    return active if isinstance(active, str) else None


def _routed_group(task: TaskContext, source: str) -> dict[str, Any] | None:
    """After DEMA's tasks, several group adapters answer prompts, each its own: the group that the forget
    set's prompts are routed to is the one to unlearn (the served adapter `source` may be another).
    Returns that group, or None when there are no groups.

    Raises:
        ConfigError: the forget set routes to several groups: unlearning one would leave the others
            answering part of it (split it into one unlearning task per group).
    """
    if task.route is None or task.grouped is None:
        return None
    counts = Counter(task.route(ex.instruction) for ex in task.examples)
    groups = {g["adapter"]: g for g in task.grouped.meta.get("groups", [])}
    if len(counts) > 1:
        split = {groups[a]["name"]: n for a, n in counts.most_common()}
        raise ConfigError(
            f"the forget set of task {task.name!r} is routed to {len(split)} DEMA groups ({split}, "
            "examples per group): one unlearning task unlearns one group's adapter, so split the forget "
            "set into one task per group",
            errors=[{"field": "train", "task": task.name, "groups": split}],
        )
    adapter = next(iter(counts), source)
    group = groups[adapter]
    task.emit(
        f"the forget set is routed to DEMA group {group['name']!r}: unlearning its adapter {adapter!r}",
        group=group["name"],
    )
    return {"name": group["name"], "adapter": adapter, "codebook": list(group["codebook"])}


def _lineage(state: MethodState | None) -> list[dict[str, Any]]:
    """The `forgotten` records an earlier unlearning task left in `state`'s notes ([] if none)."""
    prev = state.meta.get("notes", {}).get("forgotten") if state is not None else None
    return list(prev) if isinstance(prev, list) else []


# ---------------------------------------------------------------- the method


class Npo:
    """NPO (variant `npo`); the subclasses below only change the name, params and loss terms."""

    name: ClassVar[str] = "npo"
    Params: ClassVar[type[BaseModel]] = NpoParams
    # measured on SmolLM2 (docs/benchmarks.md, "Unlearning"): without a retain term any lr >= 3e-4
    # collapses the model; at 1e-4 ten epochs forget about half the forget set and keep the rest
    train_defaults: ClassVar[Mapping[str, float]] = {"lr": 1e-4, "epochs": 10.0}
    unlearning: ClassVar[bool] = True  # the sequence scores this task on its forget set (lower is better)
    retain_term: ClassVar[str | None] = None  # None | "ce" | "kl"
    uses_npo: ClassVar[bool] = True  # False: gradient ascent

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params: Any = params or self.Params()
        self.serve_adapter = "default"
        self._ref_nll = torch.empty(0)  # [N_forget] NLL_sum under pi_ref, fp32
        self._gen = torch.Generator()  # retain sampler (captured in state_dict for exact resume)
        self._retain: list[dict[str, Any]] = []
        self._pad_id = 0
        self._rank_world = (0, 1)
        self._from_base = True  # the starting model is the base (no adapter to keep a copy of)
        self._params: list[nn.Parameter] = []
        self._prior: list[dict[str, Any]] = []  # lineage carried from an earlier unlearning task
        # after DEMA: the group ({name, adapter, codebook}) the forget set routes to, unlearned in place
        self.unlearned_group: dict[str, Any] | None = None

    def prepare(self, model: nn.Module, task: TaskContext, state: MethodState | None) -> nn.Module:
        if self.retain_term is not None and not task.retain:
            raise ConfigError(
                f"method {self.name!r} needs a retain set for task {task.name!r}: set the task's `retain` "
                "file, or use method 'npo' (no retain term)",
                errors=[{"field": "retain", "task": task.name}],
            )
        source = _source_adapter(model, state)
        self.unlearned_group = _routed_group(task, source) if source is not None else None
        if self.unlearned_group is not None:
            source = self.unlearned_group["adapter"]
        self._from_base = source is None
        self.serve_adapter = source or "default"
        model = attach_adapter(model, self.serve_adapter, peft_lora_config(task.lora))
        model.set_adapter(self.serve_adapter)
        if self.retain_term == "kl" and not self._from_base:
            model = attach_adapter(model, REF_ADAPTER, copy.deepcopy(model.peft_config[self.serve_adapter]))
            copy_adapter(model, self.serve_adapter, REF_ADAPTER)
        self._params = adapter_parameters(model, self.serve_adapter)
        only_train(model, self._params)
        self._pad_id = task.pad_id
        self._rank_world = (task.rank, task.world)
        self._retain = task.retain or []
        self._gen = torch.Generator().manual_seed(task.train_cfg.seed + 7919 * task.index + 1)
        # pi_ref on the forget set is a constant per example: once here, never per step.
        self._ref_nll = dataset_nll(model, task.train, task.pad_id, task.device, task.train_cfg.batch_size)
        self._prior = _lineage(state) or _lineage(task.own_state)  # the previous task may be another method's
        task.emit(
            f"{self.name}: unlearning {len(task.train)} examples from "
            f"{'the base model' if self._from_base else 'adapter ' + repr(source)}",
            forget_nll_ref=float(self._ref_nll.mean()),
        )
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return adapter_parameters(model, self.serve_adapter)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        nll = answer_logits(model, batch).sequence_nll()  # [B] summed over answer tokens, fp32
        if self.uses_npo:
            ref = self._ref_nll.to(nll.device)[batch["index"]]  # [B]
            total = npo_loss(nll, ref, self.params.beta)
            parts = {"npo": total.item(), "nll_forget": nll.mean().item(), "nll_ref": ref.mean().item()}
        else:
            n_tok = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
            total = -nll.sum() / n_tok  # -CE, token mean
            parts = {"neg_ce": total.item(), "nll_forget": nll.mean().item()}
        if self.retain_term is not None:
            rb = self._retain_batch(len(nll), nll.device)
            if self.retain_term == "ce":
                term = answer_logits(model, rb).ce()
            else:
                term = token_kl(answer_logits(model, rb).logits, self._ref_logits(model, rb))
            parts[f"{self.retain_term}_retain"] = term.item()
            total = total + self.params.retain_weight * term
        return LossOutput(total, parts)

    def _retain_batch(self, k: int, device: torch.device) -> dict[str, torch.Tensor]:
        """One retain example per forget example, drawn with this method's own seeded generator
        (data-parallel: the same global draw on every rank, each taking its share)."""
        rank, world = self._rank_world
        idx = torch.randint(len(self._retain), (k * world,), generator=self._gen).tolist()[rank::world]
        b = collate([self._retain[i] for i in idx], self._pad_id)
        return {
            "input_ids": b["input_ids"].to(device),
            "attention_mask": b["attention_mask"].to(device),
            "labels": b["labels"].to(device),
        }

    @torch.no_grad()
    def _ref_logits(self, model: Any, rb: dict[str, torch.Tensor]) -> torch.Tensor:
        """pi_ref logits at the retain batch's answer positions [N, V]: base (adapters disabled) or the
        frozen starting-adapter copy.

        Both toggles change requires_grad / the active adapter (peft), so flags are restored after.
        """
        was_training = model.training
        model.eval()  # reference without dropout
        try:
            if self._from_base:
                with model.disable_adapter():
                    return answer_logits(model, rb).logits
            model.set_adapter(REF_ADAPTER)
            return answer_logits(model, rb).logits
        finally:
            model.set_adapter(self.serve_adapter)
            only_train(model, self._params)
            model.train(was_training)

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def after_task(self, model: Any, task: TaskContext) -> MethodState:
        after = dataset_nll(model, task.train, task.pad_id, task.device, task.train_cfg.batch_size)
        if REF_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(REF_ADAPTER)  # only needed during training; never served
            model.set_adapter(self.serve_adapter)
            only_train(model, self._params)
        record: dict[str, Any] = {
            "task": task.name,
            "method": self.name,
            "params": self.params.model_dump(mode="json"),
            "start": "base" if self._from_base else f"adapter:{self.serve_adapter}",
            "forget_examples": len(task.train),
            "forget_tokens_sha256": tokens_sha256(task.train),
            "forget_nll_sum_before": float(self._ref_nll.mean()),
            "forget_nll_sum_after": float(after.mean()),
        }
        if task.retain:
            record["retain_examples"] = len(task.retain)
            record["retain_tokens_sha256"] = tokens_sha256(task.retain)
        task.emit(
            f"{self.name}: forget-set NLL {record['forget_nll_sum_before']:.2f} -> "
            f"{record['forget_nll_sum_after']:.2f}",
            **{k: v for k, v in record.items() if "nll" in k},
        )
        return MethodState(
            meta={
                "method": self.name,
                "serve_adapter": self.serve_adapter,
                "notes": {"forgotten": [*self._prior, record]},
                # per-example fingerprints (token ids, never content; not in the record's notes): later
                # tasks drop their stored copies of these examples (I-LoRA's replay buffer)
                FORGOTTEN_EXAMPLES: sorted({example_sha256(x) for x in task.train}),
            }
        )

    def state_dict(self) -> MethodState:
        return MethodState(
            tensors={"ref_nll": self._ref_nll.detach().cpu(), "retain_rng": self._gen.get_state()},
            meta={"method": self.name},
        )

    def load_state_dict(self, state: MethodState) -> None:
        if "ref_nll" in state.tensors:
            self._ref_nll = state.tensors["ref_nll"].float()
        if "retain_rng" in state.tensors:
            self._gen.set_state(state.tensors["retain_rng"].to(torch.uint8))


class NpoRetain(Npo):
    name: ClassVar[str] = "npo_rt"
    Params: ClassVar[type[BaseModel]] = NpoRetainParams
    # with a retain term, lr 1e-3 x 10 epochs forgets all of the forget set and keeps the retain set
    train_defaults: ClassVar[Mapping[str, float]] = {"lr": 1e-3, "epochs": 10.0}
    retain_term: ClassVar[str | None] = "ce"


class NpoKL(Npo):
    name: ClassVar[str] = "npo_kl"
    Params: ClassVar[type[BaseModel]] = NpoRetainParams
    train_defaults: ClassVar[Mapping[str, float]] = NpoRetain.train_defaults
    retain_term: ClassVar[str | None] = "kl"


class GradAscent(Npo):
    name: ClassVar[str] = "grad_ascent"
    Params: ClassVar[type[BaseModel]] = GradAscentParams
    uses_npo: ClassVar[bool] = False
