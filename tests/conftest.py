"""Shared fixtures: the tiny random Llama, JSONL writers, task contexts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cltune.config import LoraConfig, ModelConfig, TrainConfig
from cltune.data import Example, tokenize
from cltune.methods.base import TaskContext
from cltune.models import LoadedModel, load_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tiny() -> LoadedModel:
    """A fresh random tiny-llama (seed 0) on CPU, fp32, eval mode."""
    return load_model(ModelConfig(name="tiny-llama", device="cpu"))


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """write_jsonl(rows, name="x.jsonl") -> path; rows are dicts (dumped) or raw str/bytes lines."""

    def write(rows: list[Any], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        with path.open("wb") as f:
            for r in rows:
                if isinstance(r, bytes):
                    f.write(r + b"\n")
                elif isinstance(r, str):
                    f.write(r.encode() + b"\n")
                else:
                    f.write(json.dumps(r).encode() + b"\n")
        return path

    return write


def qa_examples(pairs: list[tuple[str, str]]) -> list[Example]:
    return [Example(({"role": "user", "content": q},), a, i + 1) for i, (q, a) in enumerate(pairs)]


def make_task(
    loaded: LoadedModel,
    pairs: list[tuple[str, str]],
    *,
    index: int = 0,
    name: str = "t",
    lora: LoraConfig | None = None,
    train: TrainConfig | None = None,
    retain: list[tuple[str, str]] | None = None,
) -> TaskContext:
    """A TaskContext over (question, answer) pairs, tokenised for `loaded`'s tokenizer."""
    train = train or TrainConfig(steps=3, batch_size=4, max_len=64)
    ex = qa_examples(pairs)
    tokens, _ = tokenize(ex, loaded.tokenizer, train.max_len)
    ret = tokenize(qa_examples(retain), loaded.tokenizer, train.max_len)[0] if retain else None
    return TaskContext(
        index,
        name,
        tokens,
        ex,
        lora or LoraConfig(r=4, alpha=8),
        train,
        loaded.tokenizer.pad_token_id,
        loaded.device,
        retain=ret,
    )


@pytest.fixture
def task_factory() -> Callable[..., TaskContext]:
    return make_task


# A few small tasks with distinct templates (byte-level tokenizer: keep them short).
TASK_A = [(f"add one to {i}", str(i + 1)) for i in range(20)]
TASK_B = [
    (f"reverse {w}", w[::-1])
    for w in [
        "abc",
        "dog",
        "cat",
        "sun",
        "map",
        "pen",
        "cup",
        "hat",
        "box",
        "fig",
        "jam",
        "kit",
        "log",
        "mud",
        "nut",
        "owl",
        "pig",
        "rat",
        "sky",
        "toy",
    ]
]
