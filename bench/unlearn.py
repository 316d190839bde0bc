"""Unlearning benchmark: learn country capitals in a LoRA adapter, then forget a subset with npo, npo_rt,
npo_kl and grad_ascent. Reports forget-set accuracy / NLL and retain-set accuracy before and after, and
forget quality (log10 KS-test p-value of truth ratios against an adapter never trained on the forget set),
over several seeds. Prints JSON (and a table with --table).

    OMP_NUM_THREADS=2 .venv/bin/python bench/unlearn.py --table              # tiny-llama, 3 seeds
    .venv/bin/python bench/unlearn.py --model smollm2-135m --facts 100 --forget 10 --table

tiny-llama is briefly full-trained first (on the capitals that are not part of the benchmark, so the
forget facts are only ever seen by the adapter); the base is shared by the seeds, while the forget subset,
the adapters' initialisation and the batch order change with the seed.
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
from cltune.train import train_task  # noqa: E402
from cltune.unlearn_metrics import answer_nll, forget_quality, perturbed_answers, truth_ratios  # noqa: E402

METHODS = ["npo", "npo_rt", "npo_kl", "grad_ascent"]


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
    model: Any, loaded: LoadedModel, split: dict[str, list[Example]], pert: list[list[str]], max_len: int
) -> dict[str, Any]:
    nll, _ = answer_nll(model, loaded.tokenizer, split["forget"], max_len)
    return {
        "forget_acc": accuracy(model, loaded, split["forget"]),
        "forget_nll": float(nll.mean()),  # NLL summed over answer tokens, mean over forget examples
        "retain_acc": accuracy(model, loaded, split["retain"]),
        "retain_heldout_acc": accuracy(model, loaded, split["retain_heldout"]),
        "truth_ratio": truth_ratios(model, loaded.tokenizer, split["forget"], pert, max_len).tolist(),
    }


def learn(base: Any, loaded: LoadedModel, ex: list[Example], lora: LoraConfig, cfg: TrainConfig) -> Any:
    """A 'default' LoRA adapter trained on `ex` on a copy of the base model."""
    method = SeqLora()
    ctx = context(loaded, ex, lora, cfg, 0)
    model = method.prepare(copy.deepcopy(base), ctx, None)
    train_task(model, method, ctx, cfg)
    return model


def run_seed(
    seed: int,
    base: Any,
    loaded: LoadedModel,
    facts: list[dict[str, str]],
    args: argparse.Namespace,
    lora: LoraConfig,
) -> dict[str, Any]:
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
    torch.manual_seed(seed)
    learn_cfg = TrainConfig(
        epochs=args.learn_epochs,
        batch_size=16,
        lr=args.learn_lr,
        max_len=args.max_len,
        seed=seed,
        schedule="constant",
    )
    t0 = time.perf_counter()
    full = learn(base, loaded, examples(rows), lora, learn_cfg)
    torch.manual_seed(seed)
    never = learn(base, loaded, examples(retain_all), lora, learn_cfg)  # never saw the forget set
    learn_s = time.perf_counter() - t0
    before = measure(full, loaded, split, pert, args.max_len)
    ref_tr = truth_ratios(never, loaded.tokenizer, split["forget"], pert, args.max_len)
    print(
        f"seed {seed} learned in {learn_s:.0f} s: forget acc {before['forget_acc']:.2f}, "
        f"retain acc {before['retain_acc']:.2f}",
        file=sys.stderr,
    )
    out: dict[str, Any] = {
        "seed": seed,
        "learn_seconds": learn_s,
        "never_trained": {
            "forget_acc": accuracy(never, loaded, split["forget"]),
            "retain_acc": accuracy(never, loaded, split["retain"]),
        },
        "before": {**before, "forget_quality": forget_quality(before["truth_ratio"], ref_tr)},
        "after": {},
    }
    unlearn_cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_len=args.max_len, seed=seed
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
        res = train_task(model, method, ctx, unlearn_cfg)
        seconds = time.perf_counter() - t0
        after = measure(model, loaded, split, pert, args.max_len)
        after["forget_quality"] = forget_quality(after["truth_ratio"], ref_tr)
        out["after"][name] = {**after, "steps": res.steps, "seconds": seconds, "final_loss": res.final_loss}
        print(
            f"seed {seed} {name}: forget {before['forget_acc']:.2f}->{after['forget_acc']:.2f} "
            f"retain {before['retain_acc']:.2f}->{after['retain_acc']:.2f} fq {after['forget_quality']:.2f}",
            file=sys.stderr,
        )
    return out


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}

    keys = ["forget_acc", "forget_nll", "retain_acc", "retain_heldout_acc", "forget_quality"]
    out: dict[str, Any] = {"before": {k: ms([r["before"][k] for r in runs]) for k in keys}}
    for m in methods:
        s = {k: ms([r["after"][m][k] for r in runs]) for k in keys}
        # per-seed checks of the target, then aggregated
        rel = [r["after"][m]["forget_acc"] / max(r["before"]["forget_acc"], 1e-9) for r in runs]
        drop = [r["before"]["retain_acc"] - r["after"][m]["retain_acc"] for r in runs]
        s["forget_acc_relative"] = ms(rel)
        s["retain_acc_drop"] = ms(drop)
        s["target_met_seeds"] = sum(a <= 0.10 and d <= 0.05 for a, d in zip(rel, drop, strict=True))
        s["seconds"] = ms([r["after"][m]["seconds"] for r in runs])
        out[m] = s
    return out


def table(summary: dict[str, Any], methods: list[str], n_seeds: int) -> str:
    cols = ["forget_acc", "forget_nll", "retain_acc", "retain_heldout_acc", "forget_quality"]
    head = f"{'model':<13}" + "".join(f"{c:>22}" for c in cols) + f"{'target seeds':>14}"
    lines = [head]
    for row in ["before", *methods]:
        s = summary[row]
        cells = "".join(f"{s[c]['mean']:>14.3f} ± {s[c]['std']:<5.3f}" for c in cols)
        tgt = f"{s['target_met_seeds']}/{n_seeds}" if row != "before" else "-"
        lines.append(f"{row:<13}{cells}{tgt:>14}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--facts", type=int, default=40, help="capitals learned by the adapter")
    ap.add_argument("--forget", type=int, default=10, help="of which this many are forgotten")
    ap.add_argument(
        "--retain-fraction", type=float, default=0.67, help="share of retained facts given to rt/kl"
    )
    ap.add_argument(
        "--pretrain-steps", type=int, default=150, help="tiny-llama only: full training on format"
    )
    ap.add_argument("--learn-epochs", type=float, default=40.0)
    ap.add_argument("--learn-lr", type=float, default=3e-3)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=10.0, help="unlearning epochs over the forget set")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--lr", type=float, default=1e-4, help="unlearning lr; at 1e-3 every method collapses the tiny model"
    )
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--max-answer-chars", type=int, default=12, help="skip capitals with longer names")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: leave the default")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    loaded = load_model(ModelConfig(name=args.model))
    rows = [r for r in capitals() if len(r["completion"]) <= args.max_answer_chars]
    # fixed seed: which capitals are benchmark facts does not change with --seeds
    random.Random(1234).shuffle(rows)
    facts, other = rows[: args.facts], rows[args.facts :]
    if args.model == "tiny-llama":  # a random model barely learns through LoRA: teach it the format first
        tok = loaded.tokenizer
        pretrain_tiny(
            loaded,
            [prompt_text(tok, e.messages) + e.answer for e in examples(other)],
            steps=args.pretrain_steps,
        )
    base = loaded.model
    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, target_modules="all-linear")
    runs = [run_seed(s, base, loaded, facts, args, lora) for s in args.seeds]
    summary = summarise(runs, args.methods)
    result = {
        "benchmark": "unlearn",
        "model": args.model,
        "device": str(loaded.device),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lora": lora.model_dump(mode="json"),
        "target": "npo_rt: forget_acc <= 10% of its start, retain_acc within 5 points",
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    if args.table:
        print(table(summary, args.methods, len(args.seeds)), file=sys.stderr)


if __name__ == "__main__":
    main()
