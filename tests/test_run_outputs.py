"""A run's outputs beside its adapters. Servable checkpoints (cltune.checkpoints): kept at each
validation, pruned to the most recent N plus the best, each loadable by peft as it is, and publishable
as a registry version with its lineage. TensorBoard event files (cltune.tracking)."""

from __future__ import annotations

import pytest
import torch
from conftest import TASK_A, TASK_B, pc_rows, write_rows
from peft import PeftModel
from safetensors.torch import load_file

from cltune import checkpoints
from cltune.config import LoraConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig
from cltune.continual import run_continual
from cltune.errors import NotFoundError
from cltune.models import build_tiny_llama
from cltune.registry import Registry

LORA = LoraConfig(r=4, alpha=8)
AUTO = TrainConfig(steps="auto", batch_size=4, lr=5e-3, max_len=64, val_every=2, patience=2, max_steps=10)
IDS = torch.tensor([[5, 9, 17, 33, 2]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two tasks under `steps: auto` keeping 2 checkpoints each, registered into a registry, with
    TensorBoard event files."""
    tmp = tmp_path_factory.mktemp("kept")
    tasks = []
    for name, pairs in (("a", TASK_A), ("b", TASK_B)):
        path = write_rows(tmp / f"{name}.jsonl", pc_rows(pairs * 2))
        tasks.append(TaskConfig(name=name, train=str(path), eval_fraction=0.2))
    cfg = RunConfig(
        model=ModelConfig(name="tiny-llama", device="cpu"),
        lora=LORA,
        train=AUTO.model_copy(update={"keep_checkpoints": 2, "tensorboard": True}),
        tasks=tasks,
        eval={"general": [], "heatmap": False},
    )
    registry = Registry(tmp / "adapters")
    result = run_continual(cfg, tmp / "run", registry=registry, created_by="job_x")
    return tmp / "run", registry, result


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_each_task_keeps_its_latest_checkpoints_and_the_best(run):
    run_dir, _, result = run
    kept = checkpoints.list_kept(run_dir)
    for info in result.train:
        steps = [k["step"] for k in kept if k["task"] == info["task"]]
        validated = [v["step"] for v in info["validation"]]
        assert set(validated[-2:]) | {info["best_step"]} == set(steps)  # 2 most recent + the best
        best = next(k for k in kept if k["task"] == info["task"] and k["step"] == info["best_step"])
        assert best["validation"] == info["best_validation"] and best["validation_metric"] == "loss"
        assert best["train_loss"] > 0


def test_the_best_kept_checkpoint_is_exactly_the_registered_adapter(run):
    run_dir, registry, result = run
    for info, adapter in zip(result.train, result.adapters, strict=True):
        kept = checkpoints.find(run_dir, info["task"], info["best_step"])
        registered = registry.path(adapter["name"], adapter["version"])
        a, b = (
            load_file(kept / "adapter_model.safetensors"),
            load_file(registered / "adapter_model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert adapter["notes"]["checkpoint_step"] == info["best_step"]


def test_a_published_checkpoint_is_served_by_peft_with_its_lineage(run, tmp_path):
    run_dir, registry, result = run
    info = result.train[1]
    step = min(k["step"] for k in checkpoints.list_kept(run_dir) if k["task"] == "b")
    registered_b = result.adapters[1]
    rec = checkpoints.publish(
        registry, run_dir, "b", step, name="b-early", created_by="job_x", registered=registered_b
    )
    assert rec.ref == "b-early@1" and rec.task == "b" and rec.method == "seq_lora"
    assert rec.parent == f"a@{result.adapters[0]['version']}"  # the adapter task b continued from
    assert rec.notes["checkpoint_step"] == step and rec.notes["checkpoint_of"] == "job_x"
    assert rec.group == registered_b["group"] and rec.codebook == registered_b["codebook"]
    assert rec.metrics["train_loss"] > 0 and rec.metrics["validation_metric"] == "loss"
    base, _, _ = build_tiny_llama(seed=0)
    before = logits(base)
    served = PeftModel.from_pretrained(base, str(registry.path("b-early")))
    assert not torch.allclose(logits(served), before)  # a real adapter, loadable as it is
    if step != info["best_step"]:
        registered = PeftModel.from_pretrained(build_tiny_llama(seed=0)[0], str(registry.path("b")))
        assert not torch.allclose(logits(served), logits(registered))  # an earlier point of training


def test_publishing_a_step_that_is_not_kept_names_the_kept_ones(run):
    run_dir, registry, _ = run
    with pytest.raises(NotFoundError, match=r"no kept checkpoint at step 999; kept: \["):
        checkpoints.publish(registry, run_dir, "a", 999)
    with pytest.raises(NotFoundError, match=r"tasks with some: \['a', 'b'\]"):
        checkpoints.publish(registry, run_dir, "zzz", 2)


def test_keeper_prunes_to_the_most_recent_and_the_best(tmp_path):
    from cltune.methods.common import attach_adapter, peft_lora_config

    model = attach_adapter(build_tiny_llama(seed=0)[0], "default", peft_lora_config(LORA))
    keeper = checkpoints.Keeper(checkpoints.task_dir(tmp_path, 0, "a"), 2, "a", 0, "loss")
    for step, best in ((2, 2), (4, 4), (6, 4), (8, 4), (10, 10)):
        keeper.save(model, "default", step, 1.0, 0.5, best)
    assert sorted(k["step"] for k in checkpoints.list_kept(tmp_path)) == [8, 10]
    keeper.save(model, "default", 12, 1.0, 0.5, 8)
    assert sorted(k["step"] for k in checkpoints.list_kept(tmp_path)) == [8, 10, 12]
    none = checkpoints.Keeper(checkpoints.task_dir(tmp_path, 1, "b"), 0, "b", 1)
    none.save(model, "default", 3, 1.0, None, 3)
    assert [k["step"] for k in checkpoints.list_kept(tmp_path) if k["task"] == "b"] == [3]  # the best only


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_has_the_loss_validation_and_scores_on_one_step_axis(run):
    run_dir, _, result = run
    scalars = read_scalars(run_dir / "tensorboard")
    steps_a, steps_b = (info["steps"] for info in result.train)
    loss = scalars["train/loss"]
    assert [s for s, _ in loss] == list(range(1, steps_a + steps_b + 1))  # b continues after a
    assert loss[0][1] == pytest.approx(result.train[0]["history"][0]["loss"])
    assert {"train/lr", "train/tokens_per_s", "validation/a", "validation/b", "R/a", "R/b"} <= scalars.keys()
    assert [v for _, v in scalars["validation/a"]] == pytest.approx(
        [v["value"] for v in result.train[0]["validation"]]
    )
    assert [s for s, _ in scalars["validation/b"]][0] == steps_a + result.train[1]["validation"][0]["step"]
    assert [v for _, v in scalars["R/b"]] == pytest.approx(
        [row[1] for row in result.R]
    )  # base, after a, after b
    assert [s for s, _ in scalars["R/a"]] == [0, steps_a, steps_a + steps_b]
