"""Continual-learning quality: the same 3-task sequence with every method, over several seeds.

    .venv/bin/python bench/continual.py                                   # tiny-llama, pre-trained here
    .venv/bin/python bench/continual.py --model smollm2-135m --seeds 0 1 2 --jobs 2   # SmolLM2 (slow)

Every (method, seed) run trains the sequence from the same base weights; the seed sets the training
seed (batch order, LoRA initialisation, the held-out and validation splits). Per method the report gives
the mean and the 95% Student-t interval over seeds of AP, BWT and forgetting, each task's final score and
the general-ability retention, and against seq_lora says "better", "worse" or "no measurable difference"
(a claim only when the intervals do not overlap; cltune.stats). `--jobs N` runs N runs at once in
separate processes with `--threads` threads each (2 cores: --jobs 2 --threads 1).

tiny-llama tasks are facts: `capital of <key>?`, `pet of <key>`, `color of <key>`, each answered by one
of its own 8 words, for 32 random keys per task. The model is first full-trained on the same three
templates with other keys (so it knows the formats and answer sets but not the facts: R[0] ~ 1/8), and
LoRA then learns each task's facts to 100% in 200 steps. Facts cannot be inferred, so each task is
scored (exact match) on its own training facts: R measures what is still recalled. (Held-out
algorithmic tasks -- reverse / upper-case / shift a string -- were tried first: after 400 pre-training
steps the 2-layer model could not even copy, and LoRA reached 0% on all of them.)
SmolLM2 tasks (`--sequence bench`, the default, chosen apart from the demo): the continent of a country
(countryinfo, 5 labels), Spanish number words and English ordinal words for 1-999 (num2words), at
least 100 held out per task; `--sequence demo`: the demo's capitals, French numbers, sentiment.
Training is `steps: auto` (validation loss, patience 2, at most --max-steps per task) unless --steps N.

Prints JSON (also written to --out if given) and a table: AP, BWT, forgetting (docs/methods.md
section 0) and wall time per method. DEMA's R is routed by run_continual itself (cltune.served): every
held-out prompt goes to the group whose codebook its instruction is most similar to (cltune.router), else
to the most recent group, as DEMA's groups are served; `dema` rows also report the routing accuracy (the
share of prompts answered by the group that trained their task), from results' `scored_with`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
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
from cltune.continual import run_continual
from cltune.data import prompt_text
from cltune.evaluate import format_matrix
from cltune.methods import METHODS
from cltune.methods.base import MethodState
from cltune.models import LoadedModel, load_model, pretrain_tiny
from cltune.stats import fmt, mean_ci, summarize_results
from cltune.train import Callbacks

DEFAULT_METHODS = ["seq_lora", "ilora", "dema", "control_llm", "kappatune"]
SESSION_ARGS = ("methods", "seeds", "jobs", "threads", "out", "runs_dir")  # not part of a run's result
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


def sequence_tasks(directory: Path, sequence: str, max_eval: int) -> list[TaskConfig]:
    """A named sequence of cltune.demo_data, holding out `max_eval` examples per task (or 40%)."""
    from cltune.demo_data import SEQUENCES, write_demo_data

    paths = write_demo_data(directory, SEQUENCES[sequence])
    out = []
    for n, p in paths.items():
        rows = sum(1 for _ in p.open(encoding="utf-8"))
        frac = min(0.4, max_eval / rows)
        out.append(TaskConfig(name=n, train=str(p), eval_fraction=frac, max_eval=max_eval, max_new_tokens=16))
    return out


# ---------------------------------------------------------------- dema's routing


def routing_accuracy(run_dir: Path, cfg: RunConfig, scored_with: dict[str, Any]) -> float:
    """Share of the final row's prompts answered by the adapter of the DEMA group that trained their task
    (run_continual routes every prompt: `scored_with` says which adapter answered how many per column)."""
    last = cfg.tasks[-1]
    state = MethodState.load(run_dir / "tasks" / f"{len(cfg.tasks) - 1:02d}-{last.name}" / "state")
    assert state is not None
    tasks_of = {g["adapter"]: g["tasks"] for g in state.meta["groups"]}
    columns = scored_with[last.name]["columns"]
    right = sum(n for task, used in columns.items() for a, n in used.items() if task in tasks_of.get(a, []))
    return right / max(1, sum(n for used in columns.values() for n in used.values()))


# ---------------------------------------------------------------- runs


def spec_slug(text: str) -> str:
    """A method spec (`ilora:ema_decay=0.9,gamma=1`, with anything around it) as a file name."""
    return text.replace(":", "_").replace(",", "_").replace("=", "-")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`name` or `name:key=value,key=value` (values as YAML scalars)."""
    import yaml

    name, _, raw = spec.partition(":")
    return name, {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in raw.split(",") if kv)}


