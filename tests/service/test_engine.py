"""Inference engine: mixed-adapter batches give each request's own greedy tokens (gathered forward vs
one-by-one vs peft's `adapter_names` reference), LRU eviction + reload, pinning, sampling, streaming;
continuous batching: requests join the running batch at the next step and leave it at once, staggered
arrivals of mixed adapters and prompt lengths keep each request's tokens, cancellation frees the row and
its adapter slot, `n` choices share a prefill."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from cltune.config import ModelConfig
from cltune.errors import ConflictError, NotFoundError
from cltune.models import LoadedModel, build_tiny_llama, load_model
from cltune.registry import Registry
from service.api.routes.openai import Answer, _stream
from service.inference import Completion, Engine, EngineError, EngineParams, GenRequest, SamplingParams

from .api_support import make_adapters

TENANT = "t_test"


def tiny() -> LoadedModel:
    return load_model(ModelConfig(name="tiny-llama", device="cpu"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("engine") / TENANT)
    make_adapters(reg, ["ad0", "ad1", "ad2", "ad3"])
    return reg


def make_engine(registry: Registry, **params: object) -> Engine:
    return Engine(
        tiny(),
        lambda tenant: registry if tenant == TENANT else Registry(Path("/nonexistent")),
        EngineParams(**params),
    )  # type: ignore[arg-type]


PROMPTS = ["hello there", "the cat", "abc", "a longer prompt than the others", "xyz", "q"]


def requests(engine: Engine, registry: Registry, adapters: list[str | None], n: int = 12) -> list[GenRequest]:
    keys = {a: engine.resolve(TENANT, registry.get(a)) for a in adapters if a}
    tok = engine.tokenizer
    return [
        GenRequest(
            tok(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)["input_ids"],
            keys[a] if a else None,
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
        )
        for i, a in enumerate(adapters)
    ]


def test_mixed_batch_gives_each_request_its_own_greedy_tokens(registry: Registry) -> None:
    engine = make_engine(registry)
    adapters = ["ad0", "ad1", None, "ad2", "ad3", "ad1"]
    reqs = requests(engine, registry, adapters)
    batched = [c.token_ids for c in engine.generate(reqs)]
    alone = [engine.generate([r])[0].token_ids for r in reqs]
    assert batched == alone
    assert len({tuple(t) for t in batched}) >= 5  # the adapters really change the output

    # peft's own mixed-adapter path (adapter_names=) is the reference
    base = build_tiny_llama(0)[0].eval()
    base.generation_config.eos_token_id = None  # like ignore_eos: never stop early
    pm = PeftModel.from_pretrained(base, str(registry.path("ad0")), adapter_name="ad0")
    for name in ("ad1", "ad2", "ad3"):
        pm.load_adapter(str(registry.path(name)), adapter_name=name)
    for i, (r, a) in enumerate(zip(reqs, adapters, strict=True)):
        ids = torch.tensor([r.prompt_ids])
        out = pm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            adapter_names=[a or "__base__"],
            pad_token_id=0,
        )
        assert out[0, ids.shape[1] :].tolist() == batched[i], f"request {i} ({a}) differs from peft"


def test_base_rows_in_a_mixed_batch_match_the_untouched_base_model(registry: Registry) -> None:
    engine = make_engine(registry)
    reqs = requests(engine, registry, [None, "ad1", None])
    got = engine.generate(reqs)
    ref = build_tiny_llama(0)[0].eval()
    ref.generation_config.eos_token_id = None
    ids = torch.tensor([reqs[0].prompt_ids])
    out = ref.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert got[0].token_ids == out[0, ids.shape[1] :].tolist() and got[0].adapter == "base"


def test_least_recently_used_adapter_is_evicted_and_reloaded_with_the_same_output(registry: Registry) -> None:
    engine = make_engine(registry, max_adapters=2)
    first = engine.generate(requests(engine, registry, ["ad0"]))[0].token_ids
    engine.generate(requests(engine, registry, ["ad1"]))
    engine.generate(requests(engine, registry, ["ad0"]))  # ad0 becomes the most recently used
    engine.generate(requests(engine, registry, ["ad2"]))  # evicts ad1, the least recently used
    assert [k.name for k in engine.resident()] == ["ad0", "ad2"]
    assert engine.stats["evictions"] == 1 and engine.stats["loads"] == 3
    again = engine.generate(requests(engine, registry, ["ad0", "ad1"]))  # ad0 hit; reload ad1, evicting ad2
    assert engine.stats["loads"] == 4 and [k.name for k in engine.resident()] == ["ad0", "ad1"]
    assert again[0].token_ids == first


def test_pinned_adapters_are_never_evicted_and_too_many_distinct_adapters_fail(registry: Registry) -> None:
    engine = make_engine(registry, max_adapters=2)
    pinned = engine.resolve(TENANT, registry.get("ad3"))
    engine.pin(pinned)
    for name in ("ad0", "ad1", "ad2"):
        engine.generate(requests(engine, registry, [name]))
    assert pinned in engine.resident()
    with pytest.raises(EngineError):
        engine.generate(requests(engine, registry, ["ad0", "ad1"]))  # one free slot, two adapters


def test_sampling_is_reproducible_by_seed_and_stop_strings_cut_the_text(registry: Registry) -> None:
    engine = make_engine(registry)
    tok = engine.tokenizer
    ids = tok("hello", add_special_tokens=False)["input_ids"]

    def run(seed: int, **kw: object) -> str:
        sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True, **kw)  # type: ignore[arg-type]
        return engine.generate([GenRequest(ids, None, sp)])[0].text

    assert run(1) == run(1)
    assert run(1) != run(2)
    full = run(3)
    stop = full[3:5]
    cut = engine.generate(
        [
            GenRequest(
                ids,
                None,
                SamplingParams(
                    max_tokens=20, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True, stop=[stop]
                ),
            )
        ]
    )[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_the_smallest_temperature_and_top_p_sample_the_greedy_token(registry: Registry) -> None:
    """Found by schemathesis: top_p=5e-324 kept no token (it is 0 in float32) and a temperature that
    small made the probabilities NaN; both failed the batch with a 500."""
    engine = make_engine(registry)
    ids = engine.tokenizer("hello", add_special_tokens=False)["input_ids"]

    def run(**kw: float) -> str:
        sp = SamplingParams(max_tokens=8, seed=1, ignore_eos=True, **kw)  # type: ignore[arg-type]
        return engine.generate([GenRequest(ids, None, sp)])[0].text

    greedy = run(temperature=0.0)
    assert run(top_p=5e-324) == greedy and run(temperature=5e-324) == greedy
    assert run(temperature=5e-324, top_p=5e-324) == greedy


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_concurrent_submissions_are_batched_and_streamed(registry: Registry, scheduler: str) -> None:
    engine = make_engine(registry, max_batch=8, max_wait_ms=200, scheduler=scheduler)
    adapters = ["ad0", "ad1", "ad2", None, "ad3", "ad0"]
    reqs = requests(engine, registry, adapters)
    alone = [engine.generate([r])[0] for r in reqs]
    deltas: list[list[str]] = [[] for _ in reqs]
    barrier = threading.Barrier(len(reqs))
    futures: list[object] = [None] * len(reqs)

    def client(i: int) -> None:
        barrier.wait()
        futures[i] = engine.submit(reqs[i], deltas[i].append)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [f.result(timeout=60) for f in futures]  # type: ignore[attr-defined]
    engine.close()
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert ["".join(d) for d in deltas] == [o.text for o in outs]
    assert engine.stats["max_batch_seen"] > 1


def test_adapters_of_another_base_model_are_refused(registry: Registry) -> None:
    engine = make_engine(registry)
    record = registry.get("ad0").model_copy(update={"base_fingerprint": "tiny-llama:other"})
    with pytest.raises(ConflictError):
        engine.resolve(TENANT, record)


def test_a_request_whose_adapter_cannot_load_fails_alone(registry: Registry, tmp_path: Path) -> None:
    engine = make_engine(registry)
    good, bad = requests(engine, registry, ["ad0", "ad1"])
    bad.adapter = dataclasses.replace(bad.adapter, name="gone", path=tmp_path / "missing")  # type: ignore[arg-type]
    fut_bad, fut_good = engine.submit(bad), engine.submit(good)
    assert fut_good.result(timeout=60).token_ids == engine.generate([good])[0].token_ids
    with pytest.raises(NotFoundError):
        fut_bad.result(timeout=60)
    engine.close()


@pytest.mark.parametrize("bad_part", ["seed", "token"])
def test_a_request_that_fails_in_the_batch_fails_alone(registry: Registry, bad_part: str) -> None:
    """One bad request (a seed no generator takes, caught before the batch; a token id outside the
    vocabulary, which fails the batch's forward) must not fail the others batched with it."""
    engine = make_engine(registry, max_batch=8, max_wait_ms=300)
    good = requests(engine, registry, ["ad0", None, "ad1"])
    alone = [engine.generate([r])[0].token_ids for r in good]
    if bad_part == "seed":
        sampling = {**good[0].sampling.model_dump(), "temperature": 0.7, "seed": 2**64}
        bad = dataclasses.replace(good[0], sampling=SamplingParams.model_construct(**sampling))
    else:
        bad = dataclasses.replace(good[0], prompt_ids=[10**7])
    futures = [engine.submit(good[0]), engine.submit(bad), engine.submit(good[1]), engine.submit(good[2])]
    outs = [futures[i].result(timeout=60).token_ids for i in (0, 2, 3)]
    with pytest.raises(Exception, match="seed|[Oo]verflow|index"):
        futures[1].result(timeout=60)
    engine.close()
    assert outs == alone


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, -(2**63) - 1])
def test_sampling_seeds_are_bounded(seed: int) -> None:
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(temperature=0.7, seed=seed)
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1


