"""control_llm: Control LLM in LoRA form (Wei et al. 2025; docs/methods.md section 3).

K of the L decoder layers are "expanded": each runs twice per forward, once with the LoRA adapter off
(the frozen pretrained layer, h_p) and once with it on (the trained twin, h_e), and the layer returns
the interpolation h = (1 - w) h_p + w h_e. A divergence loss (1/K) sum_k mean((h_e,k - h_p,k)^2) over
non-padding positions keeps the twin close to the frozen layer. LoRA sits on the expanded layers only.

The two passes are installed by replacing the decoder layer's `forward` on the instance (not by
wrapping the layer in a new module): parameter names stay exactly those of the plain peft model, so
the loop's checkpoints and the run's saved adapters load whether or not the layers are wrapped.
Generation works through a private KV cache per wrapped layer for the frozen pass.

Serving: the registered adapter is a plain LoRA whose lora_B is scaled by w per layer (merge-back).
That is exact to first order in the adapter delta (f(x + w d) ~ (1 - w) f(x) + w f(x + d)), not exactly
for the nonlinear layer; the record's notes say so. The unscaled training weights travel in the
method state, and `prepare` restores them before the next task trains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers.cache_utils import DynamicCache

from cltune.errors import ConfigError
from cltune.methods.base import LossOutput, MethodState, TaskContext, continues_other, own_state
from cltune.methods.common import (
    adapter_parameters,
    adapter_state,
    answer_logits,
    attach_adapter,
    load_adapter_state,
    only_train,
    peft_lora_config,
)
from cltune.models import decoder_layers

ADAPTER = "control"
# the decoder layer's KV-cache argument: `cache` since transformers 5.24, `past_key_values` before
CACHE_KWARGS = ("cache", "past_key_values")
APPROXIMATION = (
    "merge-back: the served LoRA is the trained one with lora_B scaled by w per expanded layer; "
    "exact to first order in the adapter delta, not exactly equal to the two-pass interpolation"
)


class ControlLlmParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_expanded: int | None = Field(
        default=None, ge=1, le=4096
    )  # K; None: L // 4 (at least 1), the paper's 8 of 32
    merge: Literal["lerp", "dlerp"] = "lerp"  # lerp: one w per layer; dlerp: per-token gate on [h_p; h_e]
    init_logit: float = Field(default=0.0, ge=-10.0, le=10.0)  # f at init; w = sigmoid(f) = 0.5
    train_w: bool = False  # lerp: also train f (the paper freezes it for SFT)
    divergence_weight: float = Field(
        default=1.0, ge=0.0, le=100.0
    )  # weight of the divergence loss added to CE
    # LoRA targets inside the expanded layers; "all-linear" mirrors the paper's fully trainable twin,
    # None follows the run's lora.target_modules
    target_modules: list[str] | Literal["all-linear"] | None = "all-linear"


# ---------------------------------------------------------------- layer selection


def expansion_layers(num_layers: int, k: int) -> list[int]:
    """Indices of the K expanded layers: every split-th layer, split = L // K, (idx + 1) % split == 0.

    When L is not a multiple of K that rule yields more than K layers; the deepest K are kept.
    """
    if not 1 <= k <= num_layers:
        raise ConfigError(
            f"control_llm: num_expanded={k} must be between 1 and the {num_layers} layers", errors=[]
        )
    split = num_layers // k
    return [i for i in range(num_layers) if (i + 1) % split == 0][-k:]


def linear_leaf_names(layer: nn.Module) -> list[str]:
    """Leaf names of the nn.Linear modules inside one decoder layer (q_proj, ..., down_proj)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, nn.Linear)})


# ---------------------------------------------------------------- the two-pass forward