def setup(args: argparse.Namespace, work: Path) -> tuple[LoadedModel, list[TaskConfig]]:
    """The base model (tiny: pre-trained here, deterministically) and the task files."""
    loaded = load_model(ModelConfig(name=args.model, seed=0))
    if args.model == "tiny-llama":
        tasks, pairs = tiny_tasks(work / "data", args.n_facts, 300, 0)
        pretrain_tiny(loaded, pretrain_texts(loaded, pairs), steps=args.pretrain_steps, seed=0)
    else:
        tasks = sequence_tasks(Path("data") / "bench", args.sequence, args.n_eval)
    return loaded, tasks


def train_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    steps: int | str = "auto" if args.steps == "auto" else int(args.steps)
    return TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule="constant",
        warmup_steps=5 if steps == "auto" else 0,
        max_steps=args.max_steps,
        patience=args.patience,
        val_every=args.val_every,
        max_len=args.max_len,
        seed=seed,
    )


def run_one(spec: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One method on one seed, from freshly loaded base weights (runs in its own process with --jobs)."""
    torch.set_num_threads(args.threads)
    name, params = parse_spec(spec)
    loaded, tasks = setup(args, work / spec_slug(f"{spec}-{seed}"))
    cfg = RunConfig(
        name="bench",
        model=ModelConfig(name=loaded.name, device=str(loaded.device)),
        lora=LoraConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, target_modules=args.targets),
        method=MethodConfig(name=name, params=params),
        tasks=tasks,
        train=train_config(args, seed),
        eval=EvalConfig(batch_size=64, heatmap=False, general=args.general, general_examples=args.general_n),
    )
    run_dir = work / "runs" / spec_slug(f"{spec}-{seed}")
    t0 = time.perf_counter()
    tag = f"[{spec} seed {seed}]"
    log = Callbacks(log=lambda message, **_: print(tag, message, flush=True))
    res = run_continual(cfg, run_dir, loaded=loaded, resume=False, callbacks=log)
    out: dict[str, Any] = {
        "method": spec,
        "seed": seed,
        "params": params,
        "tasks": res.tasks,
        "R": res.R,
        "metrics": res.metrics,
        "general": res.general,
        "train": [{k: v for k, v in t.items() if k not in ("history", "validation")} for t in res.train],
        "wall_s": time.perf_counter() - t0,
        "train_s": sum(x["seconds"] for x in res.train),
        "steps": sum(x["steps"] for x in res.train),
    }
    if name == "dema":  # R is routed per prompt (run_continual): how often the right group answered
        out["routing_accuracy"] = routing_accuracy(run_dir, cfg, res.scored_with)
    print(
        f"[continual] {spec} seed {seed}: AP {res.metrics.get('ap', float('nan')):.3f} "
        f"BWT {res.metrics.get('bwt', float('nan')):.3f} in {out['wall_s']:.0f} s",
        flush=True,
    )
    print(format_matrix(res.R, res.tasks, {k: v["values"] for k, v in res.general.items()}), flush=True)
    return out


def saved_run(args: argparse.Namespace, spec: str, seed: int) -> Path | None:
    """Where `--runs-dir` keeps the result of one (method, seed) run."""
    if args.runs_dir is None:
        return None
    return Path(args.runs_dir) / f"{args.model}-{args.sequence}-{spec}-{seed}.json".replace(":", "_")


def run_saved(spec: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run, or its saved result from an earlier invocation with the same settings (`--runs-dir`:
    a long benchmark survives interruptions, and runs done by several invocations are summarised together)."""
    path = saved_run(args, spec, seed)
    settings = {k: v for k, v in vars(args).items() if k not in SESSION_ARGS}
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            print(f"[continual] {spec} seed {seed}: saved result {path}", flush=True)
            return dict(saved["run"])
    out = run_one(spec, seed, args, work)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings, "run": out}, indent=1))
    return out


