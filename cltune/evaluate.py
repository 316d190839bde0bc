"""Evaluation: per-task scorers by name, batched greedy generation, the accuracy matrix R and
the continual-learning metrics (AP, BWT, FWT, forgetting), a heatmap of R."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from cltune.data import Example, encode_prompt, left_pad
from cltune.methods.common import preserved_training_state

# ---------------------------------------------------------------- scorers: (prediction, reference) -> [0, 1]

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(0) if m else None


def choice(pred: str, ref: str) -> float:
    """First standalone letter A-D in the output, as TRACE scores multiple choice."""
    p, r = _first(r"\b[A-D]\b", pred), _first(r"\b[A-D]\b", ref) or ref.strip()[:1]
    return float(p is not None and p == r)


def first_number(pred: str, ref: str) -> float:
    """First number in the output against the last number of the reference (GSM8K's '#### 42')."""
    nums = re.findall(r"-?\d[\d,]*\.?\d*", ref)
    p = _first(r"-?\d[\d,]*\.?\d*", pred)
    if p is None or not nums:
        return 0.0
    clean = lambda s: s.replace(",", "").rstrip(".")  # noqa: E731
    try:
        return float(float(clean(p)) == float(clean(nums[-1])))
    except ValueError:
        return 0.0


_rouge = None


def rouge_l(pred: str, ref: str) -> float:
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_rouge.score(ref, pred)["rougeL"].fmeasure)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "choice": choice,
    "first_number": first_number,
    "rouge_l": rouge_l,
}

# ---------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    adapter: str | None = None,
) -> list[str]:
    """Greedy completions of tokenised prompts, left-padded in batches.

    adapter: a peft adapter name to use, or None for the base model (adapters disabled).
    """
    device = next(model.parameters()).device
    out: list[str] = []
    is_peft = isinstance(model, PeftModel)
    with preserved_training_state(model):
        model.eval()
        if is_peft and adapter is not None:
            model.set_adapter(adapter)
        ctx = model.disable_adapter() if is_peft and adapter is None else nullcontext()
        with ctx:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
            texts: dict[int, str] = {}
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                ids, mask = left_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                for row, i in enumerate(idx):
                    texts[i] = tokenizer.decode(gen[row, ids.shape[1] :], skip_special_tokens=True).strip()
            out = [texts[i] for i in range(len(prompts))]
    return out


def score_task(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    scorer: str,
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    adapter: str | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Mean score of the model's greedy answers on `examples`. Returns (score, per-example rows)."""
    fn = SCORERS[scorer]
    prompts = [encode_prompt(tokenizer, ex.messages) for ex in examples]
    preds = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, adapter=adapter
    )
    rows: list[dict[str, Any]] = [
        {"prompt": ex.instruction, "reference": ex.answer, "prediction": p, "score": fn(p, ex.answer)}
        for ex, p in zip(examples, preds, strict=True)
    ]
    return (sum(r["score"] for r in rows) / len(rows) if rows else 0.0), rows


# ---------------------------------------------------------------- continual-learning metrics


def cl_metrics(R: list[list[float]], bwt_normalizer: str = "T-1") -> dict[str, Any]:
    """AP, BWT, FWT and forgetting from the (T+1) x T matrix R (row 0: the untrained model).

    R[t][i] is the score on task i after training tasks 1..t. BWT and FWT use 1/(T-1) by
    default; TRACE divides BWT by T. Both BWT variants are returned; `bwt` is the chosen one.
    """
    T = len(R[0])
    if len(R) != T + 1 or any(len(row) != T for row in R):
        raise ValueError(f"R must be (T+1) x T; got {len(R)} rows for T={T}")
    ap = sum(R[T]) / T
    diffs = [R[T][i] - R[i + 1][i] for i in range(T - 1)]  # R[i+1][i]: task i right after training it
    bwt_t1 = sum(diffs) / (T - 1) if T > 1 else 0.0
    bwt_t = sum(diffs) / T
    fwt = sum(R[i][i] - R[0][i] for i in range(1, T)) / (T - 1) if T > 1 else 0.0
    forget = []
    for j in range(T - 1):
        best = max(R[l][j] for l in range(j + 1, T))  # noqa: E741 - l as in the paper
        forget.append(best - R[T][j])
    return {
        "T": T,
        "ap": ap,
        "bwt": bwt_t1 if bwt_normalizer == "T-1" else bwt_t,
        "bwt_normalizer": bwt_normalizer,
        "bwt_T-1": bwt_t1,
        "bwt_T": bwt_t,
        "fwt": fwt,
        "forgetting": sum(forget) / len(forget) if forget else 0.0,
        "forgetting_per_task": forget,
    }


def format_matrix(R: list[list[float]], tasks: list[str]) -> str:
    width = max(8, *(len(t) for t in tasks)) + 2
    lines = ["after".ljust(width) + "".join(t.rjust(width) for t in tasks)]
    for t, row in enumerate(R):
        label = "base" if t == 0 else tasks[t - 1]
        lines.append(label.ljust(width) + "".join(f"{v:.3f}".rjust(width) for v in row))
    return "\n".join(lines)


def save_heatmap(R: list[list[float]], tasks: list[str], path: str | Path, title: str = "R matrix") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 1.2 + 0.8 * len(R)))
    im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(R)), ["base"] + [f"after {t}" for t in tasks])
    ax.set_xlabel("evaluated on")
    for t, row in enumerate(R):
        for i, v in enumerate(row):
            ax.text(i, t, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(results, indent=1))
