"""Evaluation: CL metrics on hand-written R matrices, scorers, batched generation, the heatmap."""

from __future__ import annotations

import pytest
from conftest import qa_examples
from peft.tuners.lora import LoraLayer

from cltune.config import LoraConfig
from cltune.data import encode_prompt
from cltune.evaluate import (
    SCORERS,
    choice,
    cl_metrics,
    exact_match,
    first_number,
    format_matrix,
    generate,
    rouge_l,
    score_task,
)
from cltune.methods.common import attach_adapter, peft_lora_config
from cltune.plots import save_heatmap

# Row t: scores after training tasks 1..t; row 0: the untrained model. T = 3.
R3 = [
    [0.10, 0.20, 0.00],
    [0.90, 0.30, 0.10],
    [0.95, 0.80, 0.20],
    [0.50, 0.40, 0.70],
]


def test_cl_metrics_on_a_hand_written_matrix():
    m = cl_metrics(R3)
    # AP: mean of the last row.
    assert m["ap"] == pytest.approx((0.50 + 0.40 + 0.70) / 3)
    # BWT: final score minus the score right after learning, tasks 1..T-1.
    diffs = [0.50 - 0.90, 0.40 - 0.80]
    assert m["bwt_T-1"] == pytest.approx(sum(diffs) / 2) == pytest.approx(-0.4)
    assert m["bwt_T"] == pytest.approx(sum(diffs) / 3)
    assert m["bwt"] == m["bwt_T-1"] and m["bwt_normalizer"] == "T-1"
    # FWT: score on task i just before training it, minus the base score, tasks 2..T.
    assert m["fwt"] == pytest.approx(((0.30 - 0.20) + (0.20 - 0.00)) / 2)
    # Forgetting: best score seen before the end (task 1 peaked at 0.95 after task 2) minus final.
    assert m["forgetting_per_task"] == pytest.approx([0.95 - 0.50, 0.80 - 0.40])
    assert m["forgetting"] == pytest.approx((0.45 + 0.40) / 2)
    assert m["T"] == 3


def test_trace_normaliser_is_selectable_and_both_are_recorded():
    m = cl_metrics(R3, bwt_normalizer="T")
    assert m["bwt"] == pytest.approx(-0.8 / 3) and m["bwt_normalizer"] == "T"
    assert m["bwt_T-1"] == pytest.approx(-0.4)


def test_no_forgetting_gives_zero_bwt_and_positive_fwt():
    R = [[0.0, 0.0], [1.0, 0.5], [1.0, 1.0]]
    m = cl_metrics(R)
    assert m["bwt"] == 0.0 and m["forgetting"] == 0.0
    assert m["fwt"] == pytest.approx(0.5) and m["ap"] == pytest.approx(1.0)


def test_single_task_has_no_transfer_terms():
    m = cl_metrics([[0.2], [0.7]])
    assert m["ap"] == pytest.approx(0.7)
    assert (m["bwt"], m["fwt"], m["forgetting"]) == (0.0, 0.0, 0.0)


def test_malformed_matrix_is_rejected():
    with pytest.raises(ValueError, match=r"\(T\+1\) x T"):
        cl_metrics([[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError):
        cl_metrics([[0.1, 0.2], [0.3], [0.5, 0.6]])


def test_format_matrix_labels_rows_and_columns():
    text = format_matrix(R3, ["a", "b", "c"])
    lines = text.splitlines()
    assert lines[1].startswith("base") and lines[2].startswith("a") and "0.950" in lines[3]


# ---------------------------------------------------------------- scorers


@pytest.mark.parametrize(
    ("pred", "ref", "score"),
    [
        ("The  Answer!", "the answer", 1.0),
        ("Paris.", "paris", 1.0),
        ("paris france", "paris", 0.0),
        ("", "x", 0.0),
    ],
)
def test_exact_match_normalises_case_punctuation_and_spaces(pred, ref, score):
    assert exact_match(pred, ref) == score


@pytest.mark.parametrize(
    ("pred", "ref", "score"),
    [
        ("-3", "3", 0.0),  # a leading minus is part of the number
        ("3.5", "35", 0.0),  # punctuation inside a token is kept
        ("1,000", "1000", 0.0),
        ("Paris.", "paris", 1.0),  # punctuation at a token's edges is dropped
        ('"Tirana"', "Tirana", 1.0),
        ("\u201cTirana\u201d", "tirana", 1.0),  # typographic quotes too
        ("(-3).", "-3", 1.0),
        ("  quatre cent trente ", "quatre cent trente", 1.0),
        ("soixante-dix", "soixante-dix", 1.0),
        ("soixante dix", "soixante-dix", 0.0),
        ("It is -3.5!", "it is -3.5", 1.0),
        ("a - b", "a b", 1.0),  # a token of punctuation only disappears
    ],
)
def test_exact_match_strips_punctuation_only_at_token_edges_and_keeps_signs(pred, ref, score):
    assert exact_match(pred, ref) == score


@pytest.mark.parametrize(
    ("pred", "ref", "score"),
    [
        ("B) because it is", "B", 1.0),
        ("Answer: C", "C", 1.0),  # the 'A' of 'Answer' is not a standalone letter
        ("A", "B", 0.0),
        ("none of them", "D", 0.0),
        ("(D)", "The answer is D", 1.0),
    ],
)
def test_choice_takes_the_first_standalone_letter(pred, ref, score):
    assert choice(pred, ref) == score


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("B", "B"),
        ("(C) Paris", "C"),
        ("The answer is D.", "D"),
        ("Answer: B", "B"),
        ("the correct option is (C)", "C"),
        ("A good answer is B", "B"),  # 'A' as an article is not an option
        ("A) cats", "A"),
        ("A. cats", "A"),
        ("B: dogs", "B"),
        ("A", "A"),
        ("A is correct", "A"),  # 'A is' is no article
        ("I would pick C because", "C"),
        ("A cat, then D)", "D"),
        ("a", "A"),  # a lone letter in any case is an answer ...
        ("(b)", "B"),
        ("a cat", None),  # ... but a lower-case letter inside text is a word
        ("A dog barks", None),
        ("Dogs", None),
        ("", None),
    ],
)
def test_choice_prefers_explicit_option_forms_and_skips_the_article_a(pred, letter):
    for ref in "ABCD":
        assert choice(pred, ref) == float(letter == ref), (pred, ref)