def run_all(specs: list[str], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Every (method, seed) run, `args.jobs` at a time in spawned processes (1: in this process)."""
    todo = [(spec, seed) for seed in args.seeds for spec in specs]
    if args.jobs == 1:
        return [run_saved(spec, seed, args, work) for spec, seed in todo]
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_saved, spec, seed, args, work) for spec, seed in todo]
        return [f.result() for f in futures]


def summarize(runs: list[dict[str, Any]], specs: list[str]) -> dict[str, Any]:
    """Per method: intervals over seeds, and the verdict against seq_lora when it ran."""
    baseline = [r for r in runs if r["method"] == "seq_lora"]
    out = {}
    for spec in specs:
        mine = [r for r in runs if r["method"] == spec]
        s = summarize_results(mine, baseline if spec != "seq_lora" and baseline else None)
        s["learned"] = {  # R[i][i]: each task right after its own training
            t: mean_ci([r["R"][i + 1][i] for r in mine]) for i, t in enumerate(mine[0]["tasks"])
        }
        s["steps"] = mean_ci([r["steps"] for r in mine])["mean"]
        s["s_per_step"] = sum(r["train_s"] for r in mine) / max(1, sum(r["steps"] for r in mine))
        if spec.startswith("dema"):
            s["routing_accuracy"] = mean_ci([r["routing_accuracy"] for r in mine])
        out[spec] = s
    return out


def table(summary: dict[str, Any]) -> str:
    """Markdown: mean [95% interval] over seeds; the verdict against seq_lora on AP and BWT."""
    probes = sorted({p for s in summary.values() for p in s["general_retention"]})
    head = [
        "method",
        "AP",
        "BWT",
        "forgetting",
        "learned R[i][i] (per task)",
        *(f"{p} retention" for p in probes),
        "steps",
        "s/step",
        "vs seq_lora (AP / BWT)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, s in summary.items():
        m = s["metrics"]
        vs = s.get("versus_baseline")
        verdict = f"{vs['ap']} / {vs['bwt']}" if vs else "(baseline)"
        learned = ", ".join(f"{v['mean']:.2f}" for v in s["learned"].values())
        cells = [
            spec,
            fmt(m["ap"]),
            fmt(m["bwt"]),
            fmt(m["forgetting"]),
            learned,
            *(fmt(s["general_retention"][p]) if p in s["general_retention"] else "-" for p in probes),
            f"{s['steps']:.0f}",
            f"{s['s_per_step']:.2f}",
            verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "smollm2-135m"])
    ap.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="method specs (name or name:key=value,...); default: the five methods",
    )
    ap.add_argument("--seeds", nargs="*", type=int, default=[0], help="training seeds (e.g. 0 1 2)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    ap.add_argument("--sequence", default="bench", choices=["bench", "demo"], help="smollm2: task sequence")
    ap.add_argument(
        "--steps", default=None, help="'auto' or optimizer steps per task (tiny 200, smollm2 auto)"
    )
    ap.add_argument("--max-steps", type=int, default=150, help="steps: auto -- budget per task")
    ap.add_argument("--patience", type=int, default=2, help="steps: auto -- validations without improvement")
    ap.add_argument("--val-every", type=int, default=10, help="steps: auto -- steps between validations")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="tiny 5e-3, smollm2 1e-3")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--targets",
        nargs="*",
        default=None,
        help="LoRA target modules (tiny: attention + MLP, which it needs to store facts; smollm2: q,k,v,o)",
    )
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--n-facts", type=int, default=32, help="tiny: facts per task")
    ap.add_argument("--n-eval", type=int, default=100, help="smollm2: held-out examples per task")
    ap.add_argument(
        "--general", nargs="*", default=None, help="general-ability probes (smollm2: text_ppl gsm8k_ppl)"
    )
    ap.add_argument("--general-n", type=int, default=32, help="examples per general-ability probe")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument(
        "--runs-dir", default=None, help="save each run's result here and reuse saved ones (same settings)"
    )
    args = ap.parse_args(argv)
    tiny = args.model == "tiny-llama"
    args.steps = args.steps or ("200" if tiny else "auto")
    args.lr = args.lr or (5e-3 if tiny else 1e-3)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.general = args.general if args.general is not None else ([] if tiny else ["text_ppl", "gsm8k_ppl"])
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    args.targets = args.targets or (attn + ["gate_proj", "up_proj", "down_proj"] if tiny else attn)
    specs = args.methods or DEFAULT_METHODS
    unknown = [s for s in specs if parse_spec(s)[0] not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; valid: {', '.join(sorted(METHODS))}")

    work = Path(tempfile.mkdtemp(prefix="cltune-bench-continual-"))
    t0 = time.perf_counter()
    runs = run_all(specs, args, work)
    summary = summarize(runs, specs)
    report = {
        "bench": "continual",
        "model": args.model,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "host": platform.node(),
        "torch_threads": args.threads,
        "tasks": runs[0]["tasks"],
        "config": {k: v for k, v in vars(args).items() if k not in ("methods", "out")},
        "wall_s": time.perf_counter() - t0,
        "summary": summary,
        "runs": runs,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
