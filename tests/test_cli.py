"""The library CLI: `train CONFIG key=value ...` end to end on tiny data, `eval --matrix`, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TASK_A, TASK_B, pc_rows

from cltune import demo_data
from cltune.cli import main
from cltune.config import load_config
from cltune.registry import Registry

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLTUNE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def tasks_override(write_jsonl) -> str:
    a = write_jsonl(pc_rows(TASK_A), "a.jsonl")
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


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch, data_dir) -> Path:
    """The working directory of a fresh clone: configs/ present, data/demo/ not yet written. The demo
    builders are swapped for small ones (the real ones read PyPI packages; test_router uses them)."""
    monkeypatch.chdir(tmp_path)
    for name in demo_data.BUILDERS:
        rows = [{"prompt": f"{name}: {q}", "completion": a} for q, a in TASK_A[:12]]
        monkeypatch.setitem(demo_data.BUILDERS, name, lambda rows=rows: rows)
    return tmp_path


def test_train_on_a_fresh_clone_generates_the_missing_demo_data(fresh_clone, data_dir, capsys):
    assert not (fresh_clone / "data" / "demo").exists()
    code = main(["train", TINY, "train.steps=1", "eval.max_new_tokens=2", "--run-dir", str(data_dir / "r")])
    out = capsys.readouterr()
    assert code == 0, out.err
    files = [t.train for t in load_config(TINY).tasks]  # data/demo/<task>.jsonl, relative to the clone
    assert len(files) == 3 and all(f.startswith("data/demo/") for f in files)
    for f in files:
        assert len((fresh_clone / f).read_text().splitlines()) == 12
        assert f in out.err  # the log says what was generated
    assert "AP  =" in out.out


def test_demo_data_that_cannot_be_generated_names_the_file_and_how_to_create_it(
    fresh_clone, data_dir, monkeypatch, capsys
):
    def no_package() -> list[dict[str, str]]:
        raise ImportError("No module named 'countryinfo'")

    monkeypatch.setitem(demo_data.BUILDERS, "capitals", no_package)
    assert main(["train", TINY]) == 2
    err = capsys.readouterr().err
    assert "data/demo/capitals.jsonl does not exist" in err and "countryinfo" in err
    assert "CLTUNE_DATA_DIR=data cltune demo --data-only" in err
    assert not (data_dir / "runs").exists()  # nothing ran


def test_a_missing_file_outside_the_demo_is_named_and_never_generated(fresh_clone, capsys):
    assert main(["train", TINY, "tasks=[{name: capitals, train: mine/capitals.jsonl}]"]) == 2
    assert "mine/capitals.jsonl: cannot open" in capsys.readouterr().err
    assert not (fresh_clone / "mine").exists()


def test_eval_matrix_prints_metrics_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"R": [[0.0, 0.0], [1.0, 0.2], [0.5, 0.9]]}))
    assert main(["eval", "--matrix", str(path), "--bwt-normalizer", "T"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["bwt"] == pytest.approx(-0.25) and m["bwt_normalizer"] == "T" and m["ap"] == pytest.approx(0.7)
