"""Bad input never causes a 500 or a stack trace: every 4xx has one JSON shape and says what is valid."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from .api_support import ADMIN, Api, job_config, jsonl, make_api, upload

LIMIT = 4096  # bytes: a small upload limit so "huge" uploads are cheap to send


@pytest.fixture
def api(tmp_path: Path) -> tuple[Api, dict[str, str]]:
    api = make_api(tmp_path, max_upload_bytes=LIMIT)
    return api, api.tenant("acme")[1]


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body
    assert "Traceback" not in r.text
    return body["error"]


def test_malformed_json_is_a_400_with_the_position(api) -> None:
    api, h = api
    err = error_of(
        api.client.post(
            "/v1/jobs", content=b'{"config": {', headers={**h, "content-type": "application/json"}
        ),
        400,
    )
    assert err["type"] == "invalid_json" and "character" in err["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'"x"',
        b"{}",
        b'{"config": 5}',
        b'{"config": {}, "bogus": 1}',
        b'{"config": {"tasks": []}, "priority": 100000}',
    ],
)
def test_wrongly_shaped_job_requests_are_422(api, body: bytes) -> None:
    api, h = api
    err = error_of(
        api.client.post("/v1/jobs", content=body, headers={**h, "content-type": "application/json"}), 422
    )
    assert err["message"]


def test_a_job_request_that_is_not_json_is_refused(api) -> None:
    api, h = api
    r = api.client.post("/v1/jobs", content=b"config=1", headers={**h, "content-type": "text/plain"})
    assert "application/json" in error_of(r, 415)["message"]


def test_unknown_method_lists_the_valid_ones(api) -> None:
    api, h = api
    ds = upload(api, h)
    err = error_of(
        api.client.post("/v1/jobs", json={"config": job_config(ds, method={"name": "magic"})}, headers=h), 422
    )
    assert "unknown method 'magic'" in err["message"] and "seq_lora" in err["message"]


def test_out_of_range_hyperparameters_report_the_valid_range_all_at_once(api) -> None:
    api, h = api
    ds = upload(api, h)
    cfg = job_config(ds, lora={"r": 0}, method={"name": "npo", "params": {"beta": 1000}})
    cfg["train"]["lr"] = 5
    err = error_of(api.client.post("/v1/jobs", json={"config": cfg}, headers=h), 422)
    valid = {e["field"]: e.get("valid") for e in err["errors"]}
    assert valid == {
        "lora.r": "1 <= r <= 1024",
        "method.params.beta": "0.0 < beta <= 100.0",
        "train.lr": "0 < lr <= 1.0",
    }
    assert "1 <= r <= 1024" in err["message"]


def test_unknown_or_foreign_dataset_ids_and_raw_paths_are_refused(api) -> None:
    api, h = api
    cfg = job_config("ds_missing")
    cfg["tasks"].append({"name": "b", "train": "/etc/passwd", "eval": "ds_other"})
    err = error_of(api.client.post("/v1/jobs", json={"config": cfg}, headers=h), 422)
    assert {e["field"] for e in err["errors"]} == {"tasks.0.train", "tasks.1.train", "tasks.1.eval"}
    assert "GET /v1/datasets" in err["message"]


def test_only_catalog_models_unless_paths_are_allowed(api) -> None:
    api, h = api
    ds = upload(api, h)
    cfg = job_config(ds)
    cfg["model"]["name"] = "/root/.ssh"
    err = error_of(api.client.post("/v1/jobs", json={"config": cfg}, headers=h), 422)
    assert err["errors"][0]["field"] == "model.name" and "tiny-llama" in err["message"]


@pytest.mark.parametrize(
    "where,name",
    [
        ("task", "../escape"),
        ("task", "a/b"),
        ("tenant", "no spaces"),
        ("adapter", "bad name"),
    ],
)
def test_bad_names_are_422_with_the_rule(api, where: str, name: str) -> None:
    api, h = api
    c = api.client
    if where == "task":
        cfg = job_config(upload(api, h))
        cfg["tasks"][0]["name"] = name
        r = c.post("/v1/jobs", json={"config": cfg}, headers=h)
    elif where == "tenant":
        r = c.post(
            "/v1/admin/tenants", json={"name": name}, headers={"Authorization": "Bearer admin-key-for-tests"}
        )
    else:
        r = c.get(f"/v1/adapters/{name}", headers=h)
    err = error_of(r, 422)
    assert "letters, digits" in err["message"]


def test_invalid_records_answer_file_line_and_field(api) -> None:
    api, h = api
    body = jsonl(2) + b'{"prompt": "x"}\n'
    err = error_of(api.client.post("/v1/datasets", files={"file": ("t.jsonl", body)}, headers=h), 422)
    assert (err["type"], err["file"], err["line"], err["field"]) == (
        "invalid_data",
        "t.jsonl",
        3,
        "completion",
    )
    assert list((api.settings.datasets_dir).rglob("*.jsonl")) == []  # nothing kept of a refused upload


@pytest.mark.parametrize("mode", ["multipart", "raw", "chunked"])
def test_uploads_over_the_limit_are_413_with_the_limit_and_leave_nothing(api, mode: str) -> None:
    api, h = api
    big = jsonl(200)
    assert len(big) > LIMIT
    if mode == "multipart":
        r = api.client.post("/v1/datasets", files={"file": ("big.jsonl", big)}, headers=h)
    elif mode == "raw":
        r = api.client.post(
            "/v1/datasets?name=big", content=big, headers={**h, "content-type": "application/x-ndjson"}
        )
    else:  # no Content-Length: the limit is enforced while streaming
        chunks = (big[i : i + 512] for i in range(0, len(big), 512))
        r = api.client.post(
            "/v1/datasets?name=big", content=chunks, headers={**h, "content-type": "application/x-ndjson"}
        )
    err = error_of(r, 413)
    assert err["limit_bytes"] == LIMIT and str(LIMIT) in err["message"]
    assert [p for p in api.settings.datasets_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("ctype", ["application/json", "image/png", ""])
def test_uploads_of_other_content_types_are_415(api, ctype: str) -> None:
    api, h = api
    err = error_of(
        api.client.post("/v1/datasets?name=x", content=jsonl(), headers={**h, "content-type": ctype}), 415
    )
    assert "multipart/form-data" in err["message"]


def test_multipart_without_a_file_part_or_boundary_is_refused(api) -> None:
    api, h = api
    err = error_of(
        api.client.post("/v1/datasets", data={"name": "x"}, files={"other": ("a", b"1")}, headers=h), 422
    )
    assert err["field"] == "file"
    r = api.client.post(
        "/v1/datasets", content=b"--x\r\n", headers={**h, "content-type": "multipart/form-data"}
    )
    error_of(r, 400)


def test_bad_query_parameters_say_what_is_valid(api) -> None:
    api, h = api
    err = error_of(api.client.get("/v1/jobs?status=done", headers=h), 422)
    assert "queued" in err["message"]
    error_of(api.client.get("/v1/jobs?limit=0", headers=h), 422)
    error_of(api.client.get("/v1/adapters/x/download?format=rar", headers=h), 422)


def test_unknown_routes_and_methods_use_the_error_shape(api) -> None:
    api, h = api
    assert error_of(api.client.get("/v1/nothing", headers=h), 404)["type"] == "not_found"
    assert error_of(api.client.put("/v1/jobs", headers=h), 405)["type"] == "method_not_allowed"
    # Allow names every method of the path, not only the first route's (found by schemathesis)
    for method, path, allow in [
        ("PUT", "/v1/datasets", "GET, POST"),
        ("OPTIONS", "/v1/admin/tenants", "GET, POST"),
        ("PATCH", "/v1/adapters/x", "DELETE, GET"),
        ("GET", "/v1/jobs/job_x/cancel", "POST"),
    ]:
        r = api.client.request(method, path, headers=h)
        assert (r.status_code, r.headers["allow"]) == (405, allow) and allow in r.json()["error"]["message"]


def test_conflicts_are_409(api) -> None:
    api, h = api
    ds = upload(api, h)
    job = api.client.post("/v1/jobs", json={"config": job_config(ds)}, headers=h).json()["id"]
    assert error_of(api.client.post(f"/v1/jobs/{job}/retry", headers=h), 409)["status"] == "queued"
    assert (
        "used by queued or running jobs"
        in error_of(api.client.delete(f"/v1/datasets/{ds}", headers=h), 409)["message"]
    )
    api.client.post(f"/v1/jobs/{job}/cancel", headers=h)
    assert error_of(api.client.post(f"/v1/jobs/{job}/cancel", headers=h), 409)["type"] == "conflict"


def test_garbage_at_every_route_never_answers_5xx(api) -> None:
    api, h = api
    paths = api.client.app.openapi()["paths"]
    bodies = [b"\xff\xfe\x00", b"{" * 5000, b'{"config": {"tasks": [{"name": null, "train": []}]}}', b"null"]
    for template, ops in paths.items():
        path = template.replace("{", "").replace("}", "")  # ids that exist nowhere
        key = {"Authorization": f"Bearer {ADMIN}"} if template.startswith("/v1/admin") else h
        for method in ops:
            for body in bodies:
                for ctype in ("application/json", "multipart/form-data; boundary=zz", "application/x-ndjson"):
                    r = api.client.request(
                        method.upper(), path, content=body, headers={**key, "content-type": ctype}
                    )
                    assert r.status_code < 500, (method, path, body[:20], ctype, r.text)


def test_a_declared_length_over_the_limit_is_refused_before_reading(api) -> None:
    api, h = api
    headers = {**h, "content-type": "application/x-ndjson", "content-length": str(10**12)}
    err = error_of(api.client.post("/v1/datasets?name=x", content=jsonl(), headers=headers), 413)
    assert err["limit_bytes"] == LIMIT


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_a_job_config_are_422_not_500(api, value: str) -> None:
    api, h = api
    ds = upload(api, h)
    body = json.dumps({"config": job_config(ds)}).replace(
        '"batch_size": 2', f'"batch_size": 2, "lr": {value}'
    )
    r = api.client.post("/v1/jobs", content=body, headers={**h, "content-type": "application/json"})
    err = error_of(r, 422)
    assert [e["field"] for e in err["errors"]] == ["train.lr"]
    assert value in err["message"] or value.lower() in err["message"].lower() or "lr" in err["message"]


def test_a_lone_surrogate_in_an_uploaded_dataset_is_refused_with_file_line_and_field(api) -> None:
    api, h = api
    body = jsonl(2) + b'{"prompt": "caf\\ud800", "completion": "x"}\n'
    err = error_of(api.client.post("/v1/datasets", files={"file": ("s.jsonl", body)}, headers=h), 422)
    assert (err["type"], err["file"], err["line"], err["field"]) == ("invalid_data", "s.jsonl", 3, "prompt")
    assert "surrogate" in err["message"]
    chat = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}\n'
    err = error_of(api.client.post("/v1/datasets", files={"file": ("c.jsonl", chat)}, headers=h), 422)
    assert (err["line"], err["field"]) == (1, "messages[1].content")
    assert [p for p in api.settings.datasets_dir.rglob("*") if p.is_file()] == []


def test_a_deeply_nested_dataset_line_is_a_clear_422(tmp_path: Path) -> None:
    api = make_api(tmp_path)
    h = api.tenant("acme")[1]
    body = jsonl(1) + b"[" * 100_000 + b"\n"
    err = error_of(api.client.post("/v1/datasets", files={"file": ("deep.jsonl", body)}, headers=h), 422)
    assert (err["line"], err["type"]) == (2, "invalid_data") and "nested" in err["message"]


def test_a_deeply_nested_json_request_body_is_a_400(api) -> None:
    api, h = api
    r = api.client.post("/v1/jobs", content=b"[" * 100_000, headers={**h, "content-type": "application/json"})
    assert error_of(r, 400)["type"] == "invalid_json"


@pytest.mark.parametrize("cut", ["no_closing_boundary", "mid_part"])
def test_a_multipart_upload_without_its_closing_boundary_is_refused_and_leaves_nothing(api, cut: str) -> None:
    api, h = api
    part = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n' + jsonl(4)
    body = part + b"\r\n" if cut == "no_closing_boundary" else part[:-20]
    r = api.client.post(
        "/v1/datasets", content=body, headers={**h, "content-type": "multipart/form-data; boundary=zz"}
    )
    assert "closing boundary" in error_of(r, 400)["message"]
    assert [p for p in api.settings.datasets_dir.rglob("*") if p.is_file()] == []
    ok = api.client.post(
        "/v1/datasets",
        content=part + b"\r\n--zz--\r\n",
        headers={**h, "content-type": "multipart/form-data; boundary=zz"},
    )
    assert ok.status_code == 201 and ok.json()["examples"] == 4, ok.text


@pytest.mark.parametrize(
    "query",
    [
        "/v1/jobs?offset=99999999999999999999",
        "/v1/jobs?offset=2147483649",
        "/v1/jobs?limit=1001",
        "/v1/datasets?offset=99999999999999999999",
        "/v1/datasets?limit=0",
        "/v1/jobs/JOB/events?after_id=99999999999999999999",
        "/v1/jobs/JOB/events?after_id=-1",
        "/v1/jobs/JOB/events/stream?after_id=99999999999999999999",
    ],
)
def test_page_parameters_are_bounded_on_both_databases(tmp_path: Path, db_url: str, query: str) -> None:
    api = make_api(tmp_path, db_url)
    h = api.tenant("acme")[1]
    job = api.client.post("/v1/jobs", json={"config": job_config(upload(api, h))}, headers=h).json()["id"]
    err = error_of(api.client.get(query.replace("JOB", job), headers=h), 422)
    assert err["errors"][0]["field"] in ("offset", "limit", "after_id")
    assert api.client.get("/v1/jobs?offset=2147483648", headers=h).json()["items"] == []


@pytest.mark.parametrize("last", ["99999999999999999999", "-5", "abc"])
def test_a_bad_last_event_id_is_refused_on_both_databases(tmp_path: Path, db_url: str, last: str) -> None:
    api = make_api(tmp_path, db_url)
    h = api.tenant("acme")[1]
    job = api.client.post("/v1/jobs", json={"config": job_config(upload(api, h))}, headers=h).json()["id"]
    r = api.client.get(f"/v1/jobs/{job}/events/stream", headers={**h, "Last-Event-ID": last})
    err = error_of(r, 422)
    assert "Last-Event-ID" in err["message"]


def test_page_bounds_are_in_the_openapi_schema(api) -> None:
    api, _ = api
    spec = api.client.app.openapi()
    params = {p["name"]: p["schema"] for p in spec["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert params["offset"].get("maximum") == 2**31 and params["limit"].get("maximum") == 1000
    page = spec["components"]["schemas"]["JobList"]["properties"]
    assert page["offset"].get("maximum") == 2**31 and page["limit"].get("minimum") == 1


@pytest.mark.parametrize(
    "section,values,field,valid",
    [
        ("lora", {"target_modules": ["nope"]}, "lora.target_modules", "q_proj"),
        ("lora", {"target_modules": ["q_proj", "mlp"]}, "lora.target_modules", "down_proj"),
        ("lora", {"layers_to_transform": [0, 99]}, "lora.layers_to_transform", "0..1"),
        ("model", {"device": "cuda:7"}, "model.device", "cpu"),
        ("model", {"device": "cuda"}, "model.device", "cpu"),
        ("model", {"seed": 2**70}, "model.seed", "2147483647"),
        ("model", {"quantization": "4bit"}, "model.quantization", "none"),
        ("train", {"seed": -5}, "train.seed", "2147483647"),
        ("train", {"seed": 2**40}, "train.seed", "2147483647"),
        ("train", {"warmup_steps": 10**30}, "train.warmup_steps", ""),
        ("train", {"max_grad_norm": float("inf")}, "train.max_grad_norm", "finite"),
        ("train", {"sharding": "fsdp"}, "train.sharding", "none"),
        ("method", {"name": "seq_lora", "params": {}, "x": float("nan")}, "method.x", "finite"),
    ],
)
def test_job_fields_are_checked_before_queueing(
    tmp_path: Path, db_url: str, section: str, values: dict, field: str, valid: str
) -> None:
    """What would fail at run time (or run on a device that is not there) is refused at submit, on
    SQLite and PostgreSQL alike."""
    api = make_api(tmp_path, db_url, worker_cuda=False)  # the workers train on CPU (default: this host's)
    h = api.tenant("acme")[1]
    cfg = job_config(upload(api, h))
    cfg.setdefault(section, {}).update(values)
    r = api.client.post(
        "/v1/jobs", content=json.dumps({"config": cfg}), headers={**h, "content-type": "application/json"}
    )
    err = error_of(r, 422)
    assert field in [e["field"] for e in err["errors"]], err
    assert valid in err["message"], err["message"]
    assert api.client.get("/v1/jobs", headers=h).json()["total"] == 0  # nothing was queued


def test_valid_targets_and_layers_are_accepted(api) -> None:
    api, h = api
    cfg = job_config(
        upload(api, h), lora={"target_modules": ["k_proj", "down_proj"], "layers_to_transform": [1]}
    )
    r = api.client.post("/v1/jobs", json={"config": cfg}, headers=h)
    assert r.status_code == 201, r.text
    cfg = job_config(upload(api, h), lora={"target_modules": "all-linear"})
    assert api.client.post("/v1/jobs", json={"config": cfg}, headers=h).status_code == 201


def test_devices_are_checked_against_what_a_job_gets(tmp_path: Path) -> None:
    api = make_api(tmp_path, worker_cuda=True, devices_per_job=2)
    h = api.tenant("acme")[1]
    ds = upload(api, h)

    def submit(**sections: dict) -> dict:
        cfg = job_config(ds)
        for k, v in sections.items():
            cfg.setdefault(k, {}).update(v)
        return api.client.post("/v1/jobs", json={"config": cfg}, headers=h).json()

    assert submit(model={"device": "cuda:1"}, train={"sharding": "fsdp"})["status"] == "queued"
    err = submit(model={"device": "cuda:2"})["error"]
    assert err["errors"][0]["field"] == "model.device" and "cuda:0, cuda:1" in err["message"]
    err = submit(model={"quantization": "8bit"})["error"]  # tiny-llama is built in code: never quantised
    assert err["errors"][0]["field"] == "model.quantization"


def test_a_dataset_deleted_while_its_job_is_submitted_is_refused_on_both_databases(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/jobs checks the datasets, DELETE /v1/datasets/{id} checks the jobs: the delete landing in
    between must not leave a queued job without its data. The insert re-checks in its own transaction."""
    from service.api.routes import jobs as jobs_route

    api = make_api(tmp_path, db_url)
    h = api.tenant("acme")[1]
    ds = upload(api, h)
    resolve = jobs_route.resolve_config

    def resolve_then_delete(*args, **kwargs):  # the race, made deterministic
        out = resolve(*args, **kwargs)
        assert api.client.delete(f"/v1/datasets/{ds}", headers=h).status_code == 204
        return out

    monkeypatch.setattr(jobs_route, "resolve_config", resolve_then_delete)
    err = error_of(api.client.post("/v1/jobs", json={"config": job_config(ds)}, headers=h), 422)
    assert err["errors"][0]["field"] == "tasks.0.train" and ds in err["message"]
    assert api.client.get("/v1/jobs", headers=h).json()["total"] == 0


