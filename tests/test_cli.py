"""The library CLI: `train CONFIG key=value ...` end to end on tiny data, `eval --matrix`, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TASK_A, TASK_B

from cltune.cli import main
from cltune.registry import Registry

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLTUNE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def tasks_override(write_jsonl) -> str:
    a = write_jsonl([{"prompt": q, "completion": x} for q, x in TASK_A], "a.jsonl")
    b = write_jsonl([{"instruction": q, "output": x} for q, x in TASK_B], "b.jsonl")
    return f"tasks=[{{name: a, train: '{a}', max_eval: 2}}, {{name: b, train: '{b}', max_eval: 2}}]"


def test_train_runs_the_tiny_config_and_prints_the_metrics(data_dir, write_jsonl, capsys):
    code = main(
        [
            "train",
            TINY,
            tasks_override(write_jsonl),
            "train.steps=2",
            "eval.max_new_tokens=2",
            "--run-dir",
            str(data_dir / "runs" / "x"),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "AP  =" in out.out and "BWT =" in out.out and "Forgetting" in out.out
    assert "a@1, b@1" in out.out
    results = json.loads((data_dir / "runs" / "x" / "results.json").read_text())
    assert results["tasks"] == ["a", "b"] and len(results["R"]) == 3
    assert Registry(data_dir / "adapters").get("b").parent == "a@1"  # written under CLTUNE_DATA_DIR


def test_a_bad_override_returns_2_and_names_the_field(data_dir, write_jsonl, capsys):
    code = main(["train", TINY, tasks_override(write_jsonl), "train.lr=0", "lora.r=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "invalid run config" in err and "train.lr" in err and "lora.r" in err
    assert not (data_dir / "runs").exists()  # nothing ran


def test_a_missing_config_file_returns_2(data_dir, capsys):
    assert main(["train", str(data_dir / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_data_returns_2_with_file_and_line(data_dir, write_jsonl, capsys):
    bad = write_jsonl([{"prompt": "x", "completion": "y"}, {"prompt": "x", "completion": ""}], "bad.jsonl")
    code = main(["train", TINY, f"tasks=[{{name: a, train: '{bad}'}}]"])
    assert code == 2
    assert f"{bad}:2 (field 'completion')" in capsys.readouterr().err


def test_eval_matrix_prints_metrics_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"R": [[0.0, 0.0], [1.0, 0.2], [0.5, 0.9]]}))
    assert main(["eval", "--matrix", str(path), "--bwt-normalizer", "T"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["bwt"] == pytest.approx(-0.25) and m["bwt_normalizer"] == "T" and m["ap"] == pytest.approx(0.7)
