"""Inference engine: the base model loaded once, many LoRA adapters resident at once, and
requests for different adapters generated together in one batch.

How a mixed batch runs (punica / S-LoRA style, no Python loop over adapters):
  * every LoRA target Linear of the base model is replaced by a `GatheredLoRALinear` that keeps the
    base Linear plus the stacked weights of all resident adapters, A: [S, r, in] and B: [S, out, r]
    (S slots, ranks zero-padded to the largest r, the adapter's scaling folded into B);
  * slot 0 is all zeros: "no adapter", so base-model requests share the batch;
  * each forward gathers one (A, B) per row by the rows' slot ids and does two batched matmuls,
    so the cost does not grow with the number of distinct adapters in the batch.
Adapters are loaded from the tenant's registry on first use and evicted least-recently-used
(pinned ones stay, and so do adapters that a running row uses).

Scheduling (`EngineParams.scheduler`). The default, "continuous", batches at the granularity of one
decode step: every iteration of the scheduler thread (1) admits waiting requests up to `max_batch`
rows, loading their adapters into slots (a request whose adapter finds no slot that no running row
uses waits, and the least recently used adapter stops taking new rows until it drains, so the waiter
cannot starve), (2) prefills the admitted prompts together (left-padded; identical prompt + adapter
pairs, e.g. the `n` choices of `submit_n`, share one prefill row), (3) runs ONE decode step for all
running rows and (4) retires finished rows at once (EOS, stop string, max_tokens, cancelled future),
resolving their futures. The KV cache is one batched `DynamicCache` whose rows are spliced: admitted
rows' caches are left-padded to the batch's length (or the batch to theirs) and concatenated, leaving
rows are dropped and the leading columns that became padding for every remaining row are trimmed, so
the cache is as long as the longest running row, not the longest row ever seen. Each row keeps its
own position ids and an attention mask that hides its padding, which is why a row gives exactly the
greedy tokens it gives alone. `Future.cancel()` works until the request finishes (futures stay
pending while they run): the row leaves the batch before the next step. When the engine is idle, the
first request waits up to `max_wait_ms` for company (their prefills are batched); once running, new
requests join at the next step. The "static" scheduler (the previous one, kept for comparison) gathers
a batch the same way and runs it to completion before admitting anything else (`generate_rows`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft.utils.other import get_pattern_key
from pydantic import BaseModel, Field
from safetensors.torch import load_file
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cltune.data import left_pad
from cltune.errors import CLTuneError, ConflictError, NotFoundError
from cltune.models import LoadedModel, cache_kwarg
from cltune.registry import AdapterRecord, Registry

log = logging.getLogger("cltune.engine")

FinishReason = Literal["stop", "length"]


class EngineParams(BaseModel):
    max_adapters: int = Field(8, ge=1, le=4096)  # resident adapters (slots); LRU eviction beyond
    max_batch: int = Field(16, ge=1, le=1024)  # requests generated together
    max_wait_ms: float = Field(5.0, ge=0.0, le=60_000.0)  # how long a batch waits to fill up
    max_tokens_limit: int = Field(2048, ge=1, le=1_000_000)  # largest max_tokens a request may ask for
    max_prompt_tokens: int = Field(4096, ge=1, le=1_000_000)  # longer prompts keep their last tokens
    # "continuous": requests join and leave the running batch at every decode step; "static": a batch
    # runs to completion before the next one starts (the previous scheduler, kept for benchmarks)
    scheduler: Literal["continuous", "static"] = "continuous"


class SamplingParams(BaseModel):
    max_tokens: int = Field(16, ge=1)  # upper bound checked against EngineParams.max_tokens_limit
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus sampling mass
    stop: list[str] = Field(default_factory=list, max_length=4)  # generation ends before any of these
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # per-request generator: same seed, same sample
    ignore_eos: bool = False  # keep generating past EOS (benchmarks: fixed output lengths)


class EngineError(CLTuneError):
    """A request could not be served (e.g. more pinned adapters than slots)."""

    kind = "engine_error"


@dataclass(frozen=True)
class AdapterKey:
    """One adapter version of one tenant: what a slot holds."""

    tenant: str
    name: str
    version: int
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class GenRequest:
    prompt_ids: list[int]
    adapter: AdapterKey | None  # None: the base model
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Timing:
    """When one request was submitted, joined a batch, got its first token and finished
    (time.perf_counter()), and the scheduler's decode-step counter (`Engine.stats["steps"]`) when it
    joined and left the batch (continuous scheduler; -1 otherwise)."""

    submitted: float = 0.0
    admitted: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    admitted_step: int = -1
    finished_step: int = -1


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter: str  # "name@version" or "base"
    timing: Timing = field(default_factory=Timing)


# ---------------------------------------------------------------- the gathered LoRA layer


class _BatchRows:
    """Per-forward routing shared by every GatheredLoRALinear: the slot id of each batch row."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # [B] long; None: every row is the base model
        self.version = 0  # bumped when `slots` changes: layers re-gather their per-row weights

    def set(self, slots: torch.Tensor | None) -> None:
        self.slots = slots
        self.version += 1


