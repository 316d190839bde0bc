"""Decoding: one row per request, the next token per row, and the batched KV cache of running rows.

`Row` is one request being generated (its tokens, text, streaming position and finish). `pick` chooses
the next token of every row from one forward's logits (greedy or seeded top-p sampling), `advance` appends
it and applies EOS, stop strings and max_tokens, streaming the part of the text that can no longer
change. `generate_rows` runs a fixed set of rows to completion (the static scheduler and
`Engine.generate`). `Batch` holds the continuous scheduler's running rows and their one `DynamicCache`,
spliced as rows join (left-padded to a common length and concatenated) and leave (index selection plus a
trim of the columns that became padding for every remaining row). Each row keeps its own position ids
and an attention mask that hides its padding, which is why a row gives exactly the greedy tokens it
gives alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cltune.data import left_pad
from cltune.errors import EngineError
from service.inference.params import Completion, FinishReason, GenRequest, SamplingParams, Timing


@dataclass
class Row:
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


def pick(logits: torch.Tensor, rows: list[Row]) -> list[int]:
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


def advance(row: Row, tok: int, tokenizer: Any, eos: set[int]) -> None:
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
    forward: Forward, tokenizer: Any, rows: list[Row], eos: set[int], device: torch.device
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
        toks = pick(logits, [rows[i] for i in active])
        for i, t in zip(active, toks, strict=True):
            advance(rows[i], t, tokenizer, eos)
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


def completion(row: Row) -> Completion:
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


class Batch:
    """The running rows of the continuous scheduler and their one batched KV cache.

    Row i's past is the last n_i columns of cache[i] (n_i: its prompt plus the tokens fed so far); the
    columns before are left padding, hidden by mask[i] ([b, len] of 0/1). Rows join by concatenation
    after left-padding the shorter side, and leave by index selection plus a trim of the columns that
    became padding for every remaining row."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def add(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
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


def generator_for(sp: SamplingParams) -> torch.Generator | None:
    """The row's sampling generator: None for greedy, else seeded by `sp.seed` (or a random seed)."""
    if sp.temperature == 0.0:
        return None
    seed = sp.seed if sp.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(seed)
