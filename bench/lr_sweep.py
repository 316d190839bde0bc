"""Which learning rate learns a task under `steps: auto`: each task of a sequence trained alone from the
base model, for every (method, learning rate, seed).

    .venv/bin/python bench/lr_sweep.py --model smollm2-135m --lrs 2e-4 1e-3 3e-3 --seeds 0 --jobs 2 --threads 1
    .venv/bin/python bench/lr_sweep.py --methods ilora control_llm kappatune --lrs 1e-3 3e-3 --tasks 1 --jobs 2

`--methods` takes bench/continual.py's specs (`ilora:ema_decay=0.99`). DEMA on a single task from the base
is seq_lora (a new group trains with its EMA off), so it needs no sweep of its own.

Per (lr, task): the held-out score after training (R[1][0]; the base model's R[0][0] beside it), the
steps `steps: auto` took, why it stopped, and the best validation loss; per lr the mean over tasks and
seeds with a 95% interval when there are several seeds. This is how the default learning rate was
chosen per method (`train_defaults`, docs/benchmarks.md). The tasks and training settings are bench/continual.py's (`--sequence`,
`--max-steps`, `--patience`, `--val-every`, batch 8, LoRA r=8 on q/k/v/o). Prints JSON (also to --out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from continual import parse_spec, sequence_tasks, spec_slug, train_config

from cltune.config import EvalConfig, LoraConfig, MethodConfig, ModelConfig, RunConfig
from cltune.continual import run_continual
from cltune.models import load_model
from cltune.stats import mean_ci


def run_one(
    spec: str, lr: float, task_index: int, seed: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    name, params = parse_spec(spec)
    loaded = load_model(ModelConfig(name=args.model, seed=0))
    task = sequence_tasks(Path("data") / "bench", args.sequence, args.n_eval)[task_index]
    args.lr = lr
    cfg = RunConfig(
        name="lr-sweep",
        model=ModelConfig(name=loaded.name, device=str(loaded.device)),
        lora=LoraConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, target_modules=args.targets),
        method=MethodConfig(name=name, params=params),
        tasks=[task],
        train=train_config(args, seed),
        eval=EvalConfig(batch_size=64, heatmap=False, general=[]),
    )
    t0 = time.perf_counter()
    res = run_continual(
        cfg, work / spec_slug(f"{spec}-{lr:g}-{task.name}-{seed}"), loaded=loaded, resume=False
    )
    info = res.train[0]
    out = {
        "method": spec,
        "lr": lr,
        "task": task.name,
        "seed": seed,
        "base": res.R[0][0],
        "learned": res.R[1][0],
        "steps": info["steps"],
        "stop_reason": info["stop_reason"],
        "best_validation": info["best_validation"],
        "wall_s": time.perf_counter() - t0,
    }
    print(f"[lr-sweep] {json.dumps(out)}", flush=True)
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method, per learning rate: the mean held-out score over tasks (95% interval over seeds), each
    task's score, steps and stop reasons."""
    return {
        m: summarize_lrs([r for r in runs if r["method"] == m])
        for m in dict.fromkeys(r["method"] for r in runs)
    }


def summarize_lrs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lr in sorted({r["lr"] for r in runs}):
        mine = [r for r in runs if r["lr"] == lr]
        tasks = sorted({r["task"] for r in mine})
        out[f"{lr:g}"] = {
            "learned_mean": mean_ci(
                [
                    sum(r["learned"] for r in mine if r["seed"] == s) / len(tasks)
                    for s in sorted({r["seed"] for r in mine})
                ]
            ),
            "per_task": {t: mean_ci([r["learned"] for r in mine if r["task"] == t]) for t in tasks},
            "steps": {t: [r["steps"] for r in mine if r["task"] == t] for t in tasks},
            "stop_reasons": sorted({r["stop_reason"] for r in mine}),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m"])
    ap.add_argument("--methods", nargs="+", default=["seq_lora"], help="method specs, as bench/continual.py")
    ap.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 1e-3, 3e-3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--tasks", nargs="*", type=int, default=None, help="task indices (default: all)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sequence", default="bench", choices=["bench", "demo"])
    ap.add_argument("--steps", default="auto")
    ap.add_argument("--max-steps", type=int, default=120)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.lr = None
    indices = args.tasks if args.tasks is not None else [0, 1, 2]
    todo = [(m, lr, t, s) for s in args.seeds for m in args.methods for lr in args.lrs for t in indices]
    with tempfile.TemporaryDirectory() as tmp:
        if args.jobs == 1:
            runs = [run_one(*job, args, Path(tmp)) for job in todo]
        else:
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
                futures = [pool.submit(run_one, *job, args, Path(tmp)) for job in todo]
                runs = [f.result() for f in futures]
    report = {
        "bench": "lr_sweep",
        "model": args.model,
        "methods": args.methods,
        "host": {"machine": platform.machine(), "torch_threads": args.threads, "jobs": args.jobs},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "lr")},
        "runs": runs,
        "summary": summarize(runs),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