@pytest.mark.parametrize(
    ("pred", "ref", "score"),
    [
        ("The answer is 1,234.", "so #### 1234", 1.0),
        ("42 apples, not 7", "#### 42", 1.0),
        ("-3.5", "-3.50", 1.0),
        ("42", "first 41 then #### 43", 0.0),
        ("no number", "5", 0.0),
        ("5", "no number", 0.0),
    ],
)
def test_first_number_compares_with_the_last_reference_number(pred, ref, score):
    assert first_number(pred, ref) == score


def test_rouge_l_is_the_lcs_f_measure():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dogs bark", "the cat sat") == 0.0
    # LCS 3 tokens: precision 3/3, recall 3/6 -> F = 2/3
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)


def test_scorers_are_registered_by_name():
    assert set(SCORERS) == {"exact_match", "choice", "first_number", "rouge_l"}


# ---------------------------------------------------------------- generation on the tiny model


def test_batched_left_padded_generation_matches_one_by_one(tiny):
    prompts = [
        encode_prompt(tiny.tokenizer, ex.messages)
        for ex in qa_examples([("hi", "x"), ("a much longer question here", "y"), ("mid size one", "z")])
    ]
    one = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6, batch_size=1)
    many = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert one == many and len(one) == 3


def test_score_task_averages_per_example_scores(tiny):
    ex = qa_examples([("q1", "a"), ("q2", "b")])
    score, rows = score_task(tiny.model, tiny.tokenizer, ex, "exact_match", max_new_tokens=3)
    assert len(rows) == 2 and {"prompt", "reference", "prediction", "score"} <= set(rows[0])
    assert score == pytest.approx(sum(r["score"] for r in rows) / 2)


def test_generate_uses_the_named_adapter_or_none_and_restores_training_state(tiny, monkeypatch):
    model = attach_adapter(tiny.model, "default", peft_lora_config(LoraConfig(r=4, alpha=8)))
    attach_adapter(model, "other", peft_lora_config(LoraConfig(r=4, alpha=8)))
    model.set_adapter("other")
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    real = model.generate

    def spy(**kw):  # what the adapters look like while generating (decoded text of a random model is
        # mostly undecodable bytes, so compare the adapter state rather than the strings)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        seen.append(
            (
                {m.disable_adapters for m in layers},
                {a for m in layers for a in m.active_adapters},
                model.training,
            )
        )
        return real(**kw)

    monkeypatch.setattr(model, "generate", spy)
    prompts = [encode_prompt(tiny.tokenizer, ex.messages) for ex in qa_examples([("hello there", "x")])]
    generate(model, tiny.tokenizer, prompts, max_new_tokens=4, adapter=None)
    generate(model, tiny.tokenizer, prompts, max_new_tokens=4, adapter="default")
    assert seen == [({True}, {"other"}, False), ({False}, {"default"}, False)]
    # afterwards: training mode, active adapter and requires_grad flags as they were
    assert model.training and model.active_adapter == "other"
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))


def test_heatmap_writes_a_png(tmp_path):
    out = save_heatmap(R3, ["a", "b", "c"], tmp_path / "R.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
