"""kappatune: LoRA on the best-conditioned weight matrices only (Ludwig 2025; docs/methods.md section 4).

kappa(W) = sigma_max / (sigma_min + 1e-8) from an fp32 SVD, the same formula as
`peft.helpers.KappaTuneSelector`. Candidates are ranked ascending by (kappa, name) and the lowest
`top_p` fraction (or `num_modules`) gets LoRA, with the rank raised so the trainable-parameter count
matches the run's global LoRA (the baseline it is compared with).

The peft helper is not called directly: it ranks every nn.Linear, so on a wrapped model it picks
`lora_A`/`lora_B` matrices and on small vocabularies `lm_head`, and it has no tie-break. Here the
table is built from the base weights only (a peft-wrapped model is read through its `base_layer`s,
a merged one is refused), `lm_head` and embeddings are excluded before any SVD, and the table is
cached per fingerprint of the weights it was computed from, so the SVDs run once per base model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cltune.errors import ConfigError
from cltune.methods.base import LossOutput, MethodState, TaskContext
from cltune.methods.common import (
    adapter_parameters,
    attach_adapter,
    ce_loss,
    only_train,
    peft_lora_config,
)
from cltune.models import default_cache_dir, unwrap
from cltune.sections import LoraConfig

ADAPTER = "kappa"
EPS = 1e-8  # added to sigma_min, as in peft's helper
CACHE_VERSION = 1
EXCLUDED = ("lm_head", "embed")  # name fragments never considered (output head, token/position embeddings)


class KappaTuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_p: float = Field(default=0.2, gt=0.0, le=1.0)  # fraction of candidates that get LoRA (at least one)
    num_modules: int | None = Field(default=None, ge=1, le=100_000)  # exact count; overrides top_p
    # module-name suffixes considered ("q_proj", "mlp.down_proj"); "all-linear": every linear layer
    candidates: list[str] | Literal["all-linear"] = "all-linear"
    match_params: bool = True  # raise the rank so trainable params == the run's global LoRA; False: lora.r
    max_rank: int = Field(default=256, ge=1, le=4096)  # cap on the raised rank
    max_dim: int = Field(default=16384, ge=1)  # skip matrices with a larger side (SVD cost), as peft's helper
    cache: bool = True  # reuse the kappa table stored under <data dir>/kappa for the same weights


# ---------------------------------------------------------------- the kappa table


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole matrix, also of a layer sharded across ranks (an FSDP2 DTensor: gathered, collectively)."""
    full = getattr(weight, "full_tensor", None)
    return full().detach() if callable(full) else weight.detach()


def condition_number(weight: torch.Tensor) -> float:
    """kappa = sigma_max / (sigma_min + 1e-8) of a 2-D weight, from an fp32 SVD."""
    s = torch.linalg.svdvals(full_weight(weight).float())  # descending
    return float(s[0] / (s[-1] + EPS))


