"""TOFU-style metrics: truth ratio, forget quality, perturbed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import qa_examples

from cltune.unlearn_metrics import answer_nll, forget_quality, perturbed_answers, truth_ratios


def test_perturbed_answers_are_distinct_and_never_the_right_answer():
    answers = ["a", "b", "c", "d", "e"]
    out = perturbed_answers(answers, answers, k=3, seed=0)
    for right, alts in zip(answers, out, strict=True):
        assert len(set(alts)) == 3 and right not in alts
    assert out == perturbed_answers(answers, answers, k=3, seed=0)
    with pytest.raises(ValueError, match="wrong answers"):
        perturbed_answers(["a"], ["a", "b"], k=3)


def test_forget_quality_is_zero_for_identical_samples_and_very_negative_for_disjoint_ones():
    x = np.linspace(0, 1, 30)
    assert forget_quality(x, x) == pytest.approx(0.0)
    assert forget_quality(x, x + 10) < -10


def test_truth_ratio_is_mean_normalised_probability_of_wrong_over_right_answers(tiny):
    ex = qa_examples([("capital of x", "abc"), ("capital of y", "de")])
    pert = [["xyz", "q"], ["hello", "ab"]]
    tr = truth_ratios(tiny.model, tiny.tokenizer, ex, pert)
    nll, n = answer_nll(tiny.model, tiny.tokenizer, ex)
    assert n.tolist() == [4, 3]  # answer bytes + EOS
    for i in range(2):
        alts = qa_examples([(ex[i].instruction, a) for a in pert[i]])
        nll_p, n_p = answer_nll(tiny.model, tiny.tokenizer, alts)
        expected = np.mean(np.exp(-nll_p / n_p)) / math.exp(-nll[i] / n[i])
        assert tr[i] == pytest.approx(expected, rel=1e-5)
