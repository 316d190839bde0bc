"""A continual run end to end on tiny-llama: results, heatmap, registered lineage, exact resume of a
stopped run, refusal of a run directory that holds another run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TASK_A, TASK_B, pc_rows, write_rows
from safetensors.torch import load_file

from cltune.config import RunConfig, parse_config
from cltune.continual import run_continual
from cltune.errors import ConfigError, DataError, StopRequested
from cltune.models import load_model
from cltune.registry import Registry
from cltune.train import Callbacks

STEPS = 3


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> RunConfig:
    d = tmp_path_factory.mktemp("data")
    a = str(write_rows(d / "a.jsonl", pc_rows(TASK_A)))
    chat = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}
        for q, ans in TASK_B
    ]
    b = str(write_rows(d / "b.jsonl", chat))
    return parse_config(
        {
            "name": "seqtest",
            "model": {"name": "tiny-llama", "device": "cpu"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "train": {"steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": 5e-3, "max_len": 64},
            "eval": {"max_new_tokens": 4},
            "tasks": [{"name": "a", "train": a, "max_eval": 3}, {"name": "b", "train": b, "max_eval": 3}],
        }
    )


def run(cfg: RunConfig, run_dir, registry=None, callbacks=None):
    # run_continual wraps the base model with peft in place: every run gets a fresh one
    return run_continual(cfg, run_dir, registry=registry, callbacks=callbacks, loaded=load_model(cfg.model))


def final_adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "tasks" / "01-b" / "adapters.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    reg = Registry(root / "adapters")
    res = run(cfg, root / "run", reg)
    return res, reg


def test_a_two_task_run_writes_results_heatmap_and_registers_lineage(uninterrupted):
    res, reg = uninterrupted
    assert len(res.R) == 3 and all(len(row) == 2 for row in res.R)
    assert all(0.0 <= v <= 1.0 for row in res.R for v in row)
    assert set(res.metrics) >= {"ap", "bwt", "fwt", "forgetting"}
    saved = json.loads((res.run_dir / "results.json").read_text())
    assert saved["tasks"] == ["a", "b"] and saved["R"] == res.R and saved["adapters"] == ["a@1", "b@1"]
    assert (res.run_dir / "R.png").read_bytes()[:4] == b"\x89PNG"
    assert [t["steps"] for t in res.train] == [STEPS, STEPS]
    assert [t["lr"] for t in res.train] == [5e-3, 5e-3]  # the config's, said per task
    a, b = reg.get("a"), reg.get("b")
    assert a.parent is None and b.parent == "a@1"
    assert b.method == "seq_lora" and b.base_fingerprint.startswith("tiny-llama:")
    assert b.metrics["R_row"] == res.R[2] and b.metrics["score"] == res.R[2][1]
    assert [d["role"] for d in b.datasets] == ["train"] and len(b.datasets[0]["sha256"]) == 64
    assert not (res.run_dir / "checkpoint").exists()  # removed once a task is done


def test_a_stopped_run_resumes_to_the_same_result(uninterrupted, cfg, tmp_path):
    full, _ = uninterrupted
    calls = {"n": 0}

    def should_stop() -> bool:  # asked before every step: stop before step 2 of task b
        calls["n"] += 1
        return calls["n"] == STEPS + 2

    reg = Registry(tmp_path / "adapters2")
    with pytest.raises(StopRequested):
        run(cfg, tmp_path / "stopped", reg, Callbacks(should_stop=should_stop))
    progress = json.loads((tmp_path / "stopped" / "progress.json").read_text())
    assert progress["completed"] == 1 and len(progress["R"]) == 2
    assert (tmp_path / "stopped" / "checkpoint" / "trainer.pt").exists()
    torch.manual_seed(777)  # as if in a new process
    res = run(cfg, tmp_path / "stopped", reg)
    assert res.R == full.R
    ref = final_adapter(full.run_dir)
    got = final_adapter(tmp_path / "stopped")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [f"{a['name']}@{a['version']}" for a in res.adapters] == ["a@1", "b@1"]
    assert reg.get("b").parent == "a@1"


def test_the_same_config_twice_gives_identical_adapters(uninterrupted, cfg, tmp_path):
    run(cfg, tmp_path / "again")
    ref, got = final_adapter(uninterrupted[0].run_dir), final_adapter(tmp_path / "again")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_finished_run_called_again_does_not_retrain(uninterrupted, cfg, tmp_path):
    full, reg = uninterrupted
    res = run(cfg, full.run_dir, reg)
    assert res.R == full.R and reg.versions_of("b") == [1]


def test_a_run_directory_holding_another_config_is_refused(uninterrupted, cfg):
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e-3})})
    with pytest.raises(ConfigError, match="different run"):
        run_continual(other, uninterrupted[0].run_dir)


def test_a_run_resumes_from_its_data_at_other_paths_but_not_from_changed_data(uninterrupted, cfg, tmp_path):
    """Another host (or a moved checkout) reads the same files at other paths: the same run. A file
    whose content changed under the same path: a different run."""
    full, reg = uninterrupted
    moved = []
    for i, t in enumerate(cfg.tasks):
        copy = tmp_path / "elsewhere" / f"{i}.jsonl"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(Path(t.train).read_bytes())
        moved.append(t.model_copy(update={"train": str(copy), "eval": str(copy) if t.eval else None}))
    res = run(cfg.model_copy(update={"tasks": moved}), full.run_dir, reg)
    assert res.R == full.R and reg.versions_of("b") == [1]  # resumed as finished, not retrained
    with Path(moved[0].train).open("a") as f:
        f.write('{"prompt": "one more", "completion": "line"}\n')
    with pytest.raises(ConfigError, match="changed data"):
        run_continual(cfg.model_copy(update={"tasks": moved}), full.run_dir)


def test_bad_data_fails_before_the_model_is_loaded(cfg, write_jsonl, tmp_path, monkeypatch):
    bad = write_jsonl([{"prompt": "x", "completion": "y"}, "{oops"], "bad.jsonl")
    tasks = [cfg.tasks[0], cfg.tasks[1].model_copy(update={"train": str(bad)})]
    monkeypatch.setattr("cltune.continual.load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataError) as ei:
        run_continual(cfg.model_copy(update={"tasks": tasks}), tmp_path / "bad")
    assert ei.value.details["line"] == 2
