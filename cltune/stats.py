"""Intervals for claims: mean and 95% interval over seeds, and when two methods can be told apart.

A claim that one method beats another is made only when their intervals over seeds do not overlap;
otherwise the honest report is "no measurable difference". With n seeds the interval is the
Student-t one, mean +- t(0.975, n-1) * sd / sqrt(n) (n = 3: +- 2.48 sd). A single score on n_eval
held-out examples also has a sampling interval of its own (Wilson, `score_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

METRICS = ("ap", "bwt", "forgetting", "fwt")  # what summarize_runs aggregates from each run's metrics


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """{mean, lo, hi, sd, n} of `values`; with one value the interval is that value (nothing to say)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "sd": 0.0, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}


def separated(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two intervals from mean_ci do not overlap (and each has at least two seeds)."""
    if a["n"] < 2 or b["n"] < 2:
        return False
    return bool(a["lo"] > b["hi"] or b["lo"] > a["hi"])


def compare(method: dict[str, Any], baseline: dict[str, Any], higher_is_better: bool = True) -> str:
    """ "better" | "worse" | "no measurable difference", by non-overlapping intervals."""
    if not separated(method, baseline):
        return "no measurable difference"
    ahead = method["mean"] > baseline["mean"]
    return "better" if ahead == higher_is_better else "worse"


def score_interval(score: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of an accuracy measured on n examples (one run, one seed)."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (score + z * z / (2 * n)) / denom
    half = z * math.sqrt(score * (1 - score) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize_runs(metrics: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """mean_ci of AP, BWT, forgetting and FWT over runs (one metrics dict per seed)."""
    return {k: mean_ci([m[k] for m in metrics]) for k in METRICS if all(k in m for m in metrics)}


def fmt(ci: dict[str, Any], digits: int = 3) -> str:
    """'0.412 [0.380, 0.444]' (mean [95% interval])."""
    if ci["n"] < 2:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


def summarize_results(
    results: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Aggregate repeated runs of one configuration (e.g. seeds 0, 1, 2) from their results
    ({tasks, R, metrics, general}, as results.json and a job's result hold them).

    Returns {n, metrics: {ap, bwt, ...: mean_ci}, final: {task: mean_ci of R[T][task]},
    general_retention: {probe: mean_ci}} and, with `baseline` runs, `versus_baseline`: per metric
    "better" | "worse" | "no measurable difference" (forgetting: lower is better).

    Raises:
        ValueError: no runs, or runs of different task sequences.
    """
    if not results:
        raise ValueError("no runs to summarise")
    tasks = results[0].get("tasks")
    if any(r.get("tasks") != tasks for r in results):
        raise ValueError("runs of different task sequences cannot be summarised together")
    out: dict[str, Any] = {"n": len(results), "tasks": tasks}
    out["metrics"] = summarize_runs([r["metrics"] for r in results])
    out["final"] = {t: mean_ci([r["R"][-1][i] for r in results]) for i, t in enumerate(tasks or [])}
    probes = set.intersection(*(set(r.get("general") or {}) for r in results))
    out["general_retention"] = {
        p: mean_ci([r["general"][p]["retention"] for r in results])
        for p in sorted(probes)
        if all(r["general"][p].get("retention") is not None for r in results)
    }
    if baseline:
        base = summarize_results(baseline)
        out["baseline"] = {"n": base["n"], "metrics": base["metrics"]}
        out["versus_baseline"] = {
            k: compare(v, base["metrics"][k], higher_is_better=k != "forgetting")
            for k, v in out["metrics"].items()
            if k in base["metrics"]
        }
    return out
