"""Intervals over seeds and the rule for claiming that one method beats another."""

from __future__ import annotations

import math

import pytest

from cltune.stats import compare, fmt, mean_ci, score_interval, separated, summarize_results, summarize_runs


def test_mean_ci_of_three_seeds_is_the_student_t_interval():
    ci = mean_ci([0.30, 0.40, 0.50])
    assert ci["mean"] == pytest.approx(0.40) and ci["sd"] == pytest.approx(0.10) and ci["n"] == 3
    half = 4.302652729911275 * 0.10 / math.sqrt(3)  # t(0.975, 2)
    assert (ci["lo"], ci["hi"]) == pytest.approx((0.40 - half, 0.40 + half))


def test_one_seed_gives_no_interval_and_no_claim():
    one = mean_ci([0.9])
    assert one["lo"] == one["hi"] == 0.9
    assert not separated(one, mean_ci([0.1, 0.1]))
    assert compare(one, mean_ci([0.1, 0.1])) == "no measurable difference"
    with pytest.raises(ValueError):
        mean_ci([])


def test_overlapping_intervals_are_no_measurable_difference():
    a, b = mean_ci([0.40, 0.45, 0.50]), mean_ci([0.35, 0.42, 0.47])
    assert not separated(a, b) and compare(a, b) == "no measurable difference"


def test_separated_intervals_name_the_direction():
    good, base = mean_ci([0.80, 0.82, 0.81]), mean_ci([0.40, 0.42, 0.41])
    assert separated(good, base)
    assert compare(good, base) == "better" and compare(base, good) == "worse"
    assert compare(good, base, higher_is_better=False) == "worse"  # e.g. forgetting


def test_wilson_interval_of_a_score_on_50_examples():
    lo, hi = score_interval(0.5, 50)
    assert lo == pytest.approx(0.366, abs=1e-3) and hi == pytest.approx(0.634, abs=1e-3)
    assert score_interval(0.0, 100)[0] == 0.0 and score_interval(1.0, 100)[1] == pytest.approx(1.0)


def test_summarize_runs_aggregates_every_metric_the_runs_share():
    runs = [{"ap": 0.5, "bwt": -0.1, "forgetting": 0.1}, {"ap": 0.6, "bwt": -0.2, "forgetting": 0.2}]
    out = summarize_runs(runs)
    assert set(out) == {"ap", "bwt", "forgetting"} and out["ap"]["mean"] == pytest.approx(0.55)
    assert fmt(out["ap"]).startswith("0.550 [") and fmt(mean_ci([0.5])) == "0.500"


def run(ap: float, bwt: float, final: list[float], tasks: list[str] | None = None) -> dict:
    return {
        "tasks": tasks or ["a", "b"],
        "R": [[0.0, 0.0], [0.5, 0.0], final],
        "metrics": {"ap": ap, "bwt": bwt, "forgetting": -bwt, "fwt": 0.0},
        "general": {"text_ppl": {"kind": "ppl", "values": [10.0, 11.0], "retention": 10 / 11}},
    }


def test_summarize_results_over_seeds_and_against_a_baseline():
    cl = [run(0.70, -0.01, [0.5, 0.9]), run(0.72, 0.00, [0.52, 0.92]), run(0.71, -0.02, [0.5, 0.92])]
    seq = [run(0.45, -0.40, [0.1, 0.8]), run(0.47, -0.42, [0.12, 0.82]), run(0.46, -0.38, [0.1, 0.82])]
    out = summarize_results(cl, baseline=seq)
    assert out["n"] == 3 and out["final"]["a"]["mean"] == pytest.approx(0.5067, abs=1e-4)
    assert out["versus_baseline"] == {
        "ap": "better",
        "bwt": "better",
        "forgetting": "better",
        "fwt": "no measurable difference",
    }
    assert out["general_retention"]["text_ppl"]["mean"] == pytest.approx(10 / 11)
    same = summarize_results(cl, baseline=cl)
    assert set(same["versus_baseline"].values()) == {"no measurable difference"}


def test_summarize_results_refuses_runs_of_different_sequences():
    with pytest.raises(ValueError, match="different task sequences"):
        summarize_results([run(0.5, 0.0, [0.5, 0.5]), run(0.5, 0.0, [0.5, 0.5], tasks=["x", "y"])])
    with pytest.raises(ValueError, match="no runs"):
        summarize_results([])