# ---------------------------------------------------------------- continuous batching


def greedy(tok: object, text: str, key: object, n: int, **kw: object) -> GenRequest:
    ids = tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return GenRequest(ids, key, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw))  # type: ignore[arg-type]


def staggered(
    engine: Engine, at: dict[int, list[GenRequest]], on_delta: dict[int, Callable[[str], None]] | None = None
) -> list[Future[Completion]]:
    """Submit at[0] now and at[s] right after decode step s (from the scheduler thread: deterministic).
    Returns the futures in the order of `at`'s requests; on_delta[i] streams the i-th one."""
    order = [r for s in sorted(at) for r in at[s]]
    futures: dict[int, Future[Completion]] = {}
    on_delta = on_delta or {}

    def submit(s: int) -> None:
        for r in at.get(s, []):
            i = next(i for i, o in enumerate(order) if o is r)
            futures[i] = engine.submit(r, on_delta.get(i))

    engine.step_hook = submit
    submit(0)
    for _ in range(600):  # every request submitted (the hook runs while rows are running)
        if len(futures) == len(order):
            break
        time.sleep(0.05)
    assert len(futures) == len(order), f"submitted {sorted(futures)} of {len(order)}"
    return [futures[i] for i in range(len(order))]


def peft_greedy(registry: Registry, reqs: list[GenRequest], adapters: list[str | None]) -> list[list[int]]:
    """Each request alone through peft's own generate (adapter_names=), the reference."""
    base = build_tiny_llama(0)[0].eval()
    base.generation_config.eos_token_id = None  # like ignore_eos: never stop early
    pm = PeftModel.from_pretrained(base, str(registry.path("ad0")), adapter_name="ad0")
    for name in ("ad1", "ad2", "ad3"):
        pm.load_adapter(str(registry.path(name)), adapter_name=name)
    out = []
    for r, a in zip(reqs, adapters, strict=True):
        ids = torch.tensor([r.prompt_ids])
        gen = pm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=r.sampling.max_tokens,
            do_sample=False,
            adapter_names=[a or "__base__"],
            pad_token_id=0,
        )
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def test_a_request_submitted_mid_generation_joins_the_running_batch(registry: Registry) -> None:
    engine = make_engine(registry)
    key = engine.resolve(TENANT, registry.get("ad0"))
    first, second = greedy(engine.tokenizer, "hello there", key, 60), greedy(engine.tokenizer, "q", None, 8)
    fa, fb = staggered(engine, {0: [first], 5: [second]})
    a, b = fa.result(timeout=120), fb.result(timeout=120)
    engine.close()
    # the second starts right after step 5 (not after the first's 60 tokens) and leaves after its own 8
    assert a.timing.admitted_step == 0 and a.timing.finished_step == 59
    assert b.timing.admitted_step == 5 and b.timing.finished_step == 5 + 8 - 1
    assert b.timing.first_token < a.timing.finished and engine.stats["max_batch_seen"] == 2
    assert engine.stats["steps"] == 59  # one decode step per token for both rows together
    assert [a.token_ids, b.token_ids] == [engine.generate([r])[0].token_ids for r in (first, second)]


