"""Continual-learning quality: the same 3-task sequence (same seed, data, steps) with every method.

    .venv/bin/python bench/continual.py                         # tiny-llama, briefly pre-trained here
    .venv/bin/python bench/continual.py --model smollm2-135m    # SmolLM2 on the demo data (slow on CPU)

tiny-llama tasks are facts: `capital of <key>?`, `pet of <key>`, `color of <key>`, each answered by one
of its own 8 words, for 32 random keys per task. The model is first full-trained on the same three
templates with other keys (so it knows the formats and answer sets but not the facts: R[0] ~ 1/8), and
LoRA then learns each task's facts to 100% in 200 steps. Facts cannot be inferred, so each task is
scored (exact match) on its own training facts: R measures what is still recalled. (Held-out
algorithmic tasks -- reverse / upper-case / shift a string -- were tried first: after 400 pre-training
steps the 2-layer model could not even copy, and LoRA reached 0% on all of them.)
SmolLM2 tasks: capitals, French number words, sentiment (cltune.demo_data), 20% held out.

Prints JSON (also written to --out if given) and a table: AP, BWT, forgetting (docs/methods.md
section 0) and wall time per method. DEMA's R is routed by run_sequence itself (cltune.served): every
held-out prompt goes to the group whose codebook its instruction is most similar to (cltune.router), else
to the most recent group, as DEMA's groups are served; `dema` rows also report the routing accuracy (the
share of prompts answered by the group that trained their task), from results' `scored_with`.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cltune.config import (
    EvalConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
)
from cltune.data import prompt_text
from cltune.evaluate import format_matrix
from cltune.methods import METHODS
from cltune.methods.base import MethodState
from cltune.models import LoadedModel, load_model, pretrain_tiny
from cltune.sequence import run_sequence

DEFAULT_METHODS = ["seq_lora", "ilora", "dema", "control_llm", "kappatune"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Three fact tasks with their own template and answer vocabulary: which of 8 answers belongs to a
# random 3-5 letter key. Per task the keys are new, so the base model can only guess (R[0] ~ 1/8).
TINY_TASKS = {
    "capital": ("capital of {}?", ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito"]),
    "pet": ("pet of {}", ["cat", "dog", "fish", "bird", "frog", "mouse", "horse", "snake"]),
    "color": ("color of {}", ["red", "blue", "green", "black", "white", "pink", "gray", "brown"]),
}


# ---------------------------------------------------------------- data


def random_strings(n: int, rng: random.Random, exclude: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if s not in exclude:
            exclude.add(s)
            out.append(s)
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_tasks(
    directory: Path, n_facts: int, n_pretrain: int, seed: int
) -> tuple[list[TaskConfig], list[tuple[str, str]]]:
    """Write the three fact tasks. Returns (task configs, pre-training pairs on other keys).

    Facts cannot be inferred, so a task is scored on its own training facts (eval file = train file):
    R[t][i] is how many of task i's facts the model still recalls after task t.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng, used = random.Random(seed), set[str]()
    tasks, pretrain = [], []
    for name, (template, answers) in TINY_TASKS.items():
        rows = [
            {"prompt": template.format(k), "completion": rng.choice(answers)}
            for k in random_strings(n_facts, rng, used)
        ]
        path = write_jsonl(directory / f"{name}.jsonl", rows)
        tasks.append(TaskConfig(name=name, train=str(path), eval=str(path), max_new_tokens=6))
        pretrain += [(template.format(k), rng.choice(answers)) for k in random_strings(n_pretrain, rng, used)]
    return tasks, pretrain


def pretrain_texts(loaded: LoadedModel, pairs: list[tuple[str, str]]) -> list[str]:
    """Prompt + answer in the chat format the tasks use (other keys): the format and the answer sets."""
    return [prompt_text(loaded.tokenizer, [{"role": "user", "content": q}]) + a for q, a in pairs]


def demo_tasks(directory: Path, max_eval: int) -> list[TaskConfig]:
    from cltune.demo_data import write_demo_data

    paths = write_demo_data(directory)
    return [
        TaskConfig(name=n, train=str(p), eval_fraction=0.2, max_eval=max_eval, max_new_tokens=12)
        for n, p in paths.items()
    ]


# ---------------------------------------------------------------- dema's routing


def routing_accuracy(run_dir: Path, cfg: RunConfig, scored_with: dict[str, Any]) -> float:
    """Share of the final row's prompts answered by the adapter of the DEMA group that trained their task
    (run_sequence routes every prompt: `scored_with` says which adapter answered how many per column)."""
    last = cfg.tasks[-1]
    state = MethodState.load(run_dir / "tasks" / f"{len(cfg.tasks) - 1:02d}-{last.name}" / "state")
    assert state is not None
    tasks_of = {g["adapter"]: g["tasks"] for g in state.meta["groups"]}
    columns = scored_with[last.name]["columns"]
    right = sum(n for task, used in columns.items() for a, n in used.items() if task in tasks_of.get(a, []))
    return right / max(1, sum(n for used in columns.values() for n in used.values()))


