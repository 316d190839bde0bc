"""Inference engine: mixed-adapter batches give each request's own greedy tokens (gathered forward vs
one-by-one vs peft's `adapter_names` reference), LRU eviction + reload, pinning, sampling, streaming."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from cltune.config import LoraConfig, ModelConfig
from cltune.errors import ConflictError, NotFoundError
from cltune.methods.common import peft_lora_config
from cltune.models import LoadedModel, build_tiny_llama, load_model
from cltune.registry import Registry
from service.engine import Engine, EngineError, EngineParams, GenRequest, SamplingParams

TENANT = "t_test"
# different ranks and target sets, so rank padding and partly-targeted layers are exercised
SHAPES = [
    (2, ["q_proj", "v_proj"]),
    (4, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (8, ["v_proj", "down_proj"]),
]


def make_adapters(
    registry: Registry,
    names: list[str],
    seed: int = 0,
    std: float = 0.3,
    codebooks: dict[str, list[str]] | None = None,
) -> None:
    """Save random LoRA adapters (non-zero B, so each changes the output) for tiny-llama seed 0."""
    for i, name in enumerate(names):
        model, _, fp = build_tiny_llama(0)
        r, targets = SHAPES[i % len(SHAPES)]
        pm = get_peft_model(
            model, peft_lora_config(LoraConfig(r=r, alpha=2 * r, target_modules=targets)), adapter_name=name
        )
        g = torch.Generator().manual_seed(seed * 1000 + i)
        for m in pm.modules():
            if isinstance(m, LoraLayer):
                with torch.no_grad():
                    m.lora_A[name].weight.copy_(torch.randn(m.lora_A[name].weight.shape, generator=g) * std)
                    m.lora_B[name].weight.copy_(torch.randn(m.lora_B[name].weight.shape, generator=g) * std)
        registry.save(
            pm,
            name,
            {
                "name": name,
                "base_model": "tiny-llama",
                "base_fingerprint": fp,
                "method": "seq_lora",
                "codebook": (codebooks or {}).get(name, [f"task {name}"]),
            },
        )


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


def test_concurrent_submissions_are_batched_and_streamed(registry: Registry) -> None:
    engine = make_engine(registry, max_batch=8, max_wait_ms=200)
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