def test_a_long_request_does_not_delay_a_short_ones_completion(registry: Registry) -> None:
    engine = make_engine(registry)
    long, short = greedy(engine.tokenizer, "abc", None, 400), greedy(engine.tokenizer, "the cat", None, 5)
    fl, fs = staggered(engine, {0: [long], 2: [short]})
    long_done_when_short_done: list[bool] = []
    fs.add_done_callback(lambda _: long_done_when_short_done.append(fl.done()))
    s, lg = fs.result(timeout=120), fl.result(timeout=300)
    engine.close()
    assert long_done_when_short_done == [False]
    assert s.timing.finished_step - s.timing.admitted_step == 4  # its own 5 tokens: prefill + 4 steps
    assert s.timing.finished < lg.timing.first_token + 0.5 * (lg.timing.finished - lg.timing.first_token)
    assert s.token_ids == engine.generate([short])[0].token_ids and len(lg.token_ids) == 400


def test_staggered_mixed_adapters_and_prompt_lengths_match_alone_and_peft(registry: Registry) -> None:
    """Rows with prompts of 1 to 180 tokens, six adapters (and the base model) and different lengths join
    a running batch at different steps, some while others leave: each gets exactly its own greedy tokens."""
    engine = make_engine(registry, max_batch=8)
    tok = engine.tokenizer
    keys = {a: engine.resolve(TENANT, registry.get(a)) for a in ("ad0", "ad1", "ad2", "ad3")}
    long_text = (
        "a much longer prompt that makes this row's cache far longer than the others " * 2
    )  # 152 bytes
    plan: dict[int, list[tuple[str, str | None, int]]] = {
        0: [("q", "ad0", 30), ("hello there", None, 6)],
        3: [(long_text, "ad1", 12)],  # longer than the running rows: they are padded to it
        4: [("xyz", "ad2", 20), ("abc", "ad1", 1)],  # two prefills batched; one leaves at its first token
        7: [("the cat", "ad3", 25)],  # joins after the 6-token row left (its columns trimmed)
        20: [("a longer prompt than the others", None, 8), ("q", "ad0", 15)],  # after the long one left
    }
    at = {s: [greedy(tok, t, keys[a] if a else None, n) for t, a, n in rows] for s, rows in plan.items()}
    adapters = [a for s in sorted(plan) for _, a, _ in plan[s]]
    reqs = [r for s in sorted(at) for r in at[s]]
    got = [f.result(timeout=120) for f in staggered(engine, at)]
    engine.close()
    tokens = [c.token_ids for c in got]
    assert [c.timing.admitted_step for c in got] == [0, 0, 3, 4, 4, 7, 20, 20]
    assert [len(t) for t in tokens] == [r.sampling.max_tokens for r in reqs]
    assert tokens == [engine.generate([r])[0].token_ids for r in reqs]
    assert tokens == peft_greedy(registry, reqs, adapters)
    assert len({tuple(t[:5]) for t in tokens}) >= 6  # the adapters really change the output


