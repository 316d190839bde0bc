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

Prints JSON (also written to --out if given) and a table: AP, BWT, forgetting (METHODS.md section 0) and wall
time per method. `dema` additionally gets a routed evaluation: after the last task, every held-out
prompt goes to a group by the similarity of its instruction to the groups' codebooks (cltune.grouping),
which is how DEMA's groups are meant to be served. Two rules: `argmax` (the most similar group) and
`reference` (the most similar group if it clears DEMA's threshold, else the most recent group). BWT for
those rows compares the routed final scores with the served scores right after each task.
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
from cltune.data import Example, prompt_text
from cltune.evaluate import cl_metrics, format_matrix, score_task
from cltune.grouping import decide
from cltune.methods import METHODS
from cltune.methods.base import MethodState
from cltune.methods.common import load_adapter_state, peft_lora_config
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


# ---------------------------------------------------------------- dema's routed evaluation


def routed_scores(
    loaded: LoadedModel, base: Any, run_dir: Path, cfg: RunConfig, params: dict[str, Any], rule: str
) -> dict[str, Any]:
    """Final scores when every held-out prompt is routed to a DEMA group by its instruction.

    rule "argmax": the most similar group. rule "reference": the most similar group if its similarity
    clears DEMA's threshold, else the most recent group (as the reference serves).
    """
    from peft import PeftModel

    from cltune.sequence import read_task_data

    last = cfg.tasks[-1]
    state = MethodState.load(run_dir / "tasks" / f"{len(cfg.tasks) - 1:02d}-{last.name}" / "state")
    assert state is not None
    groups = state.meta["groups"]
    model: Any = None
    for g in groups:
        conf = peft_lora_config(LoraConfig.model_validate(g["lora"]))
        model = PeftModel(base, conf, adapter_name=g["adapter"]) if model is None else model
        if g["adapter"] not in model.peft_config:
            model.add_adapter(g["adapter"], conf)
        part = {k.split("/", 1)[1]: v for k, v in state.tensors.items() if k.startswith(g["adapter"] + "/")}
        load_adapter_state(model, g["adapter"], part)
    p = METHODS["dema"].Params.model_validate(params)
    threshold = p.threshold if rule == "reference" else float("-inf")
    books = {g["name"]: g["codebook"] for g in groups}
    by_name = {g["name"]: g["adapter"] for g in groups}
    row, correct, total = [], 0, 0
    for t in cfg.tasks:
        held = read_task_data(t, cfg.train.seed).eval
        buckets: dict[str, list[Example]] = {}
        for ex in held:
            d = decide([ex.instruction], books, threshold, p.similarity, p.reduce)
            group = d.group if d.action == "retrain" else groups[-1]["name"]  # reference: most recent group
            buckets.setdefault(by_name[group], []).append(ex)
            correct += int(t.name in next(g["tasks"] for g in groups if g["name"] == group))
            total += 1
        score = 0.0
        for adapter, exs in buckets.items():
            s, _ = score_task(
                model,
                loaded.tokenizer,
                exs,
                t.scorer,
                max_new_tokens=t.max_new_tokens or 16,
                batch_size=cfg.eval.batch_size,
                adapter=adapter,
            )
            score += s * len(exs)
        row.append(score / len(held))
    return {
        "rule": rule,
        "final_row": row,
        "routing_accuracy": correct / total,
        "groups": [g["name"] for g in groups],
    }


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
    base = copy.deepcopy(loaded.model)  # every method starts from the same weights
    mine = LoadedModel(
        copy.deepcopy(loaded.model),
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
    if name == "dema":  # BWT compares routed final scores with the served scores right after each task
        out["routed"] = []
        for rule in ("argmax", "reference"):
            routed = routed_scores(loaded, copy.deepcopy(base), run_dir, cfg, params, rule)
            out["routed"].append({**routed, "metrics": cl_metrics([*res.R[:-1], routed["final_row"]])})
    del mine, base
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
        for routed in r.get("routed", []):
            rm = routed["metrics"]
            lines.append(
                f"{'  routed, ' + routed['rule']:<28}{rm['ap']:>7.3f}{rm['bwt']:>8.3f}"
                f"{rm['forgetting']:>8.3f}{diag:>9.3f}{'':>8}{'':>8}"
                f"  routing accuracy {routed['routing_accuracy']:.2f}"
            )
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
