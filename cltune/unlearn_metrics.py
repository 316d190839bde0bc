"""TOFU-style unlearning metrics, in miniature: per-example answer NLL, truth ratio, forget quality.

Truth ratio (TOFU, Maini et al. 2024) of a question q with correct answer a and perturbed (wrong) answers
a'_1..a'_k, with length-normalised probabilities P(a|q)^(1/|a|):
    R_truth = mean_k P(a'_k|q)^(1/|a'_k|) / P(a|q)^(1/|a|)
TOFU puts a paraphrase of a in the denominator; with no paraphrases here, the answer itself is used.
Forget quality = log10 of the two-sample KS-test p-value between the truth ratios of the unlearned model
and of a model never trained on the forget set (0 is best: indistinguishable; very negative: different).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from cltune.data import Example, tokenize
from cltune.methods.npo import dataset_nll


def answer_nll(
    model: nn.Module, tokenizer: Any, examples: list[Example], max_len: int = 256, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(NLL_sum, answer-token count) per example under `model`'s active adapter (answer + EOS)."""
    items, _ = tokenize(examples, tokenizer, max_len)
    device = next(model.parameters()).device
    nll = dataset_nll(model, items, tokenizer.pad_token_id, device, batch_size).cpu().numpy()
    n = np.array([sum(1 for t in x["labels"] if t != -100) for x in items], dtype=np.float64)
    return nll.astype(np.float64), n


def perturbed_answers(answers: list[str], pool: list[str], k: int = 3, seed: int = 0) -> list[list[str]]:
    """k distinct wrong answers per example, drawn from `pool` (answers different from the right one)."""
    rng = random.Random(seed)
    out = []
    for a in answers:
        wrong = sorted({p for p in pool if p != a})
        if len(wrong) < k:
            raise ValueError(f"need at least {k} distinct wrong answers in the pool; got {len(wrong)}")
        out.append(rng.sample(wrong, k))
    return out


def truth_ratios(
    model: nn.Module, tokenizer: Any, examples: list[Example], perturbed: list[list[str]], max_len: int = 256
) -> np.ndarray:
    """R_truth per example (see module docstring). Returns [N]; lower means the right answer is preferred."""
    nll, n = answer_nll(model, tokenizer, examples, max_len)
    log_p_true = -nll / n  # [N] log of the length-normalised probability
    k = len(perturbed[0])
    flat = [replace(ex, answer=alt) for ex, alts in zip(examples, perturbed, strict=True) for alt in alts]
    nll_p, n_p = answer_nll(model, tokenizer, flat, max_len)
    p_pert = np.exp(-nll_p / n_p).reshape(len(examples), k).mean(axis=1)  # [N] mean over perturbations
    ratios: np.ndarray = np.exp(np.log(p_pert) - log_p_true)
    return ratios


def forget_quality(unlearned: np.ndarray, reference: np.ndarray) -> float:
    """log10 of the KS-test p-value between two truth-ratio samples (0: same distribution)."""
    from scipy.stats import ks_2samp

    p = float(ks_2samp(unlearned, reference).pvalue)
    return math.log10(max(p, 1e-300))