def test_retry_rechecks_the_jobs_datasets(tmp_path: Path, db_url: str) -> None:
    api = make_api(tmp_path, db_url)
    h = api.tenant("acme")[1]
    ds = upload(api, h)
    job = api.client.post("/v1/jobs", json={"config": job_config(ds)}, headers=h).json()["id"]
    assert api.client.post(f"/v1/jobs/{job}/cancel", headers=h).json()["status"] == "cancelled"
    assert api.client.delete(f"/v1/datasets/{ds}", headers=h).status_code == 204
    err = error_of(api.client.post(f"/v1/jobs/{job}/retry", headers=h), 409)
    assert ds in err["message"] and "deleted" in err["message"]
    assert api.client.get(f"/v1/jobs/{job}", headers=h).json()["status"] == "cancelled"


def test_staged_uploads_left_by_a_crash_are_removed_at_startup(tmp_path: Path) -> None:
    staging = tmp_path / "data" / "datasets" / "t_x"
    staging.mkdir(parents=True)
    stale, live, kept = staging / ".upload-ds_1.jsonl", staging / ".upload-ds_2.jsonl", staging / "ds_3.jsonl"
    for p in (stale, live, kept):
        p.write_text("{}\n")
    os.utime(stale, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    make_api(tmp_path)  # the app starts: a crashed upload's file goes, one still streaming stays
    assert not stale.exists() and live.exists() and kept.exists()
