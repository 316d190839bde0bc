"""dema: EMA balance with a dynamic per-tensor coefficient + instruction grouping (Qiao et al. 2025, CoIN).

(a) After every optimizer step (gradients still present, after clipping), for each trained tensor p
    with gradient g, in fp32:
        first call in the task: ema = p
        a = ||p - ema||_1,  b = ||g||_1,  c = ||g - g_prev||_1,  alpha = 2 (1 + b) / (a c)
        alpha := fallback (0.01) unless 0 < alpha < 1 (also when a c == 0 or there is no g_prev yet)
        ema <- (1 - alpha) ema + alpha p;  g_prev <- g
    At task end the EMA weights are copied into the served adapter (raw weights kept in the state).
(b) Each group of tasks owns one LoRA adapter and a codebook of instructions. A new task similar enough
    to a group's codebook (cltune.grouping) retrains that group's adapter with (a) on; otherwise it
    expands to a new group whose adapter starts from the most recent adapter, trained with (a) off.

alpha is not scale-invariant (a c grows ~N^2, 1 + b ~N), so on small tensors it nearly always falls
back; the fraction of fallbacks is logged per task (docs/methods.md section 2).

Mixed with other methods: the groups come back from DEMA's last task (`TaskContext.own_state`), but a
group adapter the model holds keeps its current weights, so an unlearning task is not undone. An
unlearning task after DEMA's unlearns, in place, the group its forget set is routed to (refused when the
forget set is routed to several groups); that group is marked `unlearned`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cltune.grouping import Decision, decide, subsample
from cltune.methods.base import FORGOTTEN_EXAMPLES, LossOutput, MethodState, TaskContext, own_state
from cltune.methods.common import (
    adapter_parameters,
    adapter_state,
    attach_adapter,
    ce_loss,
    load_adapter_state,
    only_train,
    paired_lora_tensors,
    peft_lora_config,
)
from cltune.sections import LoraConfig


class DemaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fallback_alpha: float = Field(0.01, gt=0.0, lt=1.0)  # alpha when the formula is out of (0, 1)
    grouping: bool = True  # False: one group, every task retrains it with the dynamic EMA on
    threshold: float = Field(0.5, ge=-1.0, le=1.0)  # similarity needed to retrain a group (centroid tfidf:
    # one template scores ~0.9, different templates < 0.2 on the demo data)
    similarity: Literal["tfidf", "minilm"] = "tfidf"  # cltune.grouping backend
    reduce: Literal["centroid", "mean_pairwise"] = "centroid"  # see cltune.grouping.similarity
    codebook_size: int = Field(200, ge=1, le=100_000)  # instructions kept per group


def dynamic_alpha(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, fallback: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = 2 (1 + b) / (a c), or `fallback` unless 0 < alpha < 1. Returns (alpha, fell_back), 0-dim.

    a, b, c are L1 norms (0-dim tensors); c is None before there is a previous gradient.
    Stays on the device (no .item()), so a step costs no host sync.
    """
    if c is None:
        return torch.full_like(a, fallback), torch.ones_like(a, dtype=torch.bool)
    denom = a * c
    alpha = 2.0 * (1.0 + b) / denom  # inf when denom == 0, nan for 0/0: both fail the range test
    ok = (denom > 0) & (alpha > 0) & (alpha < 1)
    return torch.where(ok, alpha, torch.full_like(alpha, fallback)), ~ok


