"""Unlearning benchmark: learn fictitious country capitals in a LoRA adapter, then forget a subset with
npo, npo_rt, npo_kl and grad_ascent. Reports forget-set accuracy / NLL and retain-set accuracy before and
after, and forget quality (log10 KS-test p-value of truth ratios against an adapter never trained on the
forget set), over several seeds, plus the same numbers after every `--report-every` epochs of unlearning
(the trajectory shows where each method stands as unlearning goes on). Prints JSON (and a table with --table).

    OMP_NUM_THREADS=2 .venv/bin/python bench/unlearn.py --table                        # tiny-llama, 3 seeds
    .venv/bin/python bench/unlearn.py --model smollm2-135m --table --json unlearn.json  # ~1 h on 2 cores

Every method runs at every `--lrs` value (default 1e-4, the recommended LoRA rate, and 1e-3) from the same
learned adapter, so the table compares them at equal settings.

The facts are fictitious, as in TOFU: made-up country names ("What is the capital of Velmoria?") answered
by real capital-city names drawn without replacement, so no model knows them before the adapter learns
them and a model never trained on the forget set can only guess. tiny-llama is first full-trained on the
format with other made-up countries (same answer vocabulary), so LoRA has something to build on; SmolLM2
needs no pre-training. The base and the adapter trained on all the facts are shared by the seeds; the
forget subset, the never-trained reference adapter and the unlearning batch order change with the seed.
The retain set given to npo_rt / npo_kl is part of the retained facts; the rest ("retain held out") is
scored too, as a check that utility is kept beyond the data the retain term sees.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cltune.config import LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from cltune.data import Example, prompt_text, tokenize  # noqa: E402
from cltune.demo_data import capitals  # noqa: E402
from cltune.evaluate import score_task  # noqa: E402
from cltune.methods import build_method  # noqa: E402
from cltune.methods.base import MethodState, TaskContext  # noqa: E402
from cltune.methods.seq_lora import SeqLora  # noqa: E402
from cltune.models import LoadedModel, load_model, pretrain_tiny  # noqa: E402
from cltune.train import Callbacks, train_task  # noqa: E402
from cltune.unlearn_metrics import answer_nll, forget_quality, perturbed_answers, truth_ratios  # noqa: E402

METHODS = ["npo", "npo_rt", "npo_kl", "grad_ascent"]
SYLLABLES = ["ka", "lo", "ve", "mi", "dra", "sor", "tu", "nel", "qua", "zen", "bri", "fa", "gor", "lin"]
SUFFIXES = ["ia", "land", "stan", "ora", "mark"]
# per-model defaults: (lora rank, learn lr, learn epochs); SmolLM2 reaches 100% on 40 facts in 30 epochs
MODEL_DEFAULTS = {"tiny-llama": (32, 3e-3, 150.0), "smollm2-135m": (16, 1e-3, 30.0)}


def fictitious_facts(n: int, answers: list[str], seed: int, exclude: set[str]) -> list[dict[str, str]]:
    """n made-up countries (not in `exclude`) with capitals drawn from `answers` without replacement."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        name += rng.choice(SUFFIXES)
        if name not in exclude:
            exclude.add(name)
            names.append(name)
    return [
        {"prompt": f"What is the capital of {c}?", "completion": a}
        for c, a in zip(names, rng.sample(answers, n), strict=True)
    ]


def examples(rows: list[dict[str, str]]) -> list[Example]:
    return [
        Example(({"role": "user", "content": r["prompt"]},), r["completion"], i + 1)
        for i, r in enumerate(rows)
    ]


def context(
    loaded: LoadedModel,
    ex: list[Example],
    lora: LoraConfig,
    cfg: TrainConfig,
    index: int,
    retain: list[Example] | None = None,
) -> TaskContext:
    tok = loaded.tokenizer
    items, _ = tokenize(ex, tok, cfg.max_len)
    ret = tokenize(retain, tok, cfg.max_len)[0] if retain else None
    return TaskContext(index, f"t{index}", items, ex, lora, cfg, tok.pad_token_id, loaded.device, retain=ret)