# ---------------------------------------------------------------- runs


def run_method(
    spec: str, loaded: LoadedModel, tasks: list[TaskConfig], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """spec: `name` or `name:key=value,key=value` (params as YAML scalars)."""
    import yaml

    name, _, raw = spec.partition(":")
    params = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in raw.split(",") if kv)}
    cfg = RunConfig(
        name="bench",
        model=ModelConfig(name=loaded.name, device=str(loaded.device)),
        lora=LoraConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, target_modules=args.targets),
        method=MethodConfig(name=name, params=params),
        tasks=tasks,
        train=TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            schedule="constant",
            max_len=args.max_len,
            seed=args.seed,
        ),
        eval=EvalConfig(batch_size=64, heatmap=False),
    )
    mine = LoadedModel(
        copy.deepcopy(loaded.model),  # every method starts from the same weights
        loaded.tokenizer,
        loaded.name,
        loaded.fingerprint,
        loaded.device,
        loaded.dtype,
    )
    run_dir = work / spec.replace(":", "_").replace(",", "_").replace("=", "-")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    res = run_sequence(cfg, run_dir, loaded=mine, resume=False)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "method": spec,
        "params": params,
        "R": res.R,
        "metrics": res.metrics,
        "wall_s": wall,
        "train_s": sum(x["seconds"] for x in res.train),
        "steps": sum(x["steps"] for x in res.train),
    }
    if name == "dema":  # R is routed per prompt (run_sequence): how often the right group answered
        out["routing_accuracy"] = routing_accuracy(run_dir, cfg, res.scored_with)
    del mine
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<28}{'AP':>7}{'BWT':>8}{'forget':>8}{'R[i][i]':>9}{'wall s':>8}{'s/step':>8}"]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['method']:<28}  skipped: {r['skipped']}")
            continue
        m, R = r["metrics"], r["R"]
        diag = sum(R[i + 1][i] for i in range(m["T"])) / m["T"]
        per = r["train_s"] / max(1, r["steps"])
        lines.append(
            f"{r['method']:<28}{m['ap']:>7.3f}{m['bwt']:>8.3f}{m['forgetting']:>8.3f}{diag:>9.3f}"
            f"{r['wall_s']:>8.1f}{per:>8.3f}"
        )
        if "routing_accuracy" in r:
            lines[-1] += f"  routing accuracy {r['routing_accuracy']:.2f}"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "smollm2-135m"])
    ap.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="method specs (name or name:key=value,...); default: the five methods + dema without grouping",
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per task (tiny 200, smollm2 40)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="tiny 5e-3, smollm2 2e-4")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--targets",
        nargs="*",
        default=None,
        help="LoRA target modules (tiny: attention + MLP, which it needs to store facts; smollm2: q,k,v,o)",
    )
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--n-facts", type=int, default=32, help="tiny: facts per task")
    ap.add_argument("--n-eval", type=int, default=100, help="smollm2: held-out examples per task")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    args = ap.parse_args(argv)
    tiny = args.model == "tiny-llama"
    args.steps = args.steps or (200 if tiny else 40)
    args.lr = args.lr or (5e-3 if tiny else 2e-4)
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    args.targets = args.targets or (attn + ["gate_proj", "up_proj", "down_proj"] if tiny else attn)
    specs = args.methods or [*DEFAULT_METHODS, "dema:grouping=false", "ilora:buffer_size=16"]

    work = Path(tempfile.mkdtemp(prefix="cltune-bench-continual-"))
    t0 = time.perf_counter()
    loaded = load_model(ModelConfig(name=args.model, seed=args.seed))
    if tiny:
        tasks, pairs = tiny_tasks(work / "data", args.n_facts, 300, args.seed)
        pretrain_tiny(loaded, pretrain_texts(loaded, pairs), steps=args.pretrain_steps, seed=args.seed)
    else:
        tasks = demo_tasks(Path("data/demo"), args.n_eval)
    setup_s = time.perf_counter() - t0
    results: list[dict[str, Any]] = []
    for spec in specs:
        name = spec.partition(":")[0]
        if name not in METHODS:
            results.append({"method": spec, "skipped": f"{name!r} is not registered in METHODS"})
            continue
        print(f"[continual] {spec} ...", flush=True)
        results.append(run_method(spec, loaded, tasks, args, work))
        print(format_matrix(results[-1]["R"], [t.name for t in tasks]), flush=True)
    report = {
        "bench": "continual",
        "model": args.model,
        "device": str(loaded.device),
        "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "tasks": [t.name for t in tasks],
        "config": {k: v for k, v in vars(args).items() if k not in ("methods", "out")},
        "setup_s": setup_s,
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