class InterpolatedForward:
    """Replacement `forward` of one decoder layer: frozen pass, adapted pass, interpolation.

    Acts only while `adapter` is active and adapters are enabled; otherwise it is the plain layer
    (so `disable_adapter()` and other adapters see the unmodified model).
    """

    def __init__(
        self,
        layer: nn.Module,
        layer_idx: int,
        adapter: str,
        weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        record: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
    ) -> None:
        self.previous = layer.__dict__.get(
            "forward"
        )  # an instance-level forward (accelerate hooks) to restore
        self.inner = layer.forward
        self.layer_idx = layer_idx
        self.adapter = adapter
        self.weight = weight  # (h_p, h_e) -> w, broadcastable to [B, T, H]
        self.record = record  # (h_p, h_e, w) bookkeeping for the loss
        self.loras = [m for m in layer.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
        self.config = getattr(getattr(layer, "self_attn", None), "config", None)
        self.shadow: DynamicCache | None = None  # KV cache of the frozen pass during generation

    def active(self) -> bool:
        return any(not m.disable_adapters and self.adapter in m.active_adapters for m in self.loras)

    def frozen_cache(self, cache: Any) -> DynamicCache:
        # A new generation starts with an empty main cache for this layer: start a new shadow too.
        if self.shadow is None or cache.get_seq_length(self.layer_idx) == 0:
            self.shadow = DynamicCache(config=self.config) if self.config is not None else DynamicCache()
        return self.shadow

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.active():
            return self.inner(hidden_states, *args, **kwargs)
        frozen_kwargs = dict(kwargs)
        for key in CACHE_KWARGS:  # the frozen pass must never write into the main KV cache
            if kwargs.get(key) is not None:
                frozen_kwargs[key] = self.frozen_cache(kwargs[key])
        for m in self.loras:  # not enable_adapters(): that flips requires_grad
            m._disable_adapters = True
        try:
            out_p = self.inner(hidden_states, *args, **frozen_kwargs)
        finally:
            for m in self.loras:
                m._disable_adapters = False
        out_e = self.inner(hidden_states, *args, **kwargs)
        h_p = out_p[0] if isinstance(out_p, tuple) else out_p  # [B, T, H]
        h_e = out_e[0] if isinstance(out_e, tuple) else out_e
        w = self.weight(h_p, h_e)
        self.record(h_p, h_e, w)
        h = h_p + w * (h_e - h_p)  # == h_p exactly while h_e == h_p (adapter at init)
        return (h, *out_e[1:]) if isinstance(out_e, tuple) else h


def unwrap_layers(model: nn.Module) -> int:
    """Restore every decoder layer whose forward was replaced by InterpolatedForward. Returns the count."""
    count = 0
    for layer in decoder_layers(model):
        fwd = layer.__dict__.get("forward")
        if isinstance(fwd, InterpolatedForward):
            if fwd.previous is None:
                del layer.forward
            else:
                layer.forward = fwd.previous
            count += 1
    return count


# ---------------------------------------------------------------- the method


class ControlLlm:
    name: ClassVar[str] = "control_llm"
    Params: ClassVar[type[BaseModel]] = ControlLlmParams
    train_defaults: ClassVar[Mapping[str, float]] = {"lr": 1e-3}  # docs/benchmarks.md, "Learning rates"
    # trained as the two-pass interpolation, served as the merged-back LoRA: the sequence measures the
    # gap between the two per task (cltune.served) and scores R with the served form
    approximate_serving: ClassVar[bool] = True
    # its adapter covers only the layers it expands, trained unscaled: not a layout it can be handed
    starts_from_adapter: ClassVar[bool] = False

    def __init__(self, params: ControlLlmParams | None = None) -> None:
        self.params = params or ControlLlmParams()
        self.serve_adapter = ADAPTER
        self.layers: list[int] = []  # expanded layer indices
        self.num_layers = 0  # L
        self.f: nn.Parameter | None = None  # [K] fp32 lerp logits, w = sigmoid(f)
        self.gate_w: nn.Parameter | None = None  # [K, 2H] fp32 dlerp gate weights
        self.gate_b: nn.Parameter | None = None  # [K] fp32 dlerp gate bias
        self.w_sum: torch.Tensor | None = None  # [K] dlerp: sum of mean token w per forward (serving w)
        self.w_count: torch.Tensor | None = None  # [K]
        # (k, h_e - h_p [B, T, H], w) per expanded layer, collected only during loss()
        self._records: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None

    # -- interpolation weights

    def _weight_fn(self, k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def weight(h_p: torch.Tensor, h_e: torch.Tensor) -> torch.Tensor:
            if self.params.merge == "lerp":
                assert self.f is not None
                return torch.sigmoid(self.f[k]).to(h_p.dtype)  # scalar
            assert self.gate_w is not None and self.gate_b is not None
            z = torch.cat([h_p, h_e], dim=-1).float() @ self.gate_w[k] + self.gate_b[k]  # [B, T]
            return torch.sigmoid(z).unsqueeze(-1).to(h_p.dtype)  # [B, T, 1]

        return weight

    def _record_fn(self, k: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
        def record(h_p: torch.Tensor, h_e: torch.Tensor, w: torch.Tensor) -> None:
            if self._records is not None:
                self._records.append((k, h_e - h_p, w))

        return record

    def serving_w(self) -> list[float]:
        """w per expanded layer for the merge-back: sigmoid(f) (lerp) or the mean training gate (dlerp)."""
        if self.params.merge == "lerp":
            assert self.f is not None
            return torch.sigmoid(self.f.detach().float()).tolist()
        assert self.w_sum is not None and self.w_count is not None and self.gate_b is not None
        fallback = torch.sigmoid(self.gate_b.detach().float()).cpu()
        mean = self.w_sum / self.w_count.clamp(min=1)
        return torch.where(self.w_count > 0, mean, fallback).tolist()

    # -- protocol

    def prepare(self, model: nn.Module, task: TaskContext, state: MethodState | None) -> nn.Module:
        if isinstance(model, PeftModel):
            unwrap_layers(model)  # a stopped task may have left its wrappers behind
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        k = self.params.num_expanded or max(1, self.num_layers // 4)
        self.layers = expansion_layers(self.num_layers, k)
        targets = self.params.target_modules or task.lora.target_modules
        if targets == "all-linear":  # peft refuses "all-linear" with layers_to_transform: list the leaves
            targets = linear_leaf_names(layers[self.layers[0]])
        config = peft_lora_config(task.lora, target_modules=targets, layers_to_transform=self.layers)
        model = attach_adapter(model, ADAPTER, config)
        existing = getattr(model.peft_config[ADAPTER], "layers_to_transform", None)
        if list(existing or []) != self.layers:
            raise ConfigError(
                f"control_llm: adapter {ADAPTER!r} expands layers {existing}, these params ask for {self.layers}; "
                "keep num_expanded fixed across a sequence",
                errors=[],
            )
        base: Any = model.get_base_model()
        hidden = int(base.config.hidden_size)  # H
        self._init_weights(k, hidden, task.device)
        own = own_state(self.name, task, state)  # Control-LLM's last task, maybe before other methods'
        ours = own is not None
        if own is not None:
            # another method's task trained the served (merged-back) adapter in place, e.g. unlearned it:
            # continue from those weights, unscaled, rather than from the older unscaled copy
            self._load_task_state(model, own, from_served=continues_other(self.name, state) == ADAPTER)
        model.set_adapter(ADAPTER)
        for pos, idx in enumerate(self.layers):
            layer = decoder_layers(model)[idx]
            layer.forward = InterpolatedForward(
                layer, idx, ADAPTER, self._weight_fn(pos), self._record_fn(pos)
            )
        only_train(model, self.trainable_parameters(model))
        task.emit(
            f"control_llm: expanded layers {self.layers} of {self.num_layers} ({self.params.merge})",
            layers=self.layers,
            num_layers=self.num_layers,
            continued=ours,
        )
        return model

    def _init_weights(self, k: int, hidden: int, device: torch.device) -> None:
        p = self.params
        self.f = nn.Parameter(torch.full((k,), p.init_logit, device=device), requires_grad=p.train_w)
        self.gate_w = nn.Parameter(torch.zeros(k, 2 * hidden, device=device))
        self.gate_b = nn.Parameter(torch.full((k,), p.init_logit, device=device))
        self.w_sum, self.w_count = torch.zeros(k), torch.zeros(k)

    def _load_task_state(self, model: PeftModel, state: MethodState, from_served: bool = False) -> None:
        """Continue from Control-LLM's last task: unscaled training weights and the interpolation
        weights. from_served: the unscaled weights are the adapter's current (served) ones divided by w."""
        if state.meta.get("layers") != self.layers:
            raise ConfigError(
                f"control_llm: the previous task expanded layers {state.meta.get('layers')}, "
                f"these params ask for {self.layers}",
                errors=[],
            )
        tensors = {
            k.removeprefix("adapter."): v for k, v in state.tensors.items() if k.startswith("adapter.")
        }
        if from_served:
            self._scale_served(model, [1.0 / w for w in state.meta["w"]])
        elif tensors:
            load_adapter_state(model, ADAPTER, tensors)
        with torch.no_grad():
            for name in ("f", "gate_w", "gate_b"):
                if name in state.tensors:
                    getattr(self, name).copy_(state.tensors[name])

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = adapter_parameters(model, ADAPTER)
        if self.params.merge == "lerp" and self.params.train_w and self.f is not None:
            params.append(self.f)
        if self.params.merge == "dlerp" and self.gate_w is not None and self.gate_b is not None:
            params += [self.gate_w, self.gate_b]
        return params

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        self._records = []
        try:
            ce = answer_logits(model, batch, use_cache=False).ce()  # no KV cache (nor shadow) in training
        finally:
            records, self._records = self._records, None
        mask = batch["attention_mask"].to(ce.dtype)  # [B, T]; 1 on real tokens
        n_tokens = mask.sum().clamp(min=1)
        div = ce.new_zeros(())
        for k, diff, w in records:
            per_token = diff.float().pow(2).mean(dim=-1)  # [B, T]
            div = div + (per_token * mask).sum() / n_tokens
            if self.params.merge == "dlerp":
                assert self.w_sum is not None and self.w_count is not None
                self.w_sum[k] += float((w.detach().float().squeeze(-1) * mask).sum() / n_tokens)
                self.w_count[k] += 1
        div = div / max(1, len(self.layers))
        total = ce + self.params.divergence_weight * div
        return LossOutput(total, {"ce": ce.item(), "divergence": div.item()})

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    @torch.no_grad()
    def after_task(self, model: nn.Module, task: TaskContext) -> MethodState:
        """Unwrap the layers, keep the unscaled weights in the state, scale lora_B by w for serving."""
        unwrap_layers(model)
        assert isinstance(model, PeftModel)
        w = self.serving_w()
        tensors = {f"adapter.{k}": v for k, v in adapter_state(model, ADAPTER).items()}
        tensors.update(self._own_tensors())
        self._scale_served(model, w)
        notes = {
            "expanded_layers": self.layers,
            "num_layers": self.num_layers,
            "merge": self.params.merge,
            "w": [round(x, 6) for x in w],
            "approximation": APPROXIMATION,
            "served_as": f"served adapter {ADAPTER!r} (merged-back {self.params.merge}, "
            f"w={', '.join(f'{x:.3g}' for x in w)}), not the two-pass interpolation it was trained as",
        }
        meta = {
            "method": self.name,
            "layers": self.layers,
            "num_layers": self.num_layers,
            "w": w,
            "notes": notes,
        }
        task.emit(f"control_llm: served adapter = trained LoRA scaled by w={notes['w']}", w=w)
        return MethodState(tensors, meta)

    @torch.no_grad()
    def _scale_served(self, model: nn.Module, factors: list[float]) -> None:
        """lora_B *= factors[k] on expanded layer k: delta = B A s -> factor * delta."""
        layers = decoder_layers(model)
        for pos, idx in enumerate(self.layers):
            for m in layers[idx].modules():
                if isinstance(m, LoraLayer) and ADAPTER in m.lora_B:
                    m.lora_B[ADAPTER].get_parameter("weight").mul_(factors[pos])

    def after_restore(self, model: nn.Module) -> None:
        """A finished task restored from disk (its served tensors loaded): drop the two-pass wrappers
        `prepare` installed, so the model is in the served form after_task leaves."""
        unwrap_layers(model)

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        assert self.f is not None and self.gate_w is not None and self.gate_b is not None
        out = {
            "f": self.f,
            "gate_w": self.gate_w,
            "gate_b": self.gate_b,
            "w_sum": self.w_sum,
            "w_count": self.w_count,
        }
        return {k: v.detach().cpu().clone() for k, v in out.items() if v is not None}

    def state_dict(self) -> MethodState:
        return MethodState(self._own_tensors(), {"method": self.name, "layers": self.layers})

    def load_state_dict(self, state: MethodState) -> None:
        with torch.no_grad():
            for name in ("f", "gate_w", "gate_b", "w_sum", "w_count"):
                target = getattr(self, name)
                if name in state.tensors and target is not None:
                    target.copy_(state.tensors[name])