def base_linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The base model's nn.Linear modules by name, lm_head and embeddings excluded.

    A peft-wrapped model is read through each tuner layer's `base_layer` (adapter matrices are never
    candidates); names are those of the unwrapped model, which is what LoRA's target_modules match.

    Raises:
        ConfigError: an adapter is merged into the weights (they are no longer the base weights).
    """
    root = unwrap(model)
    tied = _embedding_storages(root)
    out: dict[str, nn.Linear] = {}
    tuner_prefixes: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(p) for p in tuner_prefixes):
            continue  # lora_A / lora_B / base_layer inside a tuner layer
        if isinstance(module, BaseTunerLayer):
            if module.merged:
                raise ConfigError(
                    f"kappatune: adapter weights are merged into {name!r}; the condition numbers must come "
                    "from the base weights: unmerge first",
                    errors=[],
                )
            tuner_prefixes.append(name + ".")
            module = module.get_base_layer()
        if not isinstance(module, nn.Linear) or any(x in name for x in EXCLUDED):
            continue
        sharded = callable(getattr(module.weight, "to_local", None))  # an FSDP2 shard: never the embeddings
        if not sharded and module.weight.untyped_storage().data_ptr() in tied:
            continue  # an output head tied to the embeddings under another name
        out[name] = module
    return out


def _embedding_storages(root: nn.Module) -> set[int]:
    ptrs = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(root, get, lambda: None)()
        if emb is not None and getattr(emb, "weight", None) is not None:
            ptrs.add(emb.weight.untyped_storage().data_ptr())
    return ptrs


def weights_fingerprint(modules: dict[str, nn.Linear]) -> str:
    """sha256 over (name, shape, dtype, bytes) of the weights: identifies the matrices a table describes."""
    h = hashlib.sha256()
    for name in sorted(modules):
        w = full_weight(modules[name].weight)
        h.update(f"{name}|{tuple(w.shape)}|{w.dtype}\n".encode())
        h.update(w.cpu().contiguous().view(torch.uint8).numpy().data)  # hashed in place, no bytes copy
    return h.hexdigest()


def kappa_table(modules: dict[str, nn.Linear], max_dim: int = 16384) -> dict[str, float]:
    """kappa per module; modules with a side larger than `max_dim` are left out."""
    return {n: condition_number(m.weight) for n, m in modules.items() if max(m.weight.shape) <= max_dim}


def cached_kappa_table(
    model: nn.Module, max_dim: int, use_cache: bool = True, cache_dir: Path | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """The kappa table of `model`'s base weights, read from / written to the cache when enabled.

    Returns (table, info) with info = {fingerprint, cached, seconds}.
    """
    t0 = time.perf_counter()
    modules = base_linear_modules(model)
    fp = weights_fingerprint(modules)
    path = (cache_dir or default_cache_dir().parent / "kappa") / f"kappa-{fp[:24]}-{max_dim}.json"
    if use_cache and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fp and saved.get("version") == CACHE_VERSION:
            return saved["kappa"], {"fingerprint": fp, "cached": True, "seconds": time.perf_counter() - t0}
    table = kappa_table(modules, max_dim)
    if use_cache:
        _write_atomic(
            path,
            {"version": CACHE_VERSION, "fingerprint": fp, "eps": EPS, "max_dim": max_dim, "kappa": table},
        )
    return table, {"fingerprint": fp, "cached": False, "seconds": time.perf_counter() - t0}


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kappa-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=0, sort_keys=True)
    os.replace(tmp, path)  # concurrent writers of the same table write the same content


# ---------------------------------------------------------------- selection and rank


def _matches(name: str, suffixes: list[str] | str) -> bool:
    if suffixes == "all-linear":
        return True
    return any(name == s or name.endswith("." + s) for s in suffixes)


def rank_modules(table: dict[str, float]) -> list[tuple[str, float]]:
    """Ascending by (kappa, name); NaN kappas last. Deterministic for equal kappas."""
    return sorted(table.items(), key=lambda kv: (math.isnan(kv[1]), kv[1], kv[0]))


def select_modules(
    table: dict[str, float], top_p: float, num_modules: int | None, candidates: list[str] | str = "all-linear"
) -> list[str]:
    """Names of the lowest-kappa candidates: `num_modules` of them, else max(1, int(n * top_p))."""
    ranked = [n for n, _ in rank_modules(table) if _matches(n, candidates)]
    if not ranked:
        raise ConfigError(f"kappatune: no candidate module matches {candidates!r}", errors=[])
    k = num_modules if num_modules is not None else max(1, int(len(ranked) * top_p))
    return ranked[: min(k, len(ranked))]


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), None)


def baseline_lora_params(modules: dict[str, nn.Linear], lora: LoraConfig) -> int:
    """Trainable parameters of the run's global LoRA: r * (in + out) over the modules it targets."""
    total = 0
    for name, m in modules.items():
        if not _matches(name, lora.target_modules):
            continue
        if lora.layers_to_transform is not None and _layer_index(name) not in lora.layers_to_transform:
            continue
        total += lora.r * (m.in_features + m.out_features)
    return total


def matched_rank(modules: dict[str, nn.Linear], selection: list[str], target: int, max_rank: int) -> int:
    """The rank r with r * sum(in + out) over the selection closest to `target` (1 <= r <= max_rank)."""
    per_rank = sum(modules[n].in_features + modules[n].out_features for n in selection)
    return int(min(max_rank, max(1, round(target / per_rank))))


