"""Instruction similarity and the retrain / expand decision (cltune.grouping)."""

from __future__ import annotations

import numpy as np
import pytest

from cltune.errors import UnknownNameError
from cltune.grouping import decide, similarity, subsample

CAPITALS = [
    f"What is the capital of {c}?" for c in ["France", "Peru", "Chad", "Laos", "Fiji", "Oman", "Mali"]
]
FRENCH = [f"Write the number {n} in French words." for n in [3, 17, 42, 99, 250, 611, 808]]
REVIEWS = [
    "Is this movie review positive or negative?\nReview: " + r
    for r in ["a gem of a film", "dull and slow", "wonderful cast", "I walked out"]
]


def test_identical_sets_score_one_and_disjoint_vocabularies_score_zero():
    assert similarity(CAPITALS, CAPITALS) == pytest.approx(1.0)
    assert similarity(["alpha beta"], ["gamma delta"]) == 0.0
    assert similarity([], CAPITALS) == 0.0


def test_one_template_scores_far_above_different_templates():
    same = similarity(CAPITALS[:3], CAPITALS[3:])
    assert same > 0.7
    assert similarity(CAPITALS, FRENCH) < 0.3 and similarity(CAPITALS, REVIEWS) < 0.3


def test_mean_pairwise_is_the_mean_of_all_pairwise_cosines():
    from sklearn.feature_extraction.text import TfidfVectorizer

    x = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit_transform(CAPITALS[:3] + FRENCH[:4]).toarray()
    pairwise = x[:3] @ x[3:].T  # rows are unit vectors: dot == cosine
    got = similarity(CAPITALS[:3], FRENCH[:4], reduce="mean_pairwise")
    assert got == pytest.approx(float(np.mean(pairwise)))
    assert similarity(CAPITALS[:3], CAPITALS[3:], reduce="mean_pairwise") < similarity(
        CAPITALS[:3], CAPITALS[3:]
    )


def test_decide_retrains_the_most_similar_group_above_the_threshold():
    groups = {"fr": FRENCH, "cap": CAPITALS[:4], "rev": REVIEWS}
    d = decide(CAPITALS[4:], groups, threshold=0.5)
    assert (d.group, d.action) == ("cap", "retrain")
    assert d.score == d.scores["cap"] == max(d.scores.values())
    assert set(d.scores) == {"fr", "cap", "rev"}


def test_decide_expands_below_the_threshold_but_names_the_closest_group():
    d = decide(["Translate 'cat' into German."], {"fr": FRENCH, "cap": CAPITALS}, threshold=0.5)
    assert d.action == "expand" and d.group in {"fr", "cap"} and d.score < 0.5


def test_decide_without_groups_expands():
    d = decide(CAPITALS, {}, threshold=0.0)
    assert (d.group, d.score, d.action) == (None, 0.0, "expand")


def test_ties_go_to_the_oldest_group():
    d = decide(CAPITALS, {"old": CAPITALS, "new": list(CAPITALS)}, threshold=0.5)
    assert d.group == "old"


def test_unknown_backend_or_reduction_is_refused_with_the_choices():
    with pytest.raises(UnknownNameError, match="tfidf"):
        similarity(CAPITALS, FRENCH, backend="bm25")
    with pytest.raises(UnknownNameError, match="centroid"):
        similarity(CAPITALS, FRENCH, reduce="max")


def test_subsample_is_deterministic_capped_and_keeps_order():
    texts = [str(i) for i in range(1000)]
    a, b = subsample(texts, 50), subsample(texts, 50)
    assert a == b and len(a) == 50 and a == sorted(a, key=int)
    assert subsample(texts[:10], 50) == texts[:10]