class GatheredLoRALinear(nn.Module):
    """base(x) + per-row LoRA: y[b] = x[b] A[s_b]^T B[s_b]^T, with s_b the row's slot."""

    def __init__(self, base: nn.Linear, rows: _BatchRows, n_slots: int) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        w = base.weight
        self.A: torch.Tensor
        self.B: torch.Tensor
        self.register_buffer("A", torch.zeros(n_slots, 1, base.in_features, dtype=w.dtype, device=w.device))
        self.register_buffer("B", torch.zeros(n_slots, base.out_features, 1, dtype=w.dtype, device=w.device))
        # The rows' slots stay fixed for a whole generation (until a row finishes), so the gathered
        # weights are made once per batch composition, not once per decode step.
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (rows.version, a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, in]
        y = self.base(x)  # [B, T, out]
        s = self.rows.slots
        if s is None:
            return y
        if self._gathered is None or self._gathered[0] != self.rows.version:
            a = self.A.index_select(0, s).transpose(1, 2).contiguous()  # [B, in, r]
            b = self.B.index_select(0, s).transpose(1, 2).contiguous()  # [B, r, out]
            self._gathered = (self.rows.version, a, b)
        _, a, b = self._gathered
        return torch.baddbmm(y, torch.bmm(x, a), b)  # y + (x a) b: [B, T, r] then [B, T, out]

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one adapter's A [r, in] and scaled B [out, r] into `slot` (None: zeros)."""
        r = 0 if a is None else a.shape[0]
        if r > self.A.shape[1]:  # grow the padded rank; zero padding adds exact zeros
            pad = r - self.A.shape[1]
            self.A = torch.cat([self.A, self.A.new_zeros(self.A.shape[0], pad, self.A.shape[2])], 1)
            self.B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], self.B.shape[1], pad)], 2)
        self._gathered = None
        self.A[slot].zero_()
        self.B[slot].zero_()
        if a is not None and b is not None:
            self.A[slot, :r] = a.to(self.A)
            self.B[slot, :, :r] = b.to(self.B)


