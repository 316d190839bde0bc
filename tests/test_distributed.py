"""Data-parallel training through accelerate: 2 CPU processes on gloo give the run a single process
gives for the same global batch (same loop, gradients averaged across ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cltune.config import parse_config
from cltune.continual import run_continual, run_continual_rank
from cltune.distributed import launch
from cltune.errors import ConfigError
from cltune.registry import Registry


def _config(train: Path, batch_size: int = 4) -> dict[str, object]:
    return {
        "model": {"name": "tiny-llama", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # no dropout: ranks would draw other masks
        "tasks": [{"name": "a", "train": str(train), "max_eval": 2}],
        # lr 1e-2 so that 6 steps move the adapters well beyond float noise
        "train": {"steps": 6, "batch_size": batch_size, "max_len": 64, "lr": 1e-2, "checkpoint_every": 3},
        "eval": {"max_new_tokens": 1, "heatmap": False},
    }


def _data(tmp_path: Path) -> Path:
    # equal lengths (byte tokenizer): each rank's token mean is then exactly its share of the global mean
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"add one to {i}"},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(10, 30)
    ]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.slow
def test_two_gloo_processes_train_the_adapters_a_single_process_trains(tmp_path: Path) -> None:
    cfg = _config(_data(tmp_path))
    torch.set_num_threads(1)
    single = run_continual(parse_config(cfg), tmp_path / "single", registry=Registry(tmp_path / "reg1"))
    launch(run_continual_rank, 2, cfg, str(tmp_path / "ddp"), str(tmp_path / "reg2"))
    a = load_file(tmp_path / "single" / "tasks" / "00-a" / "adapters.safetensors")
    b = load_file(tmp_path / "ddp" / "tasks" / "00-a" / "adapters.safetensors")
    b1 = load_file(tmp_path / "ddp" / "rank1" / "tasks" / "00-a" / "adapters.safetensors")
    assert all(torch.equal(b[k], b1[k]) for k in b)  # ranks hold identical weights (averaged gradients)
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    scale = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    print(f"max |single - ddp| = {max(diffs.values()):.2e}; max |lora_B| = {scale:.2e}")
    assert scale > 1e-3  # training moved lora_B away from its zero init
    assert max(diffs.values()) < 1e-5, diffs  # float summation order only (measured ~1e-7)
    ddp_train = json.loads((tmp_path / "ddp" / "progress.json").read_text())["train"][0]
    assert ddp_train["steps"] == 6
    assert abs(ddp_train["final_loss"] - single.train[0]["final_loss"]) < 1e-4
    assert Registry(tmp_path / "reg2").versions_of("a") == [1]  # rank 0 alone registers
    assert (tmp_path / "ddp" / "rank1" / "checkpoint").exists() is False  # cleaned at the task end


def test_a_batch_that_does_not_split_across_devices_is_refused() -> None:
    from cltune.distributed import check_world

    check_world(8, 2)
    with pytest.raises(ConfigError, match="multiple of the 3 devices"):
        check_world(8, 3)


def _two_tasks(tmp_path: Path, methods: tuple[str, str]) -> dict[str, object]:
    cfg = _config(_data(tmp_path))
    # the lengths of task a's rows (each rank's token mean is then its share of the global mean, also for
    # replayed rows) and no word in common with them (DEMA opens a new group for it)
    letters = "abcdefghijklmnopqrstuv"
    words = [letters[i : i + 3] for i in range(20)]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"mirror of {w}"},
                {"role": "assistant", "content": w[1::-1]},
            ]
        }
        for w in words
    ]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg["tasks"] = [
        {"name": "a", "train": str(tmp_path / "a.jsonl"), "max_eval": 2, "method": {"name": methods[0]}},
        {"name": "b", "train": str(tmp_path / "b.jsonl"), "max_eval": 2, "method": {"name": methods[1]}},
    ]
    cfg["train"] = {**cfg["train"], "steps": 4, "sharding": "fsdp"}  # type: ignore[dict-item]
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize(
    "methods",
    [
        ("seq_lora", "kappatune"),  # the kappa selection reads base weights that are already sharded
        ("ilora", "ilora"),  # EMA of the slow adapter, replay, hidden states through sharded layers
        ("dema", "dema"),  # a new group's adapter is attached after the layers were sharded
        ("control_llm", "control_llm"),  # wrapped layers run twice inside one FSDP unit
    ],
)
def test_fsdp_on_two_gloo_processes_trains_the_adapters_a_single_process_trains(
    tmp_path: Path, methods: tuple[str, str]
) -> None:
    cfg = _two_tasks(tmp_path, methods)
    torch.set_num_threads(1)
    single = run_continual(parse_config(cfg), tmp_path / "single")
    launch(run_continual_rank, 2, cfg, str(tmp_path / "fsdp"))
    for task in ("00-a", "01-b"):
        a = load_file(tmp_path / "single" / "tasks" / task / "adapters.safetensors")
        b = load_file(tmp_path / "fsdp" / "tasks" / task / "adapters.safetensors")
        b1 = load_file(tmp_path / "fsdp" / "rank1" / "tasks" / task / "adapters.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(b[k], b1[k]) for k in b)  # every rank holds the same whole adapters
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        # float summation order, which Adam's first steps (g / |g|) can magnify on near-zero gradients
        assert diff < 5e-5, (task, diff)
    if methods[1] == "dema":
        state = json.loads((tmp_path / "fsdp" / "tasks" / "01-b" / "state" / "method_state.json").read_text())
        assert [g["tasks"] for g in state["groups"]] == [["a"], ["b"]]  # b got a new adapter, after sharding
    progress = json.loads((tmp_path / "fsdp" / "progress.json").read_text())
    assert progress["R"] == single.R  # the evaluation (generation through sharded layers) agrees


def _shard_report(out: str) -> None:
    """One rank: shard a tiny model with an adapter; write what each kind of tensor holds here."""
    from torch.distributed.tensor import DTensor

    from cltune.config import LoraConfig
    from cltune.distributed import accelerator, shard_frozen_layers
    from cltune.methods.common import attach_adapter, peft_lora_config
    from cltune.models import build_tiny_llama

    acc = accelerator()
    model, _, _ = build_tiny_llama()
    model.requires_grad_(False)
    model = attach_adapter(model, "default", peft_lora_config(LoraConfig(r=4)))
    first, again = shard_frozen_layers(model, acc), shard_frozen_layers(model, acc)
    with torch.no_grad():  # after a forward the layers hold their shards again, not the gathered weights
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    report = {"sharded": first, "again": again, "tensors": {}}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        report["tensors"][name] = [isinstance(p, DTensor), local.numel(), p.numel()]
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps(report))
    acc.wait_for_everyone()


@pytest.mark.slow
def test_fsdp_splits_frozen_layer_weights_and_keeps_adapters_whole(tmp_path: Path) -> None:
    launch(_shard_report, 2, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["sharded"] == 2 and rep["again"] == 0  # both layers, once
        t = rep["tensors"]
        frozen = {n: v for n, v in t.items() if ".layers." in n and "lora_" not in n}
        assert frozen and all(is_dt and local * 2 == whole for is_dt, local, whole in frozen.values())
        lora = {n: v for n, v in t.items() if "lora_" in n}
        assert lora and all(not is_dt and local == whole for is_dt, local, whole in lora.values())
        outside = {n: v for n, v in t.items() if ".layers." not in n}  # embeddings, norm, lm_head
        assert outside and all(not is_dt for is_dt, _, _ in outside.values())
