"""Evaluation: per-task scorers by name, batched greedy generation, the accuracy matrix R and
the continual-learning metrics (AP, BWT, FWT, forgetting), a heatmap of R."""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cltune.data import Example, encode_prompt, left_pad
from cltune.methods.common import using_adapter

# ---------------------------------------------------------------- scorers: (prediction, reference) -> [0, 1]


def _is_punct(c: str) -> bool:
    """ASCII punctuation and symbols, or any Unicode punctuation (typographic quotes, guillemets...)."""
    return c in string.punctuation or unicodedata.category(c).startswith("P")


def _strip_token(tok: str) -> str:
    """Punctuation off both edges of one token, keeping a leading '-' / '.' / '-.' before a digit."""
    i, j = 0, len(tok)
    while j > i and _is_punct(tok[j - 1]):
        j -= 1
    while i < j and _is_punct(tok[i]):
        i += 1
    if i < j and tok[i].isdigit():  # a number keeps its sign and leading point: "-3", ".5", "-.5"
        i -= next((len(p) for p in ("-.", "-", ".") if tok[:i].endswith(p)), 0)
    return tok[i:j]


def normalize(text: str) -> str:
    """Lower-case, whitespace-separated tokens stripped of edge punctuation, joined by one space.

    Punctuation inside a token ("3.5", "1,000", "soixante-dix") and a number's sign ("-3") are kept;
    a token of punctuation only ("-", "...") disappears.
    """
    return " ".join(t for t in map(_strip_token, text.lower().split()) if t)


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(0) if m else None


# Explicit option forms, most explicit first; each captures the letter in group 1.
_OPTION_FORMS = [
    re.compile(r"^\W*([A-Da-d])\W*$"),  # the whole output is one letter: "B", "b", "(C)", "d."
    re.compile(r"^\s*\(?([A-D])[).:]"),  # at the start: "B) ...", "(C) Paris", "A. cats", "B: dogs"
    re.compile(r"\b(?i:answer|option|choice)(?:\s+is)?\s*:?\s*\(?([A-D])\b"),  # "answer is D", "Answer: B"
    re.compile(r"\(?\b([A-D])\)"),  # "(B)" or "B)" anywhere
]


def option_letter(text: str) -> str | None:
    """The multiple-choice letter A-D an output gives, or None.

    Explicit forms win, in the order of _OPTION_FORMS; otherwise the first standalone capital A-D,
    skipping the article "A" (a capital A, a space, then a lower-case word other than "is"). A lower-case
    letter counts only when it is the whole output ("a", "(b)"): inside text it is a word.
    """
    for form in _OPTION_FORMS:
        if m := form.search(text):
            return m.group(1).upper()
    for m in re.finditer(r"\b[A-D]\b", text):
        if m.group(0) == "A" and re.match(r"\s+(?!is\b)[a-z]", text[m.end() :]):
            continue  # "A good answer": the article
        return m.group(0)
    return None


def choice(pred: str, ref: str) -> float:
    """The option letter of the output (option_letter) against the reference's (or its first char)."""
    p, r = option_letter(pred), option_letter(ref) or ref.strip()[:1]
    return float(p is not None and p == r)


def first_number(pred: str, ref: str) -> float:
    """First number in the output against the last number of the reference (GSM8K's '#### 42')."""
    nums = re.findall(r"-?\d[\d,]*\.?\d*", ref)
    p = _first(r"-?\d[\d,]*\.?\d*", pred)
    if p is None or not nums:
        return 0.0

    def clean(s: str) -> str:
        return s.replace(",", "").rstrip(".")

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
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    texts: dict[int, str] = {}
    with using_adapter(model, adapter):
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
    return [texts[i] for i in range(len(prompts))]


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


def cl_metrics(
    R: list[list[float]],
    bwt_normalizer: str = "T-1",
    unlearning: Sequence[bool] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """AP, BWT, FWT and forgetting from the (T+1) x T matrix R (row 0: the untrained model).

    R[t][i] is the score on task i after training tasks 1..t. BWT and FWT use 1/(T-1) by
    default; TRACE divides BWT by T. Both BWT variants are returned; `bwt` is the chosen one.

    unlearning: per task, True for an unlearning task, whose column scores its forget set (lower is
    better). Those columns are left out of AP, BWT, FWT and forgetting, which then cover the L learning
    tasks (normalisers: L and the number of them followed by a later task), and are reported apart:
    metrics["unlearning"][name] = {before, right_after, after}: R before the task, right after it, at the end.
    """
    T = len(R[0])
    if len(R) != T + 1 or any(len(row) != T for row in R):
        raise ValueError(f"R must be (T+1) x T; got {len(R)} rows for T={T}")
    flags = list(unlearning) if unlearning is not None else [False] * T
    learn = [i for i in range(T) if not flags[i]]
    ap = sum(R[T][i] for i in learn) / len(learn) if learn else 0.0
    followed = [i for i in learn if i < T - 1]  # learning tasks with a later task that may forget them
    diffs = [R[T][i] - R[i + 1][i] for i in followed]  # R[i+1][i]: task i right after training it
    bwt_t1 = sum(diffs) / len(diffs) if diffs else 0.0
    bwt_t = sum(diffs) / len(learn) if learn else 0.0
    later = [i for i in learn if i >= 1]  # FWT: tasks with an earlier task that may have helped
    fwt = sum(R[i][i] - R[0][i] for i in later) / len(later) if later else 0.0
    # forgetting: best score before the end minus the final one (l as in the paper)
    forget = [max(R[l][j] for l in range(j + 1, T)) - R[T][j] for j in followed]  # noqa: E741
    return {
        "T": T,
        "learning_tasks": len(learn),
        "ap": ap,
        "bwt": bwt_t1 if bwt_normalizer == "T-1" else bwt_t,
        "bwt_normalizer": bwt_normalizer,
        "bwt_T-1": bwt_t1,
        "bwt_T": bwt_t,
        "fwt": fwt,
        "forgetting": sum(forget) / len(forget) if forget else 0.0,
        "forgetting_per_task": forget,
        "unlearning": {
            (names[i] if names is not None else str(i)): {
                "before": R[i][i],
                "right_after": R[i + 1][i],
                "after": R[T][i],
            }
            for i in range(T)
            if flags[i]
        },
    }


def format_matrix(
    R: list[list[float]], tasks: list[str], general: dict[str, list[float]] | None = None
) -> str:
    """R as a table; `general` adds one column per general-ability probe (its value after each row)."""
    general = general or {}
    width = max(8, *(len(t) for t in [*tasks, *general])) + 2
    lines = ["after".ljust(width) + "".join(t.rjust(width) for t in [*tasks, *general])]
    for t, row in enumerate(R):
        label = "base" if t == 0 else tasks[t - 1]
        extra = [values[t] for values in general.values() if t < len(values)]
        lines.append(label.ljust(width) + "".join(f"{v:.3f}".rjust(width) for v in [*row, *extra]))
    return "\n".join(lines)


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(results, indent=1))
