"""A job's outputs over REST, from one real tiny-llama job run by an in-process worker: kept checkpoints
(listed, published as a version and served), metrics as JSON and CSV, the heatmap and learning-curve
images, the TensorBoard archive; and what another tenant or a bad request gets."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest

from service.worker import Worker

from .api_support import Api, make_api, pairs_jsonl, serving, upload


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> tuple[Api, dict[str, str], str]:
    """A finished 2-task `steps: auto` job with tensorboard on, keeping 2 checkpoints per task."""
    api = make_api(tmp_path_factory.mktemp("outputs"), engine_model="tiny-llama")
    _, h = api.tenant("acme")
    ids = [
        upload(api, h, "add.jsonl", pairs_jsonl([(f"add one to {i}", str(i + 1)) for i in range(24)])),
        upload(api, h, "dbl.jsonl", pairs_jsonl([(f"double {i}", str(2 * i)) for i in range(24)])),
    ]
    config = {
        "model": {"name": "tiny-llama"},
        "lora": {"r": 4, "alpha": 8},
        "tasks": [
            {"name": "add", "train": ids[0], "max_eval": 4, "max_new_tokens": 3},
            {"name": "dbl", "train": ids[1], "max_eval": 4, "max_new_tokens": 3},
        ],
        "train": {
            "steps": "auto",
            "max_steps": 8,
            "val_every": 2,
            "patience": 2,
            "batch_size": 4,
            "lr": 5e-3,
            "max_len": 48,
            "keep_checkpoints": 2,
            "tensorboard": True,
        },
        "eval": {"general": []},
    }
    r = api.client.post("/v1/jobs", json={"config": config}, headers=h)
    assert r.status_code == 201, r.text
    Worker(api.settings, worker_id="w1", poll_seconds=0.05, isolate=False).run(burst=True)
    job = api.client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
    assert job["status"] == "succeeded", job["error"]
    return api, h, job["id"]


def test_checkpoints_are_listed_with_the_registered_one_marked(done) -> None:
    api, h, job_id = done
    items = api.client.get(f"/v1/jobs/{job_id}/checkpoints", headers=h).json()["items"]
    train = api.client.get(f"/v1/jobs/{job_id}", headers=h).json()["result"]["train"]
    for task, info in zip(("add", "dbl"), train, strict=True):
        mine = [c for c in items if c["task"] == task]
        assert 1 <= len(mine) <= 3 and all(c["train_loss"] > 0 for c in mine)  # 2 most recent + the best
        registered = [c for c in mine if c["registered"]]
        assert [c["step"] for c in registered] == [info["best_step"]]
        assert registered[0]["registered"] == f"{task}@1"
        assert registered[0]["validation"] == pytest.approx(info["best_validation"])


def test_a_published_checkpoint_is_a_new_version_served_like_any_adapter(done) -> None:
    api, h, job_id = done
    c = api.client
    first = c.get(f"/v1/jobs/{job_id}/checkpoints", headers=h).json()["items"][0]
    r = c.post(
        f"/v1/jobs/{job_id}/checkpoints/publish",
        json={"task": first["task"], "step": first["step"], "name": "add-early"},
        headers=h,
    )
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["ref"] == "add-early@1" and rec["task"] == "add" and rec["parent"] is None
    assert rec["notes"]["checkpoint_step"] == first["step"] and rec["notes"]["checkpoint_of"] == job_id
    assert rec["group"] == "add" and rec["codebook_size"] > 0  # model="auto" reaches it like add@1
    dbl = next(
        x["step"]
        for x in c.get(f"/v1/jobs/{job_id}/checkpoints", headers=h).json()["items"]
        if x["task"] == "dbl"
    )
    again = c.post(f"/v1/jobs/{job_id}/checkpoints/publish", json={"task": "dbl", "step": dbl}, headers=h)
    assert (
        again.status_code == 201 and again.json()["ref"] == "dbl@2"
    )  # default: the task's name, next version
    assert again.json()["parent"] == "add@1"  # the lineage of task dbl
    out = c.post(
        "/v1/completions", json={"model": "add-early@1", "prompt": "add one to 3", "max_tokens": 3}, headers=h
    )
    assert out.status_code == 200, out.text
    assert out.json()["model"] == "add-early@1"


def test_publishing_refuses_unknown_steps_tasks_and_bad_names(done) -> None:
    api, h, job_id = done
    c = api.client
    url = f"/v1/jobs/{job_id}/checkpoints/publish"
    r = c.post(url, json={"task": "add", "step": 999}, headers=h)
    assert r.status_code == 404 and "kept: [" in r.json()["error"]["message"]
    r = c.post(url, json={"task": "nope", "step": 2}, headers=h)
    assert r.status_code == 404 and "'add', 'dbl'" in r.json()["error"]["message"]
    r = c.post(url, json={"task": "add", "step": 2, "name": "../evil"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["type"]
    r = c.post(url, json={"task": "add", "step": 0}, headers=h)
    assert r.status_code == 422
    _, other = api.tenant("other")
    for path in ("checkpoints", "metrics", "plots/heatmap", "tensorboard"):
        assert c.get(f"/v1/jobs/{job_id}/{path}", headers=other).status_code == 404
    assert c.post(url, json={"task": "add", "step": 2}, headers=other).status_code == 404


def test_metrics_give_every_step_with_validation_as_json_and_csv(done) -> None:
    api, h, job_id = done
    c = api.client
    body = c.get(f"/v1/jobs/{job_id}/metrics", headers=h).json()
    train = c.get(f"/v1/jobs/{job_id}", headers=h).json()["result"]["train"]
    rows = body["rows"]
    assert body["columns"][:6] == ["task", "task_index", "step", "loss", "lr", "tokens_per_s"]
    assert "validation" in body["columns"] and "loss_ce" in body["columns"]
    for i, info in enumerate(train):
        mine = [r for r in rows if r["task_index"] == i]
        assert [r["step"] for r in mine] == list(range(1, info["steps"] + 1))
        assert [r["loss"] for r in mine] == pytest.approx([x["loss"] for x in info["history"]])
        checked = {r["step"]: r["validation"] for r in mine if "validation" in r}
        assert checked == pytest.approx({v["step"]: v["value"] for v in info["validation"]})
    text = c.get(f"/v1/jobs/{job_id}/metrics?format=csv", headers=h)
    assert text.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(text.text)))
    assert len(parsed) == len(rows) and float(parsed[0]["loss"]) == pytest.approx(rows[0]["loss"])
    assert c.get(f"/v1/jobs/{job_id}/metrics?format=xml", headers=h).status_code == 422


def test_plots_and_tensorboard_archive_download(done, tmp_path: Path) -> None:
    api, h, job_id = done
    c = api.client
    for plot in ("heatmap", "curves"):
        r = c.get(f"/v1/jobs/{job_id}/plots/{plot}", headers=h)
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get(f"/v1/jobs/{job_id}/plots/loss", headers=h).status_code == 422
    r = c.get(f"/v1/jobs/{job_id}/tensorboard", headers=h)
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = tar.getnames()
    assert names and all(n.startswith(f"{job_id}/events.out.tfevents.") for n in names)


def test_a_job_without_tensorboard_says_how_to_get_it(tmp_path: Path) -> None:
    api = make_api(tmp_path)
    _, h = api.tenant("acme")
    ds = upload(api, h)
    job = api.client.post(
        "/v1/jobs", json={"config": {"tasks": [{"name": "t", "train": ds}]}}, headers=h
    ).json()
    r = api.client.get(f"/v1/jobs/{job['id']}/tensorboard", headers=h)
    assert r.status_code == 404 and "train.tensorboard: true" in r.json()["error"]["message"]
    r = api.client.get(f"/v1/jobs/{job['id']}/plots/curves", headers=h)
    assert r.status_code == 404 and "queued" in r.json()["error"]["message"]
    assert api.client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=h).json() == {"items": []}
    assert api.client.get(f"/v1/jobs/{job['id']}/metrics", headers=h).json()["rows"] == []


def test_the_cli_lists_publishes_and_exports_metrics(done, monkeypatch, capsys, tmp_path: Path) -> None:
    from service.cli import main

    api, h, job_id = done
    with serving(api.client.app) as url:
        monkeypatch.setenv("CLTUNE_URL", url)
        monkeypatch.setenv("CLTUNE_API_KEY", h["Authorization"].split()[1])
        assert main(["jobs", "checkpoints", job_id]) == 0
        kept = json.loads(capsys.readouterr().out)["items"]
        step = kept[-1]["step"]
        assert (
            main(["jobs", "publish", job_id, "--task", "dbl", "--step", str(step), "--name", "dbl-cli"]) == 0
        )
        assert json.loads(capsys.readouterr().out)["ref"] == "dbl-cli@1"
        assert main(["jobs", "publish", job_id, "--task", "dbl"]) == 2
        assert "--step N" in capsys.readouterr().err
        assert main(["jobs", "metrics", job_id, "-o", str(tmp_path / "m.csv")]) == 0
    header = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert header.startswith("task,task_index,step,loss,lr,tokens_per_s")
