"""Per-step training cost of every continual-learning method relative to `seq_lora`, side by side.

Run:  .venv/bin/python bench/method_overhead.py                         # tiny-llama
      .venv/bin/python bench/method_overhead.py --model smollm2-135m --steps 5 --warmup 1
      .venv/bin/python bench/method_overhead.py --methods seq_lora,control_llm --out overhead.json

Every registered method gets its own copy of the base model and goes through a short first task
(prepare -> `--first-steps` steps -> after_task), so that what is timed is a *later* task with the
state a continual run has (I-LoRA's replay buffer is full, NPO's reference NLLs are computed, ...).
Then the methods are timed step by step, interleaved in a seeded random order every round, each on
the same batch in the same round; one step is exactly the loop's (cltune/train.py): loss, backward,
clip, optimizer step, after_step, scheduler step, zero_grad. Ratio = median s/step of the method /
median s/step of seq_lora (also reported: the median of the per-round ratios). One-off costs
(prepare: KappaTune's kappa selection, NPO's reference pass) are timed separately as setup_s.

Budgets (issue 3): ilora <= 2.5x, dema <= 1.1x, kappatune <= 1.05x, control_llm <= 1 + 1.2 K/L,
npo_rt <= 2.2x. Methods that are not registered are reported as skipped. Prints a table on stderr
and one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cltune.config import LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from cltune.data import Example, batches, collate, tokenize  # noqa: E402
from cltune.methods import METHODS, build_method  # noqa: E402
from cltune.methods.base import TaskContext  # noqa: E402
from cltune.models import LoadedModel, load_model  # noqa: E402
from cltune.train import make_scheduler  # noqa: E402

FIXED_BUDGETS = {"ilora": 2.5, "dema": 1.1, "kappatune": 1.05, "npo_rt": 2.2}
BUDGETED = ("ilora", "dema", "kappatune", "control_llm", "npo_rt")


def examples(kind: str, n: int) -> list[Example]:
    """Two small synthetic instruction tasks (the content does not matter for timing)."""
    rng = random.Random(0 if kind == "a" else 1)
    rows = []
    for i in range(n):
        k = rng.randrange(1000)
        if kind == "a":
            q, a = f"Add one to the number {k} and answer with digits only.", str(k + 1)
        else:
            q, a = f"Write the digits of {k} in reverse order, nothing else.", str(k)[::-1]
        rows.append(Example(({"role": "user", "content": q},), a, i + 1))
    return rows


def make_context(loaded: LoadedModel, index: int, cfg: TrainConfig, lora: LoraConfig, n: int) -> TaskContext:
    ex = examples("ab"[index], n)
    retain = examples("ba"[index], n)  # unlearning methods need a retain set
    tok = loaded.tokenizer
    return TaskContext(
        index,
        f"task{index}",
        tokenize(ex, tok, cfg.max_len)[0],
        ex,
        lora,
        cfg,
        tok.pad_token_id,
        loaded.device,
        retain=tokenize(retain, tok, cfg.max_len)[0],
    )


class Runner:
    """One method on its own model copy, stepped exactly like cltune.train.train_task."""

    def __init__(self, name: str, loaded: LoadedModel, tasks: list[TaskContext], first_steps: int) -> None:
        self.name = name
        self.device = loaded.device
        model: Any = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        method = build_method(name)
        model = method.prepare(model, tasks[0], None)
        self.setup_first_s = time.perf_counter() - t0
        self.kappa = dict(getattr(method, "meta", {}) or {})
        self.model, self.method, self.task = model, method, tasks[0]
        self._start_optimizer()
        for s in range(first_steps):
            self.step(s)
        state = method.after_task(model, tasks[0])
        t0 = time.perf_counter()
        self.method = build_method(name)  # the loop builds a new method object per task
        self.model = self.method.prepare(model, tasks[1], state)
        self.setup_s = time.perf_counter() - t0
        self.task = tasks[1]
        self._start_optimizer()
        self.times: list[float] = []

    def _start_optimizer(self) -> None:
        cfg = self.task.train_cfg
        self.params = self.method.trainable_parameters(self.model)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = make_scheduler(self.opt, cfg, 10_000)
        self.order = batches(len(self.task.train), cfg.batch_size, cfg.seed + 7919 * self.task.index)
        self.model.train()

    def step(self, step: int) -> float:
        cfg = self.task.train_cfg
        items = [self.task.train[i] for i in next(self.order)]
        batch = {k: v.to(self.device) for k, v in collate(items, self.task.pad_id).items()}
        sync()
        t0 = time.perf_counter()
        out = self.method.loss(self.model, batch)
        out.total.backward()
        out.total.item()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.method.after_step(self.model, step + 1)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def budget_for(name: str, runner: Runner) -> tuple[float | None, str | None]:
    if name == "control_llm":
        k, n_layers = len(runner.method.layers), runner.method.num_layers
        return 1 + 1.2 * k / n_layers, f"1 + 1.2 K/L with K={k}, L={n_layers}"
    if name in FIXED_BUDGETS:
        return FIXED_BUDGETS[name], None
    return None, None


def kappa_selection_times(loaded: LoadedModel) -> dict[str, Any]:
    """The one-off kappa table: computed from scratch (empty cache), then read from the cache."""
    from cltune.methods.kappatune import cached_kappa_table

    with tempfile.TemporaryDirectory() as d:
        _, first = cached_kappa_table(loaded.model, 16384, True, Path(d))
        _, again = cached_kappa_table(loaded.model, 16384, True, Path(d))
    return {"uncached_s": round(first["seconds"], 4), "cached_s": round(again["seconds"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--methods", default="", help="comma-separated; default: every registered method")
    ap.add_argument("--steps", type=int, default=9, help="measured steps per method (>= 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method before measuring")
    ap.add_argument("--first-steps", type=int, default=3, help="steps of the first task (fills buffers)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    if args.steps < 5:
        ap.error("--steps must be at least 5 (the median of >= 5 steps is the measure)")
    if args.threads:
        torch.set_num_threads(args.threads)

    wanted = [m for m in args.methods.split(",") if m] or sorted(METHODS)
    names = ["seq_lora"] + [m for m in wanted if m != "seq_lora" and m in METHODS]
    skipped = {
        m: "not registered in cltune.methods.METHODS" for m in set(wanted) | set(BUDGETED) if m not in METHODS
    }

    loaded = load_model(ModelConfig(name=args.model))
    cfg = TrainConfig(batch_size=args.batch_size, max_len=args.max_len, seed=args.seed, lr=1e-4)
    lora = LoraConfig()
    tasks = [make_context(loaded, i, cfg, lora, args.examples) for i in (0, 1)]
    runners = {}
    for name in names:
        print(f"preparing {name} ...", file=sys.stderr, flush=True)
        runners[name] = Runner(name, loaded, tasks, args.first_steps)

    rng = random.Random(args.seed)
    for r in range(args.warmup + args.steps):
        order = list(names)
        rng.shuffle(order)  # interleaved: machine-load drift hits every method alike
        for name in order:
            dt = runners[name].step(args.first_steps + r)
            if r >= args.warmup:
                runners[name].times.append(dt)

    base = runners["seq_lora"]
    base_med = statistics.median(base.times)
    results: dict[str, Any] = {}
    for name in names:
        run = runners[name]
        med = statistics.median(run.times)
        ratio = med / base_med
        paired = statistics.median(a / b for a, b in zip(run.times, base.times, strict=True))
        budget, formula = budget_for(name, run)
        results[name] = {
            "s_per_step": round(med, 5),
            "ratio": round(ratio, 3),
            "paired_ratio": round(paired, 3),
            "budget": None if budget is None else round(budget, 3),
            "pass": None if budget is None else ratio <= budget,
            "setup_s": round(run.setup_s, 3),
            "setup_first_task_s": round(run.setup_first_s, 3),
            "trainable_params": sum(p.numel() for p in run.params),
            "step_times_s": [round(t, 5) for t in run.times],
        }
        if formula:
            results[name]["budget_formula"] = formula
    if "kappatune" in runners:
        results["kappatune"]["kappa_selection"] = {
            **kappa_selection_times(loaded),
            "selection": runners["kappatune"].kappa.get("selection"),
            "rank": runners["kappatune"].kappa.get("rank"),
        }
    for name, why in sorted(skipped.items()):
        results[name] = {"skipped": why}

    doc = {
        "bench": "method_overhead",
        "model": args.model,
        "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "lora": lora.model_dump(mode="json"),
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
        "first_task_steps": args.first_steps,
        "seq_lora_s_per_step": round(base_med, 5),
        "methods": results,
    }
    print(
        f"{'method':<12} {'s/step':>8} {'ratio':>6} {'paired':>6} {'budget':>6}  pass  setup_s",
        file=sys.stderr,
    )
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<12} skipped: {r['skipped']}", file=sys.stderr)
            continue
        b = "-" if r["budget"] is None else f"{r['budget']:.3f}"
        ok = "-" if r["pass"] is None else ("yes" if r["pass"] else "NO")
        print(
            f"{name:<12} {r['s_per_step']:>8.4f} {r['ratio']:>6.3f} {r['paired_ratio']:>6.3f} {b:>6}  {ok:<4}  "
            f"{r['setup_s']:.3f}",
            file=sys.stderr,
        )
    text = json.dumps(doc, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
