"""Shared fixtures and helpers: the tiny random Llama, JSONL writers, task contexts, the set-up the
training and method tests share (seeded LoRA values, stop callbacks, gradient oracles), a moto S3 server."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from cltune.config import LoraConfig, ModelConfig, TrainConfig
from cltune.data import Example, tokenize
from cltune.errors import StopRequested
from cltune.methods import Method, build_method
from cltune.methods.base import TaskContext
from cltune.models import LoadedModel, load_model
from cltune.train import Callbacks, train_task

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

NO_DROPOUT = LoraConfig(r=4, alpha=8, dropout=0.0)  # the method tests' LoRA: forwards are deterministic


def load_tiny() -> LoadedModel:
    """A fresh random tiny-llama (seed 0) on CPU, fp32, eval mode."""
    return load_model(ModelConfig(name="tiny-llama", device="cpu"))


@pytest.fixture
def tiny() -> LoadedModel:
    """A fresh random tiny-llama (seed 0) on CPU, fp32, eval mode."""
    return load_tiny()


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


def pc_rows(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """(question, answer) pairs as prompt/completion JSONL rows."""
    return [{"prompt": q, "completion": a} for q, a in pairs]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """`rows` as a JSONL file at `path` (parents made): for fixtures wider than a test's tmp_path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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


def method_task(
    loaded: LoadedModel,
    pairs: list[tuple[str, str]],
    index: int = 0,
    *,
    name: str | None = None,
    steps: int = 3,
    lora: LoraConfig = NO_DROPOUT,
    retain: list[tuple[str, str]] | None = None,
    **train: Any,
) -> TaskContext:
    """The method tests' task: task `index` (named t<index>) without LoRA dropout, trained for `steps`
    steps of batch 4, max_len 64; `train` sets further TrainConfig fields (lr, checkpoint_every, ...)."""
    return make_task(
        loaded,
        pairs,
        index=index,
        name=name or f"t{index}",
        lora=lora,
        retain=retain,
        train=TrainConfig(steps=steps, batch_size=4, max_len=64, **train),
    )


def seq_lora_start(lora: LoraConfig, cfg: TrainConfig, seed: int = 0) -> tuple[Any, Method, TaskContext]:
    """A fresh tiny base with a seq_lora adapter for TASK_A; the global seed `seed` fixes the LoRA init
    (and the dropout masks that follow). Returns (model, method, task)."""
    loaded = load_tiny()
    task = make_task(loaded, TASK_A, lora=lora, train=cfg)
    method = build_method("seq_lora")
    torch.manual_seed(seed)
    return method.prepare(loaded.model, task, None), method, task


def randomise_lora(model: torch.nn.Module, adapter: str, seed: int, std: float = 0.1, part: str = "") -> None:
    """Overwrite the parameters of adapter `adapter` whose names contain `part` (e.g. "lora_B") with
    seeded N(0, std^2) values, in named_parameters order: the adapted pass then differs from the frozen one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{adapter}." in n and part in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def batch_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of `model` on a collated batch, without autograd."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def stop_after(k: int | None) -> Callable[[], bool]:
    """A should_stop callback that answers True from its (k+1)-th call on (it is asked before each step:
    the run stops before step index k); never True when k is None."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return k is not None and calls["n"] > k

    return should_stop


def train_with_restart(
    start: Callable[[], tuple[Any, Method]], task: TaskContext, ck: Path, stop_at: int | None
) -> tuple[Any, Method]:
    """Train `task` on start()'s (model, method), checkpointing to `ck`; with `stop_at`, stop before
    that step, then resume from the checkpoint on a second start() (as a new process would).
    Returns the (model, method) that finished."""
    model, method = start()
    try:
        train_task(
            model,
            method,
            task,
            task.train_cfg,
            checkpoint_dir=ck,
            callbacks=Callbacks(should_stop=stop_after(stop_at)),
        )
    except StopRequested:
        model, method = start()
        train_task(model, method, task, task.train_cfg, checkpoint_dir=ck, resume=True)
    return model, method


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same non-empty key set, bit-identical tensors."""
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_gradients_are_the_oracles(
    got: Sequence[torch.Tensor],
    expected: torch.Tensor,
    ce: torch.Tensor,
    params: Sequence[torch.Tensor],
    extra_term: str,
) -> None:
    """`got` (a method's gradients w.r.t. `params`) equal those of the oracle loss `expected`, whose
    gradients differ measurably from those of its cross-entropy part `ce` (the `extra_term` matters)."""
    want = torch.autograd.grad(expected, params, retain_graph=True)
    g_ce = torch.autograd.grad(ce, params)
    assert sum((a - b).norm() for a, b in zip(want, g_ce, strict=True)) > 1e-3, (
        f"{extra_term} has no gradient"
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server in this process, on a free loopback port (a real HTTP endpoint for boto3)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any keys; boto3 wants some
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    yield f"http://{host}:{port}"
    server.stop()


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