def test_stop_strings_and_streaming_deltas_in_a_continuous_batch(registry: Registry) -> None:
    engine = make_engine(registry)
    tok = engine.tokenizer
    ids = tok("hello", add_special_tokens=False)["input_ids"]

    def sampled(seed: int, stop: list[str]) -> GenRequest:
        sp = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True, stop=stop)
        return GenRequest(list(ids), None, sp)

    full = [engine.generate([sampled(s, [])])[0].text for s in (1, 2, 3)]
    stops = [[f[10:12]] for f in full]  # cut each one inside its text
    reqs = [sampled(s, st) for s, st in zip((1, 2, 3), stops, strict=True)]
    deltas: list[list[str]] = [[], [], []]
    at = {0: [reqs[0]], 2: [reqs[1]], 5: [reqs[2]]}
    futures = staggered(engine, at, on_delta={i: deltas[i].append for i in range(3)})
    outs = [f.result(timeout=120) for f in futures]
    engine.close()
    for f, st, o, d in zip(full, stops, outs, deltas, strict=True):
        assert o.text == f[: f.index(st[0])] and o.finish_reason == "stop"
        assert "".join(d) == o.text


def test_a_cancelled_request_frees_its_slot_and_stops_consuming_steps(registry: Registry) -> None:
    """One adapter slot: the second request's adapter must wait (the running row's adapter is never
    evicted); cancelling the first removes its row at the next step and hands the slot over."""
    engine = make_engine(registry, max_adapters=1)
    tok = engine.tokenizer
    ad0, ad1 = (engine.resolve(TENANT, registry.get(a)) for a in ("ad0", "ad1"))
    long, other = greedy(tok, "hello there", ad0, 500), greedy(tok, "the cat", ad1, 6)
    futures: list[Future[Completion]] = []

    def hook(step: int) -> None:
        if step == 3:
            futures.append(engine.submit(other))
        if step == 10:
            assert futures[0].cancel()  # pending while it runs, so cancel() succeeds

    engine.step_hook = hook
    futures.insert(0, engine.submit(long))
    for _ in range(600):
        if len(futures) == 2:
            break
        time.sleep(0.05)
    b = futures[1].result(timeout=120)
    engine.close()
    assert futures[0].cancelled() and engine.stats["cancelled"] == 1
    assert b.timing.admitted_step == 10  # it waited for the slot instead of evicting a running adapter
    assert engine.stats["steps"] == 10 + 6 - 1  # the cancelled row took no step after step 10
    assert [k.name for k in engine.resident()] == ["ad1"] and engine.stats["evictions"] == 1
    assert b.token_ids == engine.generate([other])[0].token_ids


