"""Choose the adapter that serves a request: explicit name > group similarity (`auto`) > base model.

`model` in a request is an adapter name (its latest version), `name@version`, `base`, or `auto`.
For `auto`, the request's instruction is compared with every adapter group's codebook (the
instructions its adapters were trained on; the same data DEMA groups by) with the vectorisers of
`cltune.grouping` (TF-IDF by default, or MiniLM sentence embeddings); the best group above the threshold answers with its newest adapter,
anything else goes to the base model, or (`fallback: recent`) to the most recent group, as DEMA's reference
serves its groups. Every decision is logged with its score. `route_group` is the same choice over any
group -> codebook mapping: a continual run scores DEMA's R matrix with it (cltune.continual).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from cltune.errors import NotFoundError
from cltune.grouping import BACKENDS, subsample
from cltune.registry import AdapterRecord, Registry

log = logging.getLogger("cltune.router")

BASE = "base"
AUTO = "auto"
Reason = Literal[
    "explicit", "base", "auto_match", "auto_below_threshold", "auto_fallback_recent", "auto_no_adapters"
]


class RouterParams(BaseModel):
    backend: Literal["tfidf", "minilm"] = "tfidf"  # similarity function from cltune.grouping.BACKENDS
    # Centroid cosine a group needs for `auto` to pick it; None: the backend's default below.
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    # When no group clears the threshold: "base" (the base model answers) or "recent" (the most recent
    # group answers: DEMA's reference; a continual run scores DEMA's groups so).
    fallback: Literal["base", "recent"] = "base"


# Measured on the demo tasks (capitals, French numbers, sentiment; 200-instruction codebooks): held-out
# instructions score >= 0.16 (1st percentile 0.21) with TF-IDF and >= 0.61 with MiniLM against their own
# group; unrelated prompts score <= 0.18 with TF-IDF (except look-alikes of a template, e.g. "What is the
# meaning of life?" 0.29 against "What is the capital of X?") and <= 0.36 with MiniLM.
DEFAULT_THRESHOLD = {"tfidf": 0.2, "minilm": 0.5}


@dataclass(frozen=True)
class Route:
    """Which adapter serves a request, and why."""

    record: AdapterRecord | None  # None: the base model
    reason: Reason
    score: float | None = None  # similarity of the chosen (or best rejected) group, for `auto`
    group: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # every group's similarity, for `auto`

    @property
    def served_by(self) -> str:
        """'name@version' of the adapter, or 'base'."""
        return self.record.ref if self.record is not None else BASE


def groups_of(records: list[AdapterRecord]) -> tuple[dict[str, list[str]], dict[str, AdapterRecord]]:
    """Group name -> pooled codebook, and group name -> the newest adapter of that group.

    Records without a group form a group of their own name; records without a codebook are skipped
    (nothing to match against).
    """
    books: dict[str, list[str]] = {}
    newest: dict[str, AdapterRecord] = {}
    parents = {r.parent for r in records if r.parent}
    # created_at has one-second resolution: within a second, a parent sorts before its child (an
    # unlearned child must win its parent's group)
    for rec in sorted(records, key=lambda r: (r.created_at, r.ref not in parents, r.name, r.version)):
        if not rec.codebook:
            continue
        g = rec.group or rec.name
        books.setdefault(g, []).extend(rec.codebook)
        newest[g] = rec  # sorted by creation: the last one wins
    return books, newest


def group_scores(instruction: str, books: dict[str, list[str]], backend: str = "tfidf") -> dict[str, float]:
    """Cosine between the instruction and each group's centroid, all in one vector space.

    TF-IDF is fitted once on the instruction plus every group's codebook, so a group's template words
    are rare across groups and weigh a lot, while words every group uses weigh little (fitting per group,
    as `grouping.similarity` does for DEMA, gives templates no such contrast). MiniLM codebook centroids
    are cached: embedding 200 instructions per group takes seconds on a CPU.
    """
    names = list(books)
    if backend == "minilm":
        x, _ = BACKENDS["minilm"]([instruction], [instruction])  # [1, 384], unit rows
        cents = [_minilm_centroid(tuple(books[g])) for g in names]
        return {g: _cos(np.asarray(x)[0], c) for g, c in zip(names, cents, strict=True)}
    pooled = [t for g in names for t in books[g]]
    x, y = BACKENDS[backend]([instruction], pooled)  # [1, V], [N, V] (sparse for tfidf)
    x, y = _dense(x)[0], _dense(y)
    out, start = {}, 0
    for g in names:
        n = len(books[g])
        out[g] = _cos(x, y[start : start + n].mean(0))
        start += n
    return out


def _dense(m: object) -> np.ndarray:
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    n = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / n if n > 0 else 0.0


@functools.lru_cache(maxsize=256)
def _minilm_centroid(book: tuple[str, ...]) -> np.ndarray:
    _, y = BACKENDS["minilm"](book[:1], book)  # [N, 384]
    centroid: np.ndarray = np.asarray(y).mean(0)
    return centroid


@dataclass(frozen=True)
class GroupChoice:
    """The group that answers an instruction (None: the base model), and why."""

    group: str | None
    reason: Reason
    score: float | None = None  # similarity of the best group (the one rejected, below the threshold)
    scores: dict[str, float] = field(default_factory=dict)


def route_group(
    instruction: str,
    books: dict[str, list[str]],
    params: RouterParams | None = None,
    recent: str | None = None,
) -> GroupChoice:
    """The most similar group if it clears the threshold, else `recent` (fallback "recent") or none.

    Args:
        books: group name -> codebook (instructions its adapters were trained on), oldest group first.
        recent: the most recent group (the newest adapter's), for `params.fallback == "recent"`.
    """
    params = params or RouterParams()
    threshold = params.threshold if params.threshold is not None else DEFAULT_THRESHOLD[params.backend]
    if not books:
        return GroupChoice(None, "auto_no_adapters")
    scores = group_scores(instruction, {g: subsample(b) for g, b in books.items()}, params.backend)
    best = max(scores, key=lambda g: scores[g])  # ties: the oldest group
    if scores[best] >= threshold:
        return GroupChoice(best, "auto_match", scores[best], scores)
    if params.fallback == "recent" and recent in books:
        return GroupChoice(recent, "auto_fallback_recent", scores[best], scores)
    return GroupChoice(None, "auto_below_threshold", scores[best], scores)


def route_auto(instruction: str, registry: Registry, params: RouterParams | None = None) -> Route:
    """Send `instruction` to the newest adapter of the most similar group, or to the fallback."""
    books, newest = groups_of(registry.list())
    recent = max(newest, key=lambda g: newest[g].created_at) if newest else None
    c = route_group(instruction, books, params, recent)
    record = newest[c.group] if c.group is not None else None
    score = c.scores[c.group] if c.reason == "auto_fallback_recent" and c.group is not None else c.score
    best = max(c.scores, key=lambda g: c.scores[g]) if c.scores else None
    route = Route(record, c.reason, score, c.group or best, c.scores)
    log.info(
        "route auto -> %s (%s, score=%s, group=%s)", route.served_by, route.reason, route.score, route.group
    )
    return route


def choose(model: str, instruction: str, registry: Registry, params: RouterParams | None = None) -> Route:
    """Resolve a request's `model` field to a Route.

    Args:
        model: adapter name, name@version, "base" or "auto".
        instruction: the text `auto` compares (the last user message, or the completion prompt).
        registry: the caller's (tenant's) adapter registry: nothing outside it is reachable.

    Raises:
        NotFoundError: the named adapter (or version) does not exist in `registry`.
        InvalidNameError: `model` is not a valid adapter reference.
    """
    if model == BASE:
        return Route(None, "base")
    if model == AUTO:
        return route_auto(instruction, registry, params)
    try:
        rec = registry.get(model)
    except NotFoundError as e:
        raise NotFoundError(
            f"model {model!r} not found: use an adapter name, name@version, 'base' or 'auto'", model=model
        ) from e
    return Route(rec, "explicit")


__all__ = [
    "AUTO",
    "BASE",
    "DEFAULT_THRESHOLD",
    "GroupChoice",
    "Route",
    "RouterParams",
    "choose",
    "group_scores",
    "groups_of",
    "route_auto",
    "route_group",
]
