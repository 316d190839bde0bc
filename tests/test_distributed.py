"""Data-parallel training through accelerate: 2 CPU processes on gloo give the run a single process
gives for the same global batch (same loop, gradients averaged across ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cltune.config import parse_config
from cltune.distributed import launch, run_sequence_ddp
from cltune.errors import ConfigError
from cltune.registry import Registry
from cltune.sequence import run_sequence


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
    single = run_sequence(parse_config(cfg), tmp_path / "single", registry=Registry(tmp_path / "reg1"))
    launch(run_sequence_ddp, 2, cfg, str(tmp_path / "ddp"), str(tmp_path / "reg2"), {})
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