def read_lora(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft-format LoRA directory -> {module name in the base model: (A [r, in], scaling * B [out, r])}.

    Raises:
        EngineError: a variant the gathered forward cannot serve (DoRA, embedding targets, modules_to_save).
    """
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise EngineError(f"adapter {path} uses DoRA, which cannot be served in mixed batches")
    if cfg.get("modules_to_save"):
        raise EngineError(f"adapter {path} has modules_to_save {cfg['modules_to_save']}: not servable here")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    alpha, alpha_pattern = float(cfg.get("lora_alpha", 8)), cfg.get("alpha_pattern") or {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if ".lora_B." not in key:
                raise EngineError(
                    f"adapter {path} has tensor {key!r}: only Linear LoRA (lora_A/lora_B) is servable"
                )
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        al = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha))
        scale = al / math.sqrt(r) if cfg.get("use_rslora") else al / r
        if cfg.get("fan_in_fan_out"):
            raise EngineError(f"adapter {path} uses fan_in_fan_out (Conv1D bases): not servable here")
        out[module] = (a, b * scale)
    return out


# ---------------------------------------------------------------- generation


@dataclass
class _Row:
    req: GenRequest
    slot: int
    gen: torch.Generator | None
    on_delta: Callable[[str], None] | None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finish: FinishReason | None = None
    timing: Timing = field(default_factory=Timing)
    # continuous scheduler only:
    future: Future[Completion] | None = None
    pos: int = 0  # position id of `last`
    last: int = -1  # the latest token, not yet in the KV cache: the next decode step's input
    error: BaseException | None = None  # this row failed alone (e.g. its on_delta raised)


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, list[int]], torch.Tensor]


def _pick(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Next token per row from logits [B, V]: argmax for temperature 0, else top-p sampling."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, row in enumerate(rows):
        sp = row.req.sampling
        if sp.temperature == 0.0:
            out.append(greedy[i])
            continue
        # in float64 from the top logit down: a temperature as small as 5e-324 gives the greedy token
        # (the float32 quotient would be inf or NaN, and no distribution to sample from)
        scaled = logits[i].double().cpu()
        probs = torch.softmax((scaled - scaled.max()) / sp.temperature, -1).float()  # [V]; CPU generator
        if sp.top_p < 1.0:
            p, idx = probs.sort(descending=True)
            keep = p.cumsum(0) - p < sp.top_p  # smallest prefix whose mass reaches top_p
            keep[0] = True  # at least the likeliest token, however small top_p is (5e-324 is 0 in float32)
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
        out.append(int(torch.multinomial(probs, 1, generator=row.gen)))
    return out


def _advance(row: _Row, tok: int, tokenizer: Any, eos: set[int]) -> None:
    """Append one token, update the text, apply EOS / stop strings / length, stream the safe part."""
    sp = row.req.sampling
    if not row.timing.first_token:
        row.timing.first_token = time.perf_counter()
    if tok in eos and not sp.ignore_eos:
        row.finish = "stop"
    else:
        row.ids.append(tok)
        row.text = tokenizer.decode(row.ids, skip_special_tokens=True)
        hits = [i for i in (row.text.find(s) for s in sp.stop) if i >= 0]
        if hits:
            row.text, row.finish = row.text[: min(hits)], "stop"
        elif len(row.ids) >= sp.max_tokens:
            row.finish = "length"
    if row.on_delta is None:
        return
    end = len(row.text)
    if row.finish is None:  # hold back what could still become a stop string or a split character
        end -= max((len(s) - 1 for s in sp.stop), default=0)
        while end > row.sent and row.text[end - 1] == "\ufffd":
            end -= 1
    if end > row.sent:
        row.on_delta(row.text[row.sent : end])
        row.sent = end


@torch.no_grad()
def generate_rows(
    forward: Forward, tokenizer: Any, rows: list[_Row], eos: set[int], device: torch.device
) -> None:
    """Run `rows` to completion together: prefill, then one token per step for every unfinished row.

    forward(input_ids [b, t], attention_mask [b, T], position_ids [b, t], cache, active) -> logits [b, V],
    where `active` lists the indices (into `rows`) of the b rows still in the batch.
    """
    ids, mask = left_pad([r.req.prompt_ids for r in rows], tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: left padding must not shift positions
    cache = DynamicCache()
    active = list(range(len(rows)))
    logits = forward(ids, mask, pos, cache, active)
    while True:
        toks = _pick(logits, [rows[i] for i in active])
        for i, t in zip(active, toks, strict=True):
            _advance(rows[i], t, tokenizer, eos)
        keep = [j for j, i in enumerate(active) if rows[i].finish is None]
        if not keep:
            return
        if len(keep) < len(active):  # drop finished rows from the batch and the KV cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, pos = mask[sel], pos[sel]
            toks = [toks[j] for j in keep]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)  # [b, T+1]
        pos = pos[:, -1:] + 1  # [b, 1]
        logits = forward(torch.tensor(toks, device=device)[:, None], mask, pos, cache, active)


def _completion(row: _Row) -> Completion:
    key = row.req.adapter
    if not row.timing.finished:
        row.timing.finished = time.perf_counter()
    return Completion(
        row.text,
        row.ids,
        row.finish or "length",
        len(row.req.prompt_ids),
        len(row.ids),
        key.ref if key else "base",
        row.timing,
    )


# ---------------------------------------------------------------- the continuous batch


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """`n` zero columns before dim -2 of a [b, heads, len, dim] tensor, or before dim -1 of a [b, len] mask."""
    if n == 0:
        return t
    return F.pad(t, (n, 0)) if t.dim() == 2 else F.pad(t, (0, 0, n, 0))


def _kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, which must be plain (full attention) DynamicLayers: left padding would shift
    a sliding window, and other layer kinds keep state that splicing rows would not carry."""
    out = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise EngineError(f"continuous batching needs DynamicLayer caches, got {type(layer).__name__}")
        out.append(layer)
    return out


class _Batch:
    """The running rows of the continuous scheduler and their one batched KV cache.

    Row i's past is the last n_i columns of cache[i] (n_i: its prompt plus the tokens fed so far); the
    columns before are left padding, hidden by mask[i] ([b, len] of 0/1). Rows join by concatenation
    after left-padding the shorter side, and leave by index selection plus a trim of the columns that
    became padding for every remaining row."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def add(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        _kv_layers(cache)  # checks the layer types
        if self.cache is None or self.mask is None or not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        n1, n2 = self.mask.shape[1], mask.shape[1]
        n = max(n1, n2)
        for mine, new in zip(_kv_layers(self.cache), _kv_layers(cache), strict=True):
            assert mine.keys is not None and mine.values is not None
            assert new.keys is not None and new.values is not None
            mine.keys = torch.cat([_pad_left(mine.keys, n - n1), _pad_left(new.keys, n - n2)])
            mine.values = torch.cat([_pad_left(mine.values, n - n1), _pad_left(new.values, n - n2)])
        self.mask = torch.cat([_pad_left(self.mask, n - n1), _pad_left(mask, n - n2)])
        self.rows += rows

    def keep(self, idx: list[int]) -> None:
        """Keep rows `idx` (in order); drop the others' KV and the columns no kept row uses."""
        if len(idx) == len(self.rows):
            return
        if not idx or self.cache is None or self.mask is None:
            self.rows, self.cache, self.mask = [], None, None
            return
        sel = torch.tensor(idx, device=self.mask.device)
        self.cache.batch_select_indices(sel)
        self.mask = self.mask[sel]
        lead = int(self.mask.any(0).int().argmax())  # first column some kept row attends to
        if lead:
            for layer in _kv_layers(self.cache):
                assert layer.keys is not None and layer.values is not None
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]
        self.rows = [self.rows[i] for i in idx]