def test_all_slots_pinned_fails_the_request_instead_of_waiting(registry: Registry) -> None:
    engine = make_engine(registry, max_adapters=1)
    engine.pin(engine.resolve(TENANT, registry.get("ad3")))
    fut = engine.submit(requests(engine, registry, ["ad0"])[0])
    with pytest.raises(EngineError, match="pinned"):
        fut.result(timeout=60)
    engine.close()


def test_n_choices_share_one_prefill(registry: Registry) -> None:
    engine = make_engine(registry, max_wait_ms=0)
    tok = engine.tokenizer
    req = greedy(tok, "hello there", engine.resolve(TENANT, registry.get("ad2")), 10)
    outs = [f.result(timeout=60) for f in engine.submit_n(req, 3)]
    assert engine.stats["batches"] == 1 and engine.stats["requests"] == 3  # one prefill forward, 3 rows
    alone = engine.generate([req])[0].token_ids
    assert [o.token_ids for o in outs] == [alone] * 3
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    sampled = GenRequest(req.prompt_ids, None, sp)
    texts = [f.result(timeout=60).text for f in engine.submit_n(sampled, 3)]
    assert texts[0] == engine.generate([sampled])[0].text and len(set(texts)) == 3  # own seeds
    with pytest.raises(EngineError, match="n="):
        engine.submit_n(req, 17)
    engine.close()


def test_a_closed_stream_cancels_its_request(registry: Registry) -> None:
    """The OpenAI streaming handler cancels the request when the client goes away, both ways the
    response can end: Starlette cancels the task that iterates it (CancelledError inside the generator)
    or the generator is closed (GeneratorExit); the row then stops taking decode steps."""
    engine = make_engine(registry)
    req = requests(engine, registry, ["ad0"], n=1000)[0]

    answer = Answer(chat=True, model="ad0@1")

    async def client_goes_away() -> None:
        gen = _stream(engine, req, 1, answer, False)

        async def consume() -> None:
            async for _ in gen:  # its only wait is inside the generator, like Starlette's loop
                pass

        task = asyncio.ensure_future(consume())
        while engine.stats["steps"] < 5:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        closed = _stream(engine, req, 1, answer, False)
        await closed.__anext__()  # the first (role) chunk; the request is queued
        await closed.aclose()

    asyncio.run(client_goes_away())
    for _ in range(200):
        if engine.stats["cancelled"] == 2:
            break
        time.sleep(0.02)
    steps = engine.stats["steps"]
    time.sleep(0.3)
    engine.close()
    assert engine.stats["cancelled"] == 2 and steps < 500 and engine.stats["steps"] == steps


def test_a_failing_stream_callback_fails_only_its_own_row(registry: Registry) -> None:
    engine = make_engine(registry)
    tok = engine.tokenizer
    good, bad = greedy(tok, "hello there", None, 20), greedy(tok, "the cat", None, 20)

    def broken(_: str) -> None:
        raise RuntimeError("client callback broke")

    fg, fb = staggered(engine, {0: [good], 2: [bad]}, on_delta={1: broken})
    with pytest.raises(RuntimeError, match="callback broke"):
        fb.result(timeout=60)
    assert fg.result(timeout=60).token_ids == engine.generate([good])[0].token_ids
    engine.close()
