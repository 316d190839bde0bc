"""`cltune demo` through the service: the sequence once per method, both R matrices and the side-by-side
comparison, then routed answers (tiny model, the tiny config's tasks on small generated data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cltune import demo_data
from service.demo import run_demo, side_by_side

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def result(ap: float, bwt: float, final: list[float]) -> dict:
    return {
        "tasks": ["a", "b"],
        "R": [[0, 0], [0.5, 0], final],
        "metrics": {"ap": ap, "bwt": bwt, "forgetting": -bwt},
        "general": {"text_ppl": {"kind": "ppl", "values": [10.0, 12.5], "retention": 0.8}},
    }


def test_side_by_side_shows_each_methods_metrics_final_scores_and_retention():
    text = side_by_side({"seq_lora": result(0.4, -0.3, [0.2, 0.6]), "dema": result(0.55, 0.0, [0.5, 0.6])})
    lines = text.splitlines()
    assert "AP" in lines[1] and "text_ppl kept" in lines[1] and lines[1].index("a") < lines[1].index("b")
    assert lines[2].split() == ["seq_lora", "0.400", "-0.300", "0.300", "0.200", "0.600", "0.800"]
    assert lines[3].split()[:4] == ["dema", "0.550", "0.000", "-0.000"]
    assert "one seed" in text and "--seeds 0 1 2" in text


@pytest.mark.slow  # two jobs on the tiny model in spawned children: ~1-2 min on 2 cores
def test_the_demo_runs_seq_lora_and_a_continual_method_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the tiny config's data/demo/*.jsonl, generated small here
    for name in demo_data.SEQUENCES["demo"]:
        rows = [{"prompt": f"{name} question {i}?", "completion": f"{name[:3]} {i}"} for i in range(12)]
        monkeypatch.setitem(demo_data.BUILDERS, name, lambda rows=rows: rows)
    overrides = ["eval.general=[]", "train.steps=2"]
    assert run_demo(TINY, overrides, tmp_path / "data", ["seq_lora", "dema"]) == 0
    out = capsys.readouterr().out
    assert "[seq_lora] accuracy matrix R" in out and "[dema] accuracy matrix R" in out
    assert "after the last task, side by side" in out
    table = out.split("after the last task, side by side")[1].splitlines()
    assert table[2].startswith("seq_lora") and table[3].startswith("dema")
    assert 'Routed answers (model="auto")' in out and "demo finished in" in out
