"""The inference engine: the base model loaded once, many LoRA adapters resident at once, and requests
for different adapters generated together in one batch.

A mixed batch runs through the gathered LoRA layers (`lora.py`): each row picks its adapter's weights by
slot id, slot 0 being the base model. Adapters are loaded from the tenant's registry on first use and
evicted least-recently-used (`slots.py`; pinned ones stay, and so do adapters that a running row uses).

Scheduling (`EngineParams.scheduler`). The default, "continuous", batches at the granularity of one
decode step: every iteration of the scheduler thread (1) admits waiting requests up to `max_batch`
rows, loading their adapters into slots (a request whose adapter finds no slot that no running row
uses waits, and the least recently used adapter stops taking new rows until it drains, so the waiter
cannot starve), (2) prefills the admitted prompts together (left-padded; identical prompt + adapter
pairs, e.g. the `n` choices of `submit_n`, share one prefill row), (3) runs ONE decode step for all
running rows and (4) retires finished rows at once (EOS, stop string, max_tokens, cancelled future),
resolving their futures. The running rows share one batched KV cache (`decode.Batch`), as long as the
longest running row, not the longest row ever seen. `Future.cancel()` works until the request finishes
(futures stay pending while they run): the row leaves the batch before the next step. When the engine
is idle, the first request waits up to `max_wait_ms` for company (their prefills are batched); once
running, new requests join at the next step. The "static" scheduler (the previous one, kept for
comparison) gathers a batch the same way and runs it to completion before admitting anything else
(`decode.generate_rows`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from cltune.data import left_pad
from cltune.errors import ConflictError, EngineError
from cltune.models import LoadedModel, cache_kwarg
from cltune.registry import AdapterRecord, Registry
from service.inference.decode import (
    Batch,
    Forward,
    Row,
    advance,
    completion,
    generate_rows,
    generator_for,
    pick,
)
from service.inference.params import AdapterKey, Completion, EngineParams, GenRequest
from service.inference.slots import AdapterSlots

log = logging.getLogger("cltune.engine")


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
        self.model = loaded.model.eval()  # type: ignore[no-untyped-call]  # unannotated in transformers
        self._cache_kwarg = cache_kwarg(self.model)
        self.tokenizer = loaded.tokenizer
        self.registry_for = registry_for
        self.params = params or EngineParams()
        self.forward_for = forward_for
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
        self._slots = AdapterSlots(self.model, self.params.max_adapters, self.stats)
        self._routed: tuple[tuple[int, ...], int] | None = None  # (slots, rows.version) last routed
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
            return list(self._slots.resident)

    def pin(self, key: AdapterKey) -> None:
        """Load `key` now and never evict it (until `unpin`)."""
        with self._lock:
            self._slots.pinned.add(key)
            self._slots.slot_for(key, set())

    def unpin(self, key: AdapterKey) -> None:
        with self._lock:
            self._slots.pinned.discard(key)

    # -- generation

    def _forward(self, slots: list[int]) -> Forward:
        all_slots = torch.tensor(slots, device=self.loaded.device)
        rows_now: list[int | None] = [None]  # how many rows the current slots describe (rows only drop)

        def forward(
            ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, active: list[int]
        ) -> torch.Tensor:
            if rows_now[0] != len(active):
                use = all_slots[active] if len(active) < len(slots) else all_slots
                # all base: skip the LoRA matmuls
                self._slots.rows.set(use if any(slots[i] for i in active) else None)
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
        logits: torch.Tensor = out.logits[:, -1]  # [b, V]
        return logits

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
                s = 0 if r.adapter is None or self.forward_for else self._slots.slot_for(r.adapter, in_use)
                in_use.add(s)
                slots.append(s)
            rows = [
                Row(r, s, generator_for(r.sampling), (on_delta or [None] * len(requests))[i])
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
                self._slots.rows.set(None)  # the model is the plain base model again outside a batch
            self.stats["batches"] += 1
            self.stats["requests"] += len(rows)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(rows))
        return [completion(r) for r in rows]

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

    def _admit(self, waiting: deque[_Pending], batch: Batch) -> list[Row]:
        """Take waiting requests (first come, first served) while the batch has room; load their adapters.

        A request whose adapter finds no slot waits while running rows hold every evictable slot; the
        least recently used of those adapters then takes no new rows (it drains), so the waiter gets a
        slot within one generation. A request that can never get a slot (all pinned), or that is
        invalid, or whose adapter fails to load, fails alone."""
        room, slots = self.params.max_batch - len(batch.rows), self._slots
        in_use = {r.slot for r in batch.rows}
        draining: set[AdapterKey] = set()
        new: list[Row] = []
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
                gen = generator_for(p.req.sampling)
                if key is None or self.forward_for is not None:
                    slot = 0
                elif (
                    key in slots.resident
                    or len(slots.resident) < self.params.max_adapters
                    or slots.evictable(in_use) is not None
                ):
                    slot = slots.slot_for(key, in_use)
                elif any(k not in slots.pinned for k in slots.resident):  # every such slot is in use: wait
                    victim = next(
                        (k for k in slots.resident if k not in slots.pinned and k not in draining), None
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
            row = Row(p.req, slot, gen, p.on_delta, future=p.future)
            row.timing.submitted, row.timing.admitted = p.submitted, time.perf_counter()
            row.timing.admitted_step = self.stats["steps"]
            new.append(row)
            in_use.add(slot)
            room -= 1
        waiting.extend(still)
        return new

    def _route(self, rows: list[Row]) -> None:
        """Point the gathered LoRA layers at these rows' slots (only when they changed)."""
        slots = tuple(r.slot for r in rows)
        if self._routed != (slots, self._slots.rows.version):
            self._slots.rows.set(torch.tensor(slots, device=self.loaded.device) if any(slots) else None)
            self._routed = (slots, self._slots.rows.version)

    def _step(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, rows: list[Row]
    ) -> torch.Tensor:
        if self.forward_for is not None:
            fwd = self.forward_for([r.req.adapter for r in rows])
            return fwd(ids, mask, pos, cache, list(range(len(rows))))
        self._route(rows)
        return self._model_logits(ids, mask, pos, cache)

    def _advance_row(self, row: Row, tok: int) -> None:
        row.last = tok
        try:
            advance(row, tok, self.tokenizer, self.eos)
        except Exception as e:  # noqa: BLE001 - e.g. the client's on_delta raised: this row fails alone
            row.error = e

    @torch.no_grad()
    def _prefill(self, batch: Batch, new: list[Row]) -> None:
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
        for r, t in zip(new, pick(logits, new), strict=True):
            r.pos = len(r.req.prompt_ids)
            self._advance_row(r, t)
        batch.add(new, cache, mask)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch.rows))

    @torch.no_grad()
    def _decode(self, batch: Batch) -> None:
        """One decode step for every running row."""
        assert batch.mask is not None
        rows, device = batch.rows, self.loaded.device
        ids = torch.tensor([[r.last] for r in rows], device=device)
        pos = torch.tensor([[r.pos] for r in rows], device=device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], 1)
        logits = self._step(ids, batch.mask, pos, batch.cache, rows)
        self.stats["steps"] += 1
        for r, t in zip(rows, pick(logits, rows), strict=True):
            r.pos += 1
            self._advance_row(r, t)

    def _retire(self, batch: Batch) -> None:
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
                _settle(r.future, completion(r))
            else:
                keep.append(i)
        batch.keep(keep)

    def _serve_continuous(self) -> None:
        waiting: deque[_Pending] = deque()
        batch = Batch()
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
                new: list[Row] = []
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
                    batch = Batch()
                self._slots.busy = {r.slot for r in batch.rows} - {0}
                if not batch.rows:
                    self._slots.rows.set(None)  # the plain base model again while idle
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
            [k for k in self._slots.pinned if k not in {p.req.adapter for p in batch}]
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
                generator_for(p.req.sampling)  # e.g. a seed the generator refuses (built without validation)
                if p.req.adapter is not None and self.forward_for is None:
                    in_use.add(self._slots.slot_for(p.req.adapter, in_use))
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
