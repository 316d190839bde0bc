"""Bad input never causes a 500 or a stack trace: every 4xx has one JSON shape and says what is valid."""

from __future__ import annotations

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
        "method": "0.0 < beta <= 100.0",
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
        ("dataset", "../../x.jsonl"),
        ("dataset", ".hidden"),
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
    elif where == "dataset":
        r = c.post("/v1/datasets", files={"file": (name, jsonl())}, headers=h)
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