# ---------------------------------------------------------------- the engine


@dataclass
class _Pending:
    req: GenRequest
    future: Future[Completion]
    on_delta: Callable[[str], None] | None
    submitted: float = 0.0


def _settle(
    fut: Future[Completion], result: Completion | None = None, error: BaseException | None = None
) -> None:
    """Resolve `fut` unless it was cancelled meanwhile (the client went away)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass


class Engine:
    """Base model + resident adapters + a batching scheduler. Thread-safe `submit`."""

    def __init__(
        self,
        loaded: LoadedModel,
        registry_for: Callable[[str], Registry],
        params: EngineParams | None = None,
        forward_for: Callable[[list[AdapterKey | None]], Forward] | None = None,
    ) -> None:
        """Args:
        loaded: the base model (its modules get wrapped in place; do not share it with peft).
        registry_for: tenant id -> that tenant's Registry (adapters are read, never written).
        forward_for: replaces the gathered LoRA forward: the batch rows' adapters -> a Forward (see
            `generate_rows`). The benchmark passes peft's `adapter_names` path here; no slots are used.
        """
        self.loaded = loaded
        self.model = loaded.model.eval()
        self._cache_kwarg = cache_kwarg(self.model)
        self.tokenizer = loaded.tokenizer
        self.registry_for = registry_for
        self.params = params or EngineParams()
        self.forward_for = forward_for
        self._rows = _BatchRows()
        self._slots_set: tuple[tuple[int, ...], int] | None = None  # (slots, rows.version) last routed
        self._layers: dict[str, GatheredLoRALinear] = {}
        self._resident: OrderedDict[AdapterKey, int] = OrderedDict()  # LRU order: oldest first
        self._pinned: set[AdapterKey] = set()
        self._busy: set[int] = set()  # slots the continuous scheduler's running rows use: never evicted
        self._lock = threading.RLock()  # one batch / decode step (or one adapter load) at a time
        self._queue: queue.Queue[list[_Pending] | None] = queue.Queue()
        self._held: list[_Pending] = []  # gathered but deferred (too many distinct adapters)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.stats = {
            "loads": 0,
            "evictions": 0,
            "batches": 0,  # static: batches; continuous: prefill forwards
            "requests": 0,
            "max_batch_seen": 0,
            "steps": 0,  # decode steps of the continuous scheduler
            "cancelled": 0,
        }
        # called on the scheduler thread after every decode step with stats["steps"] (tests, tracing)
        self.step_hook: Callable[[int], None] | None = None
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.eos = {self.tokenizer.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos.discard(None)

    # -- adapters

    def resolve(self, tenant: str, record: AdapterRecord) -> AdapterKey:
        """The key of a registry record of `tenant`, after checking it was trained on this base model.

        Raises:
            ConflictError: the adapter belongs to another base model.
        """
        if record.base_fingerprint != self.loaded.fingerprint:
            raise ConflictError(
                f"adapter {record.ref} was trained on base {record.base_model!r} ({record.base_fingerprint}); "
                f"this server runs {self.loaded.name!r} ({self.loaded.fingerprint})",
                adapter=record.ref,
            )
        path = self.registry_for(tenant).path(record.name, record.version)
        return AdapterKey(tenant, record.name, record.version, path)

    def resident(self) -> list[AdapterKey]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def pin(self, key: AdapterKey) -> None:
        """Load `key` now and never evict it (until `unpin`)."""
        with self._lock:
            self._pinned.add(key)
            self._slot_for(key, set())

    def unpin(self, key: AdapterKey) -> None:
        with self._lock:
            self._pinned.discard(key)

    def _evictable(self, in_use: set[int]) -> AdapterKey | None:
        """The least recently used resident adapter that is neither pinned nor used by a row."""
        busy = in_use | self._busy
        return next((k for k, s in self._resident.items() if k not in self._pinned and s not in busy), None)

    def _slot_for(self, key: AdapterKey, in_use: set[int]) -> int:
        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        used = set(self._resident.values())
        free = [s for s in range(1, self.params.max_adapters + 1) if s not in used]
        if not free:
            victim = self._evictable(in_use)
            if victim is None:
                raise EngineError(
                    f"all {self.params.max_adapters} adapter slots are pinned or in use",
                    max_adapters=self.params.max_adapters,
                )
            free = [self._resident.pop(victim)]
            self.stats["evictions"] += 1
            log.info("evict adapter %s/%s from slot %d", victim.tenant, victim.ref, free[0])
        self._load(key, free[0])
        self._resident[key] = free[0]
        return free[0]

    def _load(self, key: AdapterKey, slot: int) -> None:
        try:
            weights = read_lora(key.path)
        except FileNotFoundError as e:  # deleted between routing and loading
            raise NotFoundError(
                f"adapter {key.ref} of tenant {key.tenant} is gone: {e}", adapter=key.ref
            ) from e
        except (OSError, ValueError, KeyError) as e:
            raise EngineError(f"loading adapter {key.ref} failed: {e}", adapter=key.ref) from e
        named = dict(self.model.named_modules())
        for module in weights:
            if module not in self._layers:
                self._wrap(module, named.get(module))
        for module, layer in self._layers.items():
            a, b = weights.get(module, (None, None))
            layer.set_slot(slot, a, b)
        self.stats["loads"] += 1
        log.info("load adapter %s/%s into slot %d (%d layers)", key.tenant, key.ref, slot, len(weights))

    def _wrap(self, name: str, module: nn.Module | None) -> None:
        if not isinstance(module, nn.Linear):
            raise EngineError(f"adapter targets {name!r}, which is not a Linear layer of the base model")
        parent_name, _, child = name.rpartition(".")
        layer = GatheredLoRALinear(module, self._rows, self.params.max_adapters + 1)
        setattr(self.model.get_submodule(parent_name), child, layer)
        self._layers[name] = layer

    # -- generation

    def _forward(self, slots: list[int]) -> Forward:
        all_slots = torch.tensor(slots, device=self.loaded.device)
        rows_now: list[int | None] = [None]  # how many rows the current slots describe (rows only drop)

        def forward(
            ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, active: list[int]
        ) -> torch.Tensor:
            if rows_now[0] != len(active):
                use = all_slots[active] if len(active) < len(slots) else all_slots
                self._rows.set(use if any(slots[i] for i in active) else None)  # all base: skip LoRA matmuls
                rows_now[0] = len(active)
            return self._model_logits(ids, mask, pos, cache)

        return forward

    def _model_logits(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        return out.logits[:, -1]  # [b, V]

    def generate(
        self,
        requests: Sequence[GenRequest],
        on_delta: Sequence[Callable[[str], None] | None] | None = None,
    ) -> list[Completion]:
        """Generate `requests` as one batch in the calling thread (mixed adapters allowed).

        Raises:
            EngineError: more distinct adapters than slots, or an adapter that cannot be served.
        """
        for r in requests:
            self._check(r)
        t0 = time.perf_counter()
        with self._lock:
            slots: list[int] = []
            in_use: set[int] = set()
            for r in requests:
                s = 0 if r.adapter is None or self.forward_for else self._slot_for(r.adapter, in_use)
                in_use.add(s)
                slots.append(s)
            rows = [
                _Row(r, s, _generator(r.sampling), (on_delta or [None] * len(requests))[i])
                for i, (r, s) in enumerate(zip(requests, slots, strict=True))
            ]
            now = time.perf_counter()
            for row in rows:
                row.timing.submitted, row.timing.admitted = t0, now
            fwd = (
                self.forward_for([r.adapter for r in requests]) if self.forward_for else self._forward(slots)
            )
            try:
                generate_rows(fwd, self.tokenizer, rows, self.eos, self.loaded.device)
            finally:
                self._rows.set(None)  # the model is the plain base model again outside a batch
            self.stats["batches"] += 1
            self.stats["requests"] += len(rows)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(rows))
        return [_completion(r) for r in rows]

    def _check(self, r: GenRequest) -> None:
        if r.sampling.max_tokens > self.params.max_tokens_limit:
            raise EngineError(
                f"max_tokens {r.sampling.max_tokens} is over this server's limit "
                f"{self.params.max_tokens_limit}",
                param="max_tokens",
            )
        if not r.prompt_ids:
            raise EngineError("the prompt is empty", param="prompt")
        r.prompt_ids = r.prompt_ids[-self.params.max_prompt_tokens :]

    # -- scheduler

    def submit(self, req: GenRequest, on_delta: Callable[[str], None] | None = None) -> Future[Completion]:
        """Queue one request. Thread-safe; `on_delta` runs on the engine thread.

        With the continuous scheduler the future stays pending until the request is done, so
        `future.cancel()` succeeds while it runs: its row leaves the batch before the next decode step."""
        return self.submit_n(req, 1, [on_delta])[0]

    def submit_n(
        self, req: GenRequest, n: int, on_delta: Sequence[Callable[[str], None] | None] | None = None
    ) -> list[Future[Completion]]:
        """Queue `n` completions of one prompt (OpenAI's `n`). They are queued together, so the continuous
        scheduler admits them in one step and prefills the prompt once; choice 0 samples with
        `req.sampling.seed`, choice i > 0 with a seed derived from it (or a random one)."""
        self._check(req)
        if not 1 <= n <= self.params.max_batch:
            raise EngineError(f"n={n} is outside 1-{self.params.max_batch} (max_batch)", param="n")
        now = time.perf_counter()
        items = []
        for i in range(n):
            r = req
            if i:
                seed = req.sampling.seed
                derived = None if seed is None else hash((seed, i)) & (2**63 - 1)
                r = GenRequest(req.prompt_ids, req.adapter, req.sampling.model_copy(update={"seed": derived}))
            items.append(_Pending(r, Future(), (on_delta or [None] * n)[i], now))
        self._queue.put(items)
        self.start()
        return [p.future for p in items]

    def start(self) -> None:
        with self._start_lock:  # not self._lock: that one is held for a whole batch
            if self._thread is None or not self._thread.is_alive():
                target = self._serve_static if self.params.scheduler == "static" else self._serve_continuous
                self._thread = threading.Thread(target=target, name="cltune-engine", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler after the running rows (continuous) or the current batch (static) finish;
        queued requests fail. A later `submit` starts it again (with the scheduler `params` name then)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _fail_queued(self) -> None:
        while not self._queue.empty():
            left = self._queue.get_nowait()
            for p in left or []:
                _settle(p.future, error=EngineError("the engine was closed"))

    # -- the continuous scheduler

    def _take(self, waiting: deque[_Pending], idle: bool) -> bool:
        """Move submitted requests into `waiting`. When idle, block for a first one and collect more for
        up to max_wait_ms (their prefills are batched). Returns True once `close` was called."""
        try:
            if idle:
                item = self._queue.get()
                if item is None:
                    return True
                waiting.extend(item)
                deadline = time.monotonic() + self.params.max_wait_ms / 1000
                while len(waiting) < self.params.max_batch:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    if item is None:
                        return True
                    waiting.extend(item)
            while True:
                item = self._queue.get_nowait()
                if item is None:
                    return True
                waiting.extend(item)
        except queue.Empty:
            return False

    def _admit(self, waiting: deque[_Pending], batch: _Batch) -> list[_Row]:
        """Take waiting requests (first come, first served) while the batch has room; load their adapters.

        A request whose adapter finds no slot waits while running rows hold every evictable slot; the
        least recently used of those adapters then takes no new rows (it drains), so the waiter gets a
        slot within one generation. A request that can never get a slot (all pinned), or that is
        invalid, or whose adapter fails to load, fails alone."""
        room = self.params.max_batch - len(batch.rows)
        in_use = {r.slot for r in batch.rows}
        draining: set[AdapterKey] = set()
        new: list[_Row] = []
        still: deque[_Pending] = deque()
        while waiting:
            p = waiting.popleft()
            key = p.req.adapter
            if room <= 0 or (key is not None and key in draining):
                still.append(p)
                continue
            try:
                self._check(p.req)
                # e.g. a seed the generator refuses (SamplingParams built without validation)
                gen = _generator(p.req.sampling)
                if key is None or self.forward_for is not None:
                    slot = 0
                elif (
                    key in self._resident
                    or len(self._resident) < self.params.max_adapters
                    or self._evictable(in_use) is not None
                ):
                    slot = self._slot_for(key, in_use)
                elif any(k not in self._pinned for k in self._resident):  # every such slot is in use: wait
                    victim = next(
                        (k for k in self._resident if k not in self._pinned and k not in draining), None
                    )
                    if victim is not None:
                        draining.add(victim)
                    still.append(p)
                    continue
                else:
                    raise EngineError(
                        f"all {self.params.max_adapters} adapter slots are pinned",
                        max_adapters=self.params.max_adapters,
                    )
            except Exception as e:  # noqa: BLE001 - e.g. a deleted or unservable adapter: this request fails
                _settle(p.future, error=e)
                continue
            row = _Row(p.req, slot, gen, p.on_delta, future=p.future)
            row.timing.submitted, row.timing.admitted = p.submitted, time.perf_counter()
            row.timing.admitted_step = self.stats["steps"]
            new.append(row)
            in_use.add(slot)
            room -= 1
        waiting.extend(still)
        return new

    def _route(self, rows: list[_Row]) -> None:
        """Point the gathered LoRA layers at these rows' slots (only when they changed)."""
        slots = tuple(r.slot for r in rows)
        if self._slots_set != (slots, self._rows.version):
            self._rows.set(torch.tensor(slots, device=self.loaded.device) if any(slots) else None)
            self._slots_set = (slots, self._rows.version)

    def _step(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, rows: list[_Row]
    ) -> torch.Tensor:
        if self.forward_for is not None:
            fwd = self.forward_for([r.req.adapter for r in rows])
            return fwd(ids, mask, pos, cache, list(range(len(rows))))
        self._route(rows)
        return self._model_logits(ids, mask, pos, cache)

    def _advance_row(self, row: _Row, tok: int) -> None:
        row.last = tok
        try:
            _advance(row, tok, self.tokenizer, self.eos)
        except Exception as e:  # noqa: BLE001 - e.g. the client's on_delta raised: this row fails alone
            row.error = e

    @torch.no_grad()
    def _prefill(self, batch: _Batch, new: list[_Row]) -> None:
        """Prefill `new` rows together (left-padded; identical prompt + slot share a row), pick their first
        tokens and add them to the batch. If the forward fails, each distinct prompt is retried alone so
        that only the request that fails gets the error (nothing was streamed yet)."""
        uniq: dict[tuple[tuple[int, ...], int], int] = {}
        idx = [uniq.setdefault((tuple(r.req.prompt_ids), r.slot), len(uniq)) for r in new]
        firsts = [new[idx.index(u)] for u in range(len(uniq))]
        device = self.loaded.device
        try:
            ids, mask = left_pad([r.req.prompt_ids for r in firsts], self.tokenizer.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, T]: left padding must not shift positions
            cache = DynamicCache()
            logits = self._step(ids, mask, pos, cache, firsts)
        except Exception as e:  # noqa: BLE001 - a request's own failure (e.g. a token id outside the vocabulary)
            if len(firsts) > 1:
                for u in range(len(firsts)):
                    self._prefill(batch, [r for r, i in zip(new, idx, strict=True) if i == u])
            else:
                log.warning("prefill of %d request(s) failed: %s", len(new), e)
                for r in new:
                    _settle(r.future, error=e)  # type: ignore[arg-type]
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(new)
        if len(firsts) < len(new):  # copy the shared prefills' KV to every row that asked for them
            sel = torch.tensor(idx, device=device)
            cache.batch_select_indices(sel)
            mask, logits = mask[sel], logits[sel]
        for r, t in zip(new, _pick(logits, new), strict=True):
            r.pos = len(r.req.prompt_ids)
            self._advance_row(r, t)
        batch.add(new, cache, mask)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch.rows))

    @torch.no_grad()
    def _decode(self, batch: _Batch) -> None:
        """One decode step for every running row."""
        assert batch.mask is not None
        rows, device = batch.rows, self.loaded.device
        ids = torch.tensor([[r.last] for r in rows], device=device)
        pos = torch.tensor([[r.pos] for r in rows], device=device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], 1)
        logits = self._step(ids, batch.mask, pos, batch.cache, rows)
        self.stats["steps"] += 1
        for r, t in zip(rows, _pick(logits, rows), strict=True):
            r.pos += 1
            self._advance_row(r, t)

    def _retire(self, batch: _Batch) -> None:
        """Resolve and drop finished, failed and cancelled rows."""
        keep = []
        for i, r in enumerate(batch.rows):
            assert r.future is not None
            if r.future.cancelled():
                self.stats["cancelled"] += 1
            elif r.error is not None:
                _settle(r.future, error=r.error)
            elif r.finish is not None:
                r.timing.finished_step = self.stats["steps"]
                _settle(r.future, _completion(r))
            else:
                keep.append(i)
        batch.keep(keep)

    def _serve_continuous(self) -> None:
        waiting: deque[_Pending] = deque()
        batch = _Batch()
        closing = False
        while True:
            if not closing:
                closing = self._take(waiting, idle=not batch.rows and not waiting)
            for p in [p for p in waiting if p.future.cancelled()]:
                waiting.remove(p)
                self.stats["cancelled"] += 1
            if closing:
                while waiting:
                    _settle(waiting.popleft().future, error=EngineError("the engine was closed"))
                if not batch.rows:
                    break
            with self._lock:
                new: list[_Row] = []
                try:
                    if waiting:
                        new = self._admit(waiting, batch)
                        if new:
                            self._prefill(batch, new)
                    self._retire(batch)  # finished at their first token, or cancelled: leave before the step
                    if batch.rows:
                        self._decode(batch)
                        self._retire(batch)
                except Exception as e:  # noqa: BLE001 - the running rows get the error; the engine keeps serving
                    log.exception("scheduler step with %d rows failed", len(batch.rows))
                    for r in batch.rows + new:  # (a row already resolved stays as it is)
                        _settle(r.future, error=e)  # type: ignore[arg-type]
                    batch = _Batch()
                self._busy = {r.slot for r in batch.rows} - {0}
                if not batch.rows:
                    self._rows.set(None)  # the plain base model again while idle
            if self.step_hook is not None and batch.rows:
                self.step_hook(self.stats["steps"])
        self._fail_queued()

    # -- the static scheduler

    def _gather(self) -> list[_Pending] | None:
        """Block for a first request, then collect more until max_batch or max_wait_ms."""
        batch, self._held = self._held, []
        if not batch:
            first = self._queue.get()
            if first is None:
                return None
            batch = list(first)
        deadline = time.monotonic() + self.params.max_wait_ms / 1000
        while len(batch) < self.params.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # stop after this batch
                break
            batch += nxt
        self._held, batch = batch[self.params.max_batch :], batch[: self.params.max_batch]
        # at most max_adapters distinct adapters per batch (minus pinned slots not in it); defer the rest
        room = self.params.max_adapters - len(
            [k for k in self._pinned if k not in {p.req.adapter for p in batch}]
        )
        seen: set[AdapterKey] = set()
        keep = []
        for p in batch:
            k = p.req.adapter
            if k is None or k in seen or len(seen) < max(room, 1):
                if k is not None:
                    seen.add(k)
                keep.append(p)
            else:
                self._held.append(p)
        return keep

    def _load_all(self, batch: list[_Pending]) -> list[_Pending]:
        """Check every request and make every adapter of the batch resident; a request that is invalid
        or whose adapter fails to load fails alone."""
        ok, in_use = [], {0}
        for p in batch:
            try:
                self._check(p.req)
                _generator(p.req.sampling)  # e.g. a seed the generator refuses (built without validation)
                if p.req.adapter is not None and self.forward_for is None:
                    in_use.add(self._slot_for(p.req.adapter, in_use))
                ok.append(p)
            except Exception as e:  # noqa: BLE001 - e.g. a deleted or unservable adapter
                p.future.set_exception(e)
        return ok

    def _one_by_one(self, batch: list[_Pending], streamed: list[bool], error: Exception) -> None:
        """After a failed batch, run each request alone so that only the one that fails gets the error
        (a request that already streamed text cannot be started again: it gets the batch's error)."""
        for p, sent in zip(batch, streamed, strict=True):
            if sent or len(batch) == 1:
                p.future.set_exception(error)
                continue
            try:
                p.future.set_result(self.generate([p.req], [p.on_delta])[0])
            except Exception as e:  # noqa: BLE001 - this request's own failure
                p.future.set_exception(e)

    def _serve_static(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                break
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            with self._lock:
                batch = self._load_all(batch)
                if not batch:
                    continue
                streamed = [False] * len(batch)
                try:
                    outs = self.generate(
                        [p.req for p in batch], [_tracked(p, streamed, i) for i, p in enumerate(batch)]
                    )
                except Exception as e:  # noqa: BLE001 - the requests get the error; the engine keeps serving
                    log.exception("batch of %d failed", len(batch))
                    self._one_by_one(batch, streamed, e)
                    continue
            for p, out in zip(batch, outs, strict=True):
                out.timing.submitted = p.submitted
                p.future.set_result(out)
        self._fail_queued()


def _tracked(p: _Pending, streamed: list[bool], i: int) -> Callable[[str], None] | None:
    """`p.on_delta`, noting in `streamed[i]` that the request has sent text."""
    if p.on_delta is None:
        return None
    on_delta = p.on_delta

    def call(d: str) -> None:
        streamed[i] = True
        on_delta(d)

    return call


def _generator(sp: SamplingParams) -> torch.Generator | None:
    if sp.temperature == 0.0:
        return None
    seed = sp.seed if sp.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(seed)