def accuracy(model: Any, loaded: LoadedModel, ex: list[Example]) -> float:
    return score_task(model, loaded.tokenizer, ex, "exact_match", max_new_tokens=24, adapter="default")[0]


def measure(
    model: Any,
    loaded: LoadedModel,
    split: dict[str, list[Example]],
    pert: list[list[str]],
    max_len: int,
    ref_tr: np.ndarray,
) -> dict[str, Any]:
    """Accuracies, forget NLL, truth ratios and forget quality against `ref_tr` (the never-trained
    model's truth ratios)."""
    nll, _ = answer_nll(model, loaded.tokenizer, split["forget"], max_len)
    tr = truth_ratios(model, loaded.tokenizer, split["forget"], pert, max_len)
    return {
        "forget_acc": accuracy(model, loaded, split["forget"]),
        "forget_nll": float(nll.mean()),  # NLL summed over answer tokens, mean over forget examples
        "retain_acc": accuracy(model, loaded, split["retain"]),
        "retain_heldout_acc": accuracy(model, loaded, split["retain_heldout"]),
        "truth_ratio": tr.tolist(),
        "forget_quality": forget_quality(tr, ref_tr),
    }


def learn(base: Any, loaded: LoadedModel, ex: list[Example], lora: LoraConfig, cfg: TrainConfig) -> Any:
    """A 'default' LoRA adapter trained on `ex` on a copy of the base model."""
    method = SeqLora()
    ctx = context(loaded, ex, lora, cfg, 0)
    model = method.prepare(copy.deepcopy(base), ctx, None)
    train_task(model, method, ctx, cfg)
    return model


def learn_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=args.learn_epochs,
        batch_size=16,
        lr=args.learn_lr,
        max_len=args.max_len,
        seed=seed,
        schedule="constant",
    )


def run_seed(
    seed: int,
    base: Any,
    full: Any,
    loaded: LoadedModel,
    facts: list[dict[str, str]],
    args: argparse.Namespace,
    lora: LoraConfig,
) -> dict[str, Any]:
    """Forget a seed-chosen subset of `facts` from `full` (the adapter trained on all of them) with every
    method at every learning rate."""
    rows = list(facts)
    random.Random(seed).shuffle(rows)
    forget, retain_all = rows[: args.forget], rows[args.forget :]
    n_rt = round(len(retain_all) * args.retain_fraction)
    split = {
        "forget": examples(forget),
        "retain": examples(retain_all[:n_rt]),
        "retain_heldout": examples(retain_all[n_rt:]),
    }
    pert = perturbed_answers(
        [r["completion"] for r in forget], [r["completion"] for r in rows], k=3, seed=seed
    )
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    never = learn(base, loaded, examples(retain_all), lora, learn_config(args, seed))  # never saw them
    learn_s = time.perf_counter() - t0
    ref_tr = truth_ratios(never, loaded.tokenizer, split["forget"], pert, args.max_len)
    before = measure(full, loaded, split, pert, args.max_len, ref_tr)
    out: dict[str, Any] = {
        "seed": seed,
        "never_trained_learn_seconds": learn_s,
        "never_trained": {
            "forget_acc": accuracy(never, loaded, split["forget"]),
            "retain_acc": accuracy(never, loaded, split["retain"]),
            "forget_nll": float(answer_nll(never, loaded.tokenizer, split["forget"], args.max_len)[0].mean()),
        },
        "before": before,
        "after": {},
    }
    del never
    steps_per_epoch = len(forget) / args.batch_size
    every = max(1, round(args.report_every * steps_per_epoch)) if args.report_every else 0
    for lr in args.lrs:
        unlearn_cfg = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=lr,
            max_len=args.max_len,
            seed=seed,
            eval_every=every,
        )
        for name in args.methods:
            model = copy.deepcopy(full)
            params = {} if name == "grad_ascent" else {"beta": args.beta}
            method = build_method(name, params)
            ctx = context(loaded, split["forget"], lora, unlearn_cfg, 1, split["retain"])
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            model = method.prepare(
                model, ctx, MethodState(meta={"method": "seq_lora", "serve_adapter": "default"})
            )
            trajectory: list[dict[str, Any]] = []

            def checkpoint(
                step: int, model: Any = model, trajectory: list[dict[str, Any]] = trajectory
            ) -> None:
                m = measure(model, loaded, split, pert, args.max_len, ref_tr)
                del m["truth_ratio"]
                trajectory.append({"step": step, "epochs": round(step / steps_per_epoch, 2), **m})

            res = train_task(model, method, ctx, unlearn_cfg, callbacks=Callbacks(on_eval=checkpoint))
            seconds = time.perf_counter() - t0  # includes the trajectory's evaluations
            after = measure(model, loaded, split, pert, args.max_len, ref_tr)
            point = {k: v for k, v in after.items() if k != "truth_ratio"}
            trajectory.append({"step": res.steps, "epochs": round(res.steps / steps_per_epoch, 2), **point})
            out["after"][run_key(name, lr)] = {
                **after,
                "method": name,
                "lr": lr,
                "steps": res.steps,
                "seconds": seconds,
                "final_loss": res.final_loss,
                "trajectory": trajectory,
            }
            log(
                f"seed {seed} {name} lr {lr:g}: forget {before['forget_acc']:.2f}->{after['forget_acc']:.2f} "
                f"retain {before['retain_acc']:.2f}->{after['retain_acc']:.2f} fq {after['forget_quality']:.2f}"
            )
    return out


