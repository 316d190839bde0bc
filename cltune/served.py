"""Score what is served. A row of the R matrix scores every task with the adapter its prompts are
answered by: the method's one served adapter, or for DEMA's groups each prompt routed to its group's
adapter (cltune.router, as `model="auto"` serves). For a method that serves an approximation of the
model it trained (Control-LLM's merge-back), the gap between the two is measured per task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cltune.data import Example, tokenize
from cltune.evaluate import score_task
from cltune.methods.base import MethodState
from cltune.models import LoadedModel
from cltune.router import DEFAULT_THRESHOLD, RouterParams, route_group
from cltune.train import validation_loss

if TYPE_CHECKING:
    from cltune.config import RunConfig
    from cltune.task_data import TaskData

Router = Callable[[str], str]  # instruction -> the adapter that answers it


@dataclass(frozen=True)
class Scoring:
    """How one row of R is scored: `how` is said in results.json (`scored_with`)."""

    how: str
    adapter: str | None = None  # every prompt answered by this adapter (None: the base model)
    route: Router | None = None  # set: each prompt answered by the adapter it routes to


BASE_MODEL = Scoring("base model")


def served_scoring(method: Any, state: MethodState, grouped: MethodState | None = None) -> Scoring:
    """The scoring of the row after a task. Routed to groups when the served adapter is one of a
    group set's adapters (DEMA's state: this task's, or `grouped`, the last one kept across another
    method's task, e.g. an unlearning task that unlearned one group in place); else the served adapter,
    described by the method's `served_as` note when it has one (Control-LLM's merge-back)."""
    source = state if state.meta.get("groups") else grouped
    routed = prompt_router(source, method.serve_adapter) if source is not None else None
    if routed is not None:
        return Scoring(routed[1], method.serve_adapter, routed[0])
    how = state.meta.get("notes", {}).get("served_as") or f"served adapter {method.serve_adapter!r}"
    return Scoring(how, method.serve_adapter)


def prompt_router(grouped: MethodState, adapter: str) -> tuple[Router, str] | None:
    """How prompts are answered while `adapter` is the most recent of `grouped`'s adapter groups
    (DEMA's state): (instruction -> the adapter that answers it, said in words), or None when `adapter`
    is not one of the groups'."""
    groups = grouped.meta.get("groups", [])
    recent = next((g["name"] for g in groups if g["adapter"] == adapter), None)
    if recent is None:
        return None
    backend = grouped.meta.get("notes", {}).get("similarity", "tfidf")
    params = RouterParams(backend=backend, fallback="recent")
    how = (
        f"each prompt routed to its group's adapter ({backend} similarity >= "
        f"{DEFAULT_THRESHOLD[backend]}, else the most recent group {recent!r})"
    )
    return group_router(groups, params, recent), how


def group_router(groups: list[dict[str, Any]], params: RouterParams, recent: str) -> Router:
    """instruction -> adapter of the group it routes to. groups: DEMA's [{name, adapter, codebook}]."""
    books = {g["name"]: list(g["codebook"]) for g in groups}
    adapters: dict[str, str] = {g["name"]: g["adapter"] for g in groups}

    def route(instruction: str) -> str:
        choice = route_group(instruction, books, params, recent)
        return adapters[choice.group or recent]  # no group at all never happens: DEMA has >= 1

    return route


def score_column(
    model: Any, tok: Any, d: TaskData, cfg: RunConfig, scoring: Scoring
) -> tuple[float, dict[str, int]]:
    """One task's score under `scoring`. Returns (score, examples per answering adapter)."""
    buckets: dict[str | None, list[Example]] = {}
    for ex in d.eval:
        buckets.setdefault(scoring.route(ex.instruction) if scoring.route else scoring.adapter, []).append(ex)
    total = 0.0
    for adapter, examples in buckets.items():
        total += score_examples(model, tok, d, cfg, examples, adapter) * len(examples)
    used = {adapter or "base": len(examples) for adapter, examples in buckets.items()}
    return (total / len(d.eval) if d.eval else 0.0), used


def score_examples(
    model: Any, tok: Any, d: TaskData, cfg: RunConfig, examples: list[Example], adapter: str | None
) -> float:
    """Task `d`'s scorer on the greedy answers of `adapter` (None: the base model) to `examples`."""
    score, _ = score_task(
        model,
        tok,
        examples,
        d.config.scorer,
        max_new_tokens=d.config.max_new_tokens or cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        adapter=adapter,
    )
    return score


def score_row(
    loaded: LoadedModel, model: Any, data: list[TaskData], cfg: RunConfig, scoring: Scoring
) -> tuple[list[float], dict[str, Any]]:
    """Every task's score under `scoring`. Returns (row, {how, columns: task -> {adapter: examples}})."""
    row, columns = [], {}
    for d in data:
        score, used = score_column(model, loaded.tokenizer, d, cfg, scoring)
        row.append(score)
        columns[d.config.name] = used
    return row, {"how": scoring.how, "columns": columns}


def measure_served(
    loaded: LoadedModel, model: Any, method: Any, d: TaskData, cfg: RunConfig
) -> dict[str, float]:
    """Held-out answer-token CE and score of the model as it answers now with `method.serve_adapter`."""
    items, _ = tokenize(d.eval, loaded.tokenizer, cfg.train.max_len)
    ce = validation_loss(items, loaded.tokenizer.pad_token_id, loaded.device, cfg.eval.batch_size)
    score, _ = score_column(model, loaded.tokenizer, d, cfg, Scoring("", method.serve_adapter))
    return {"ce": ce(model, method), "score": score}


def record_gap(state: MethodState, trained: dict[str, float], served: dict[str, float]) -> dict[str, Any]:
    """Put the trained-vs-served gap in the state's notes (the adapter record's too). Returns it."""
    gap = {
        "trained_ce": trained["ce"],
        "served_ce": served["ce"],
        "ce_gap": served["ce"] - trained["ce"],  # > 0: the served approximation fits the task worse
        "trained_score": trained["score"],
        "served_score": served["score"],
        "score_gap": served["score"] - trained["score"],
        "on": "the task's held-out evaluation set",
    }
    state.meta.setdefault("notes", {})["served_gap"] = gap
    return gap