def adapted_modules(model: nn.Module, adapter: str = ADAPTER) -> list[str]:
    """Base-model names of the modules that carry `adapter` (sorted)."""
    root = unwrap(model)
    return sorted(n for n, m in root.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A)


# ---------------------------------------------------------------- the method


class KappaTune:
    name: ClassVar[str] = "kappatune"
    Params: ClassVar[type[BaseModel]] = KappaTuneParams
    train_defaults: ClassVar[Mapping[str, float]] = {"lr": 1e-3}  # docs/benchmarks.md, "Learning rates"
    # its targets and rank come from the base model's condition numbers, not from an adapter it is handed
    starts_from_adapter: ClassVar[bool] = False

    def __init__(self, params: KappaTuneParams | None = None) -> None:
        self.params = params or KappaTuneParams()
        self.serve_adapter = ADAPTER
        self.meta: dict[str, Any] = {}  # selection, kappas, rank, counts: stored with the adapter

    def prepare(self, model: nn.Module, task: TaskContext, state: MethodState | None) -> nn.Module:
        if state is not None and state.meta.get("method") == self.name and state.meta.get("selection"):
            self.meta = {k: v for k, v in state.meta.items() if k != "notes"}  # same base: same selection
        else:
            self.meta = self._select(model, task)
        m = self.meta
        alpha = task.lora.alpha * m["rank"] / task.lora.r  # keep the LoRA scale alpha / r of the baseline
        config = peft_lora_config(
            task.lora, target_modules=m["selection"], r=m["rank"], lora_alpha=alpha, layers_to_transform=None
        )
        model = attach_adapter(model, ADAPTER, config)
        have = adapted_modules(model)
        if have != sorted(m["selection"]):  # peft may store a shorter suffix list: check what it wrapped
            raise ConfigError(
                f"kappatune: adapter {ADAPTER!r} is on {have}, the selection is {sorted(m['selection'])}",
                errors=[],
            )
        model.set_adapter(ADAPTER)
        only_train(model, self.trainable_parameters(model))
        task.emit(
            f"kappatune: LoRA r={m['rank']} on {len(m['selection'])} of {m['num_candidates']} modules",
            selection=m["selection"],
            rank=m["rank"],
            trainable=m["trainable_params"],
            baseline=m["baseline_params"],
        )
        return model

    def _select(self, model: nn.Module, task: TaskContext) -> dict[str, Any]:
        p = self.params
        table, info = cached_kappa_table(model, p.max_dim, p.cache)
        modules = base_linear_modules(model)
        selection = select_modules(table, p.top_p, p.num_modules, p.candidates)
        baseline = baseline_lora_params(modules, task.lora)
        rank = matched_rank(modules, selection, baseline, p.max_rank) if p.match_params else task.lora.r
        trainable = rank * sum(modules[n].in_features + modules[n].out_features for n in selection)
        task.emit(
            f"kappatune: kappa table of {len(table)} matrices in {info['seconds']:.2f} s"
            + (" (cached)" if info["cached"] else ""),
            **info,
        )
        return {
            "method": self.name,
            "selection": selection,
            "kappa": {n: table[n] for n in selection},
            "table": table,
            "rank": rank,
            "num_candidates": sum(_matches(n, p.candidates) for n in table),
            "baseline_params": baseline,
            "trainable_params": trainable,
            "fingerprint": info["fingerprint"],
            "selection_seconds": info["seconds"],
            "cached": info["cached"],
        }

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return adapter_parameters(model, ADAPTER)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        return ce_loss(model, batch)

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def after_task(self, model: nn.Module, task: TaskContext) -> MethodState:
        m = self.meta
        notes = {
            "selection": m["selection"],
            "kappa": m["kappa"],
            "rank": m["rank"],
            "trainable_params": m["trainable_params"],
            "baseline_params": m["baseline_params"],
            "kappa_fingerprint": m["fingerprint"],
        }
        return MethodState(meta={**m, "notes": notes})

    def state_dict(self) -> MethodState:
        return MethodState(meta=dict(self.meta))

    def load_state_dict(self, state: MethodState) -> None:
        if state.meta:
            self.meta = dict(state.meta)