def run_key(method: str, lr: float) -> str:
    return f"{method}@lr={lr:g}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summarise(runs: list[dict[str, Any]], keys_run: list[str]) -> dict[str, Any]:
    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}

    keys = ["forget_acc", "forget_nll", "retain_acc", "retain_heldout_acc", "forget_quality"]
    out: dict[str, Any] = {"before": {k: ms([r["before"][k] for r in runs]) for k in keys}}
    out["never_trained"] = {k: ms([r["never_trained"][k] for r in runs]) for k in runs[0]["never_trained"]}
    for m in keys_run:
        s = {k: ms([r["after"][m][k] for r in runs]) for k in keys}
        # per-seed checks of the target, then aggregated
        rel = [r["after"][m]["forget_acc"] / max(r["before"]["forget_acc"], 1e-9) for r in runs]
        drop = [r["before"]["retain_acc"] - r["after"][m]["retain_acc"] for r in runs]
        s["forget_acc_relative"] = ms(rel)
        s["retain_acc_drop"] = ms(drop)
        # accuracies are multiples of 1/n: compare with a margin, so that 1.00 -> 0.95 counts as 5 points
        s["target_met_seeds"] = sum(
            a <= 0.10 + 1e-9 and d <= 0.05 + 1e-9 for a, d in zip(rel, drop, strict=True)
        )
        s["seconds"] = ms([r["after"][m]["seconds"] for r in runs])
        # the trajectory, averaged over seeds (every seed reports at the same steps)
        points = zip(*(r["after"][m]["trajectory"] for r in runs), strict=True)
        s["trajectory"] = [
            {"epochs": pts[0]["epochs"], **{k: statistics.fmean(p[k] for p in pts) for k in keys}}
            for pts in points
        ]
        out[m] = s
    return out