@torch.no_grad()
def dema_update_(
    ema: torch.Tensor, p: torch.Tensor, g: torch.Tensor, g_prev: torch.Tensor | None, fallback: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DEMA step on one tensor, in place on `ema` (fp32). Returns (alpha, fell_back)."""
    pf, gf = p.detach().float(), g.detach().float()
    a = (pf - ema).abs().sum()
    b = gf.abs().sum()
    c = (gf - g_prev).abs().sum() if g_prev is not None else None
    alpha, fell = dynamic_alpha(a, b, c, fallback)
    ema.lerp_(pf, alpha)  # ema + alpha (p - ema) == (1 - alpha) ema + alpha p
    return alpha, fell


class Dema:
    name: ClassVar[str] = "dema"
    Params: ClassVar[type[BaseModel]] = DemaParams
    train_defaults: ClassVar[Mapping[str, float]] = {"lr": 1e-3}  # docs/benchmarks.md, "Learning rates"

    def __init__(self, params: DemaParams | None = None) -> None:
        self.params = params or DemaParams()
        self.serve_adapter = "g0"
        self.groups: list[dict[str, Any]] = []  # [{name, adapter, codebook, lora, tasks}], oldest first
        self.decision: Decision | None = None
        self.dema_on = False
        self._named: list[tuple[str, nn.Parameter]] = []
        self._reset()

    def _reset(self) -> None:
        self.ema: dict[str, torch.Tensor] = {}  # param name -> fp32 EMA
        self.g_prev: dict[str, torch.Tensor] = {}
        self.counts = {"updates": 0.0, "fallbacks": 0.0, "no_grad": 0.0, "alpha_sum": 0.0}
        self._acc: torch.Tensor | None = None  # [fallbacks, sum of alpha] not yet in `counts`

    # ------------------------------------------------------------ task lifecycle

    def prepare(self, model: nn.Module, task: TaskContext, state: MethodState | None) -> nn.Module:
        recent = _recent_adapter(model, state)
        own = own_state(self.name, task, state)  # DEMA's last task, maybe before other methods' tasks
        self.groups = [dict(g) for g in own.meta.get("groups", [])] if own is not None else []
        for g in self.groups:  # a new process: put every group's adapter back from the saved state
            # An adapter the model holds is never reloaded: another method's task since DEMA's last one
            # may have changed it (an unlearning task unlearns the served group in place).
            if not (isinstance(model, PeftModel) and g["adapter"] in model.peft_config):
                model = attach_adapter(
                    model, g["adapter"], peft_lora_config(LoraConfig.model_validate(g["lora"]))
                )
                load_adapter_state(model, g["adapter"], _part(own, g["adapter"]))
        self._note_unlearning(state)
        instructions = [ex.instruction for ex in task.examples]
        self.decision = self._decide(instructions)
        if self.decision.action == "retrain":
            group = next(g for g in self.groups if g["name"] == self.decision.group)
            group["codebook"] = subsample(group["codebook"] + instructions, self.params.codebook_size)
            group["tasks"] = group["tasks"] + [task.name]
        else:
            taken = {g["name"] for g in self.groups}
            group = {
                "name": task.name if task.name not in taken else f"{task.name}-{len(self.groups)}",
                "adapter": f"g{len(self.groups)}",
                "lora": task.lora.model_dump(mode="json"),
                "codebook": subsample(instructions, self.params.codebook_size),
                "tasks": [task.name],
            }
            self.groups.append(group)
            model = attach_adapter(model, group["adapter"], peft_lora_config(task.lora))
            copied = _init_from(model, recent, group["adapter"])
            group["initialised_from"] = recent if copied else None
        self.serve_adapter = group["adapter"]
        self.dema_on = self.decision.action == "retrain" or not self.params.grouping
        assert isinstance(model, PeftModel)
        model.set_adapter(self.serve_adapter)
        params = self.trainable_parameters(model)
        only_train(model, params)
        ids = {id(p) for p in params}
        self._named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
        self._reset()  # the EMA and g_prev restart every task
        d = self.decision
        task.emit(
            f"dema: {d.action} group {group['name']!r} (similarity {d.score:.3f}, threshold "
            f"{self.params.threshold}); dynamic EMA {'on' if self.dema_on else 'off'}",
            decision=d.as_dict(),
            group=group["name"],
            dema_on=self.dema_on,
        )
        return model

    def _note_unlearning(self, state: MethodState | None) -> None:
        """After an unlearning task: mark the group it unlearned in place (the one its forget set is
        routed to, see cltune.methods.npo)."""
        if state is None or not state.meta.get(FORGOTTEN_EXAMPLES):
            return
        for g in self.groups:
            if g["adapter"] == state.meta.get("serve_adapter"):
                g["unlearned"] = [*g.get("unlearned", []), *(r["task"] for r in _forgotten_records(state))]

    def _decide(self, instructions: list[str]) -> Decision:
        if not self.groups:
            return Decision(None, 0.0, "expand", {})
        if not self.params.grouping:  # one group for everything
            return Decision(self.groups[-1]["name"], 1.0, "retrain", {})
        books = {g["name"]: g["codebook"] for g in self.groups}
        return decide(instructions, books, self.params.threshold, self.params.similarity, self.params.reduce)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return adapter_parameters(model, self.serve_adapter)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        return ce_loss(model, batch)

    def after_step(self, model: nn.Module, step: int) -> None:
        if not self.dema_on or not self._named:
            return
        acc = torch.zeros(2, device=self._named[0][1].device)  # [fallbacks, sum of alpha] this step
        for name, p in self._named:
            if name not in self.ema:
                self.ema[name] = p.detach().float().clone()  # first call in the task
            if p.grad is None:  # e.g. sharded optimizers: no gradient, so no coefficient either
                self.ema[name].lerp_(p.detach().float(), self.params.fallback_alpha)
                self.counts["no_grad"] += 1
                acc += torch.tensor([1.0, self.params.fallback_alpha], device=acc.device)
                continue
            alpha, fell = dema_update_(
                self.ema[name], p, p.grad, self.g_prev.get(name), self.params.fallback_alpha
            )
            self.g_prev[name] = p.grad.detach().float().clone()
            acc[0] += fell.float()
            acc[1] += alpha
        self.counts["updates"] += len(self._named)
        self._acc = acc if self._acc is None else self._acc + acc  # no host sync per step

    def _flush(self) -> None:
        """Fold the device-side counters into `counts` (one host sync)."""
        if self._acc is not None:
            fallbacks, alpha_sum = self._acc.tolist()
            self.counts["fallbacks"] += fallbacks
            self.counts["alpha_sum"] += alpha_sum
            self._acc = None

    @torch.no_grad()
    def after_task(self, model: nn.Module, task: TaskContext) -> MethodState:
        assert isinstance(model, PeftModel)
        self._flush()
        raw = adapter_state(model, self.serve_adapter)
        if self.dema_on and self.ema:
            for name, p in self._named:
                p.copy_(self.ema[name].to(p.dtype))  # serve the EMA weights
        n = self.counts["updates"]
        dema = {
            "on": self.dema_on,
            "updates": int(n),
            "no_grad": int(self.counts["no_grad"]),
            "fallback_fraction": self.counts["fallbacks"] / n if n else None,
            "mean_alpha": self.counts["alpha_sum"] / n if n else None,
        }
        if self.dema_on and n:
            task.emit(
                f"dema: alpha fell back to {self.params.fallback_alpha} in "
                f"{dema['fallback_fraction']:.1%} of {int(n)} tensor updates",
                **{f"dema_{k}": v for k, v in dema.items()},
            )
            if self.counts["no_grad"]:
                task.emit(
                    f"dema: {int(self.counts['no_grad'])} tensor updates had no gradient (fallback used)",
                    level="warning",
                )
        tensors = {f"raw/{k}": v for k, v in raw.items()} if self.dema_on else {}
        for g in self.groups:
            tensors |= {f"{g['adapter']}/{k}": v for k, v in adapter_state(model, g["adapter"]).items()}
        group = next(g for g in self.groups if g["adapter"] == self.serve_adapter)
        meta = {
            "method": self.name,
            "serve_adapter": self.serve_adapter,
            "group": group["name"],
            "groups": self.groups,
            "notes": {
                "decision": self.decision.as_dict() if self.decision else None,
                "threshold": self.params.threshold,
                "similarity": self.params.similarity,
                "reduce": self.params.reduce,
                "group_tasks": group["tasks"],
                "dema": dema,
                "served_weights": "dynamic EMA" if self.dema_on else "trained (EMA off: new group)",
            },
        }
        return MethodState(tensors, meta)

    # ------------------------------------------------------------ mid-task checkpoints

    def state_dict(self) -> MethodState:
        self._flush()
        tensors = {f"ema/{k}": v for k, v in self.ema.items()} | {
            f"g_prev/{k}": v for k, v in self.g_prev.items()
        }
        return MethodState(
            tensors, {"method": self.name, "counts": dict(self.counts), "dema_on": self.dema_on}
        )

    def load_state_dict(self, state: MethodState) -> None:
        if not state.meta:
            return
        device = {n: p.device for n, p in self._named}
        self.ema = {
            k[4:]: v.float().to(device[k[4:]]) for k, v in state.tensors.items() if k.startswith("ema/")
        }
        self.g_prev = {
            k[7:]: v.float().to(device[k[7:]]) for k, v in state.tensors.items() if k.startswith("g_prev/")
        }
        self.counts = dict(state.meta["counts"])
        self._acc = None


def _recent_adapter(model: nn.Module, state: MethodState | None) -> str | None:
    """The adapter the previous task served (its state says so) or, failing that, the active one."""
    if not isinstance(model, PeftModel):
        return None
    name = state.meta.get("serve_adapter") if state is not None else None
    if name in model.peft_config:
        return str(name)
    active = model.active_adapter
    return active if isinstance(active, str) and active in model.peft_config else None


@torch.no_grad()
def _init_from(model: nn.Module, src: str | None, dst: str) -> bool:
    """Copy adapter `src` into the new adapter `dst` where shapes match. Returns whether it copied."""
    if src is None or src == dst:
        return False
    pairs = paired_lora_tensors(model, src, dst)
    if not pairs or any(s.shape != d.shape for s, d in pairs):
        return False  # a different rank or target set: keep peft's fresh init (B = 0)
    for s, d in pairs:
        d.copy_(s)
    return True


def _forgotten_records(state: MethodState) -> list[dict[str, Any]]:
    """The newest `forgotten` record of an unlearning task's notes (the task it was), as a list."""
    records = state.meta.get("notes", {}).get("forgotten") or []
    return records[-1:] if isinstance(records, list) else []


def _part(state: MethodState | None, adapter: str) -> dict[str, torch.Tensor]:
    prefix = f"{adapter}/"
    return {k[len(prefix) :]: v for k, v in (state.tensors if state else {}).items() if k.startswith(prefix)}
