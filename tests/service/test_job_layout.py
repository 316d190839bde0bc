"""Where a job's files live (service/layout.py), how a job's dataset ids become files on the host that
runs it (service/job_run.py), and how a data-parallel rank's domain error reaches the job process
(service/parallel_job.py)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from cltune.errors import (
    CLTuneError,
    ConfigError,
    DataError,
    InvalidNameError,
    StopRequested,
    UnknownNameError,
)
from service import layout
from service.artifacts import SharedArtifacts, put_dataset
from service.job_run import local_config
from service.parallel_job import error_message, rank_failure, rebuild_error
from service.runner import public_text
from service.settings import Settings

T = "t_a"
DS = "ds_0123456789abcdef"
ROW = '{"prompt": "q", "completion": "a"}\n'
SERVICE = Path(__file__).parents[2] / "service"


def _job(config: dict[str, Any], spec_config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "job_1",
        "tenant_id": T,
        "spec": {"config": spec_config or config},
        "config": config,
        "attempts": 1,
        **extra,
    }


def _tasks(*train: str) -> dict[str, Any]:
    return {"tasks": [{"name": f"t{i}", "train": t} for i, t in enumerate(train)]}


def test_layout_owns_the_data_dir_paths_and_the_store_keys(tmp_path: Path) -> None:
    assert layout.run_dir(tmp_path, "job_1") == tmp_path / "runs" / "job_1"
    assert layout.crash_log(tmp_path, "job_1") == tmp_path / "runs" / "job_1" / layout.CRASH_LOG
    assert layout.adapters_dir(tmp_path, T) == tmp_path / "adapters" / T
    assert layout.models_dir(tmp_path) == tmp_path / "models"
    assert layout.dataset_path(tmp_path, T, DS) == tmp_path.resolve() / "datasets" / T / f"{DS}.jsonl"
    assert (layout.run_prefix("job_1"), layout.adapters_prefix(T)) == ("runs/job_1", f"adapters/{T}")
    assert layout.dataset_key(T, DS) == f"datasets/{T}/{DS}.jsonl"
    for bad in ("../x", "a/b", ""):
        with pytest.raises(InvalidNameError):
            layout.dataset_path(tmp_path, bad, DS)
        with pytest.raises(InvalidNameError):
            layout.dataset_key(T, bad)
    assert layout.is_dataset_id(DS) and not layout.is_dataset_id(f"/data/{DS}.jsonl")


def test_the_runner_resolves_dataset_ids_on_its_own_host(tmp_path: Path) -> None:
    here = layout.dataset_path(tmp_path, T, DS)
    here.parent.mkdir(parents=True)
    here.write_text(ROW)
    job = _job({**_tasks(DS, "lib/path.jsonl"), "train": {"steps": 1}})
    local = local_config(job, tmp_path)
    assert [t["train"] for t in local["tasks"]] == [str(here), "lib/path.jsonl"]  # a path stays a path
    assert job["config"]["tasks"][0]["train"] == DS  # the job's config is not changed


def test_a_host_without_the_file_fetches_it_from_the_shared_store_by_id(tmp_path: Path) -> None:
    store = {"artifact_dir": str(tmp_path / "store")}
    api = Settings(data_dir=tmp_path / "api", **store)  # type: ignore[arg-type]
    uploaded = layout.dataset_path(api.data_dir, T, DS)
    uploaded.parent.mkdir(parents=True)
    uploaded.write_text(ROW)
    assert put_dataset(api, T, DS) == layout.dataset_key(T, DS)
    job = _job(_tasks(DS), artifacts=store)
    worker = tmp_path / "worker"
    shared = SharedArtifacts.open(job, worker)
    assert shared is not None
    local = local_config(job, worker, shared.fetch_dataset)
    assert local["tasks"][0]["train"] == str(layout.dataset_path(worker, T, DS))
    assert Path(local["tasks"][0]["train"]).read_text() == ROW
    with pytest.raises(DataError, match="ds_00000000000000ff") as e:
        local_config(_job(_tasks("ds_00000000000000ff"), artifacts=store), worker, shared.fetch_dataset)
    assert e.value.details["file"] == "ds_00000000000000ff"  # the id, not a path of some host


def test_a_job_queued_with_another_hosts_path_resolves_the_id_it_was_sent_with(tmp_path: Path) -> None:
    """Before job configs kept ids, the API stored its own path; the request (spec) holds the id."""
    here = layout.dataset_path(tmp_path, T, DS)
    here.parent.mkdir(parents=True)
    here.write_text(ROW)
    elsewhere = f"/elsewhere/datasets/{T}/{DS}.jsonl"
    job = _job(_tasks(elsewhere), spec_config=_tasks(DS))
    assert local_config(job, tmp_path)["tasks"][0]["train"] == str(here)
    assert public_text(f"bad line in {elsewhere} and {here}", job, tmp_path) == f"bad line in {DS} and {DS}"


def test_errors_name_the_dataset_id_not_this_hosts_path(tmp_path: Path) -> None:
    job = _job(_tasks(DS))
    path = layout.dataset_path(tmp_path, T, DS)
    text = public_text(f"{path}:3: missing field; see {tmp_path}/runs/job_1/crash.log", job, tmp_path)
    assert text == f"{DS}:3: missing field; see runs/job_1/crash.log"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports: at the top, inside functions, under TYPE_CHECKING."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_the_runner_and_the_parallel_job_do_not_import_each_other_in_a_cycle() -> None:
    runner, parallel = _imports(SERVICE / "runner.py"), _imports(SERVICE / "parallel_job.py")
    assert "service.parallel_job" in runner  # one direction only
    assert not {"service.runner", "service.runner.run_dir_of"} & parallel
    for shared in ("job_run.py", "layout.py"):
        assert not {"service.runner", "service.parallel_job"} & _imports(SERVICE / shared)


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("train.batch_size=3 must be a multiple", errors=[{"field": "train.batch_size"}]),
        DataError("missing field", file=DS, line=3, field="completion"),
        UnknownNameError("method", "nope", ["seq_lora", "ilora"]),
        StopRequested("stopped at step 3 of task 'a'", step=3),
    ],
)
def test_a_ranks_domain_error_crosses_the_process_boundary_with_its_class_and_details(
    error: CLTuneError,
) -> None:
    payload = json.loads(json.dumps(error_message(error, rank=1)))  # what any pipe or queue carries
    rebuilt = rebuild_error(payload)
    assert type(rebuilt) is type(error)
    assert (rebuilt.message, rebuilt.details, str(rebuilt)) == (error.message, error.details, str(error))
    assert rebuilt.to_dict() == error.to_dict()


def test_a_failed_data_parallel_run_reports_the_domain_error_before_a_stop_or_the_traceback() -> None:
    data = error_message(DataError("bad", file=DS, line=1), rank=1)
    stop = error_message(StopRequested("stopped at step 2", step=2), rank=0)
    unknown = {"rank": 0, "type": "NotAnError", "message": "m", "details": {"x": 1}}
    first = rank_failure([stop, data], "Traceback ...")
    assert isinstance(first, DataError) and first.details["line"] == 1
    assert isinstance(rank_failure([stop], "..."), StopRequested)
    assert type(rank_failure([unknown], "...")) is CLTuneError
    crashed = rank_failure([], "Traceback ...\nRuntimeError: gloo connection closed")
    assert type(crashed) is RuntimeError and "gloo connection closed" in str(crashed)


@pytest.mark.slow  # two spawned gloo ranks import torch and accelerate
@pytest.mark.parametrize("case", ["data", "config"])
def test_a_ranks_data_or_config_error_reaches_the_job_with_its_details(tmp_path: Path, case: str) -> None:
    from service.parallel_job import run_parallel

    bad = layout.dataset_path(tmp_path, T, DS)
    bad.parent.mkdir(parents=True)
    bad.write_text(ROW * 3 + '{"prompt": "q"}\n' if case == "data" else ROW * 8)
    config = {
        "model": {"name": "tiny-llama", "device": "cpu"},
        "tasks": [{"name": "a", "train": DS}],
        "train": {"steps": 1, "batch_size": 2 if case == "data" else 3},
    }
    job = _job(config)
    sent: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(CLTuneError) as e:
        run_parallel(
            job, local_config(job, tmp_path), tmp_path, 2, lambda k, p: sent.append((k, p)), lambda: False
        )
    if case == "data":
        assert type(e.value) is DataError
        assert (e.value.details["file"], e.value.details["line"]) == (str(bad), 4)
        assert e.value.details["field"] == "completion"
    else:
        assert type(e.value) is ConfigError
        assert e.value.details["errors"][0]["field"] == "train.batch_size"
    assert not [k for k, _ in sent if k == "rank_error"]  # kept for the job process, not sent on