def table(summary: dict[str, Any], keys_run: list[str], n_seeds: int) -> str:
    cols = ["forget_acc", "forget_nll", "retain_acc", "retain_heldout_acc", "forget_quality"]
    head = f"{'model':<24}" + "".join(f"{c:>22}" for c in cols) + f"{'target seeds':>14}"
    lines = [head]
    for row in ["before", *keys_run]:
        s = summary[row]
        cells = "".join(f"{s[c]['mean']:>14.3f} ± {s[c]['std']:<5.3f}" for c in cols)
        tgt = f"{s['target_met_seeds']}/{n_seeds}" if row != "before" else "-"
        lines.append(f"{row:<24}{cells}{tgt:>14}")
    nt = summary["never_trained"]
    lines.append(
        f"never trained on the forget set: forget acc {nt['forget_acc']['mean']:.3f}, "
        f"forget NLL {nt['forget_nll']['mean']:.3f}, retain acc {nt['retain_acc']['mean']:.3f}"
    )
    lines.append("")
    lines.append("trajectory (mean over seeds): epochs: forget acc / retain acc / held-out retain acc / fq")
    for m in keys_run:
        pts = "  ".join(
            f"{p['epochs']:g}: {p['forget_acc']:.2f}/{p['retain_acc']:.2f}/{p['retain_heldout_acc']:.2f}"
            f"/{p['forget_quality']:.1f}"
            for p in summary[m]["trajectory"]
        )
        lines.append(f"{m:<24}{pts}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", choices=sorted(MODEL_DEFAULTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--facts", type=int, default=40, help="fictitious capitals learned by the adapter")
    ap.add_argument("--forget", type=int, default=10, help="of which this many are forgotten")
    ap.add_argument(
        "--retain-fraction", type=float, default=0.67, help="share of retained facts given to rt/kl"
    )
    ap.add_argument(
        "--pretrain-steps", type=int, default=150, help="tiny-llama only: full training on the format"
    )
    ap.add_argument("--learn-epochs", type=float, default=None, help="tiny 150, smollm2 30")
    ap.add_argument("--learn-lr", type=float, default=None, help="tiny 3e-3, smollm2 1e-3")
    ap.add_argument("--lora-r", type=int, default=None, help="tiny 32, smollm2 16 (all linear layers)")
    ap.add_argument("--epochs", type=float, default=10.0, help="unlearning epochs over the forget set")
    ap.add_argument(
        "--report-every", type=float, default=5.0, help="epochs between trajectory points; 0: off"
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-4, 1e-3],
        help="unlearning lrs (docs/methods.md: 1e-4 with LoRA)",
    )
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--max-answer-chars", type=int, default=12, help="answers: capitals up to this length")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: leave the default")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    rank, learn_lr, learn_epochs = MODEL_DEFAULTS[args.model]
    args.lora_r = args.lora_r or rank
    args.learn_lr = args.learn_lr or learn_lr
    args.learn_epochs = args.learn_epochs or learn_epochs
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    loaded = load_model(ModelConfig(name=args.model))
    real = capitals()
    answers = sorted({r["completion"] for r in real if len(r["completion"]) <= args.max_answer_chars})
    taken = {r["prompt"].removeprefix("What is the capital of ").rstrip("?") for r in real}
    # fixed seed: the benchmark facts do not change with --seeds
    facts = fictitious_facts(args.facts, answers, 1234, taken)
    if args.model == "tiny-llama":  # a random model barely learns through LoRA: teach it the format first
        other = fictitious_facts(len(answers), answers, 4321, taken)
        tok = loaded.tokenizer
        pretrain_tiny(
            loaded,
            [prompt_text(tok, e.messages) + e.answer for e in examples(other)],
            steps=args.pretrain_steps,
        )
    base = loaded.model
    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, target_modules="all-linear")
    t1 = time.perf_counter()
    torch.manual_seed(0)
    full = learn(base, loaded, examples(facts), lora, learn_config(args, 0))  # shared by the seeds
    learn_s = time.perf_counter() - t1
    log(f"learned {len(facts)} facts in {learn_s:.0f} s")
    runs = [run_seed(s, base, full, loaded, facts, args, lora) for s in args.seeds]
    keys_run = [run_key(m, lr) for lr in args.lrs for m in args.methods]
    summary = summarise(runs, keys_run)
    result = {
        "benchmark": "unlearn",
        "model": args.model,
        "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lora": lora.model_dump(mode="json"),
        "target": "npo_rt: forget_acc <= 10% of its start, retain_acc within 5 points",
        "learn_seconds": learn_s,
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    if args.table:
        print(table(summary, keys_run, len(args.seeds)), file=sys.stderr)


if __name__ == "__main__":
    main()
