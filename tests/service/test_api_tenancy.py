"""Tenant isolation over every endpoint: tenant B can neither see nor touch tenant A's datasets, jobs,
events or adapters, and each of A's resources answers B with 404 (never 403)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .api_support import ADMIN, Api, fake_adapter, job_config, make_api, upload

# Every tenant-scoped route, with the request tenant B sends at tenant A's resource.
# {ds}, {job}, {adapter} are A's ids. "list" routes must answer 200 without A's items.
B_REQUESTS = {
    ("POST", "/v1/datasets"): None,  # creates B's own dataset: covered by the job-config case below
    ("GET", "/v1/datasets"): "list",
    ("GET", "/v1/datasets/{dataset_id}"): 404,
    ("DELETE", "/v1/datasets/{dataset_id}"): 404,
    ("POST", "/v1/jobs"): 422,  # a config that names A's dataset: unknown dataset for B
    ("GET", "/v1/jobs"): "list",
    ("GET", "/v1/jobs/{job_id}"): 404,
    ("GET", "/v1/jobs/summary"): 404,  # ?ids= A's job
    ("GET", "/v1/jobs/{job_id}/events"): 404,
    ("GET", "/v1/jobs/{job_id}/events/stream"): 404,
    ("POST", "/v1/jobs/{job_id}/cancel"): 404,
    ("POST", "/v1/jobs/{job_id}/retry"): 404,
    ("GET", "/v1/jobs/{job_id}/checkpoints"): 404,
    ("POST", "/v1/jobs/{job_id}/checkpoints/publish"): 404,
    ("GET", "/v1/jobs/{job_id}/metrics"): 404,
    ("GET", "/v1/jobs/{job_id}/plots/{plot}"): 404,
    ("GET", "/v1/jobs/{job_id}/tensorboard"): 404,
    ("POST", "/v1/adapters"): None,  # imports into B's own registry: tests/service/test_adapter_import.py
    ("GET", "/v1/adapters"): "list",
    ("GET", "/v1/adapters/{name}"): 404,
    ("DELETE", "/v1/adapters/{name}"): 404,
    ("GET", "/v1/adapters/{name}/versions"): 404,
    ("GET", "/v1/adapters/{name}/versions/{version}"): 404,
    ("GET", "/v1/adapters/{name}/download"): 404,
    ("GET", "/v1/models"): "list",  # OpenAI-compatible inference: A's adapters are not B's models
    ("POST", "/v1/completions"): 404,
    ("POST", "/v1/chat/completions"): 404,
    ("POST", "/v1/webhooks/secret"): None,  # rotates B's own secret
    ("GET", "/v1/webhooks/secret"): 404,  # B has none; A's is never shown to B
    ("GET", "/v1/webhooks/deliveries"): "list",  # A's cancelled job notified A's URL
}
BODIES = {
    "/v1/completions": {"model": "secret-adapter", "prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"model": "secret-adapter", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/jobs/{job_id}/checkpoints/publish": {"task": "t", "step": 1},
}
NOT_TENANT_SCOPED = {"/healthz", "/metrics"}


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> tuple[Api, dict[str, str], dict[str, str], dict[str, str]]:
    """Tenants A and B (on SQLite and on PostgreSQL: `db_url` from conftest), and A's resources."""
    api = make_api(tmp_path, db_url)
    a_id, a = api.tenant("tenant-a")
    _, b = api.tenant("tenant-b")
    ds = upload(api, a)
    running = api.client.post("/v1/jobs", json={"config": job_config(ds)}, headers=a).json()["id"]
    hook = {"config": job_config(ds), "webhook_url": "https://hooks.example.com/cltune"}
    cancelled = api.client.post("/v1/jobs", json=hook, headers=a).json()["id"]
    assert api.client.post("/v1/webhooks/secret", headers=a).status_code == 201
    assert api.client.post(f"/v1/jobs/{cancelled}/cancel", headers=a).status_code == 200  # retryable
    fake_adapter(api.settings, a_id, "secret-adapter")
    ids = {
        "dataset_id": ds,
        "job_id": running,
        "cancelled": cancelled,
        "name": "secret-adapter",
        "version": "1",
        "plot": "heatmap",
    }
    return api, a, b, ids


def test_the_tenancy_table_covers_every_route(world) -> None:
    api = world[0]
    routes = {
        (m.upper(), p)
        for p, ops in api.client.app.openapi()["paths"].items()
        for m in ops
        if not p.startswith("/v1/admin") and p not in NOT_TENANT_SCOPED
    }
    assert routes == set(B_REQUESTS), "add new tenant-scoped routes to B_REQUESTS"


def test_tenant_b_cannot_list_read_download_cancel_retry_or_delete_tenant_a_resources(world) -> None:
    api, a, b, ids = world
    c = api.client
    for (method, template), expect in B_REQUESTS.items():
        if expect is None:
            continue
        path = template.format(**ids)
        if template.endswith("/retry"):
            path = template.format(job_id=ids["cancelled"])
        if template.endswith("/summary"):
            path += f"?ids={ids['job_id']}"
        body = {"config": job_config(ids["dataset_id"])} if template == "/v1/jobs" else BODIES.get(template)
        r = c.request(method, path, headers=b, json=body)
        if expect == "list":
            assert r.status_code == 200, (method, path, r.text)
            items = r.json()["items"] if "items" in r.json() else r.json()["data"]
            leaks = (ids["dataset_id"], ids["job_id"], ids["cancelled"], "secret-adapter")
            assert not any(leak in str(x) for x in items for leak in leaks), (path, items)
            continue
        assert r.status_code == expect, (method, path, r.status_code, r.text)
        err = r.json()["error"]
        if expect == 422:
            assert ids["dataset_id"] in err["message"]
        elif template.endswith("completions"):  # OpenAI's error shape for an unknown model
            assert err["code"] == "model_not_found"
        else:
            assert err["type"] == "not_found"
    # nothing of A's changed: same dataset, a job still queued, the cancelled one not retried, the adapter
    assert c.get(f"/v1/datasets/{ids['dataset_id']}", headers=a).status_code == 200
    assert c.get(f"/v1/jobs/{ids['job_id']}", headers=a).json()["status"] == "queued"
    assert c.get(f"/v1/jobs/{ids['cancelled']}", headers=a).json()["status"] == "cancelled"
    assert c.get("/v1/adapters/secret-adapter", headers=a).json()["ref"] == "secret-adapter@1"
    assert c.get("/v1/jobs", headers=a).json()["total"] == 2


def test_a_missing_resource_and_another_tenants_answer_identically(world) -> None:
    api, _, b, ids = world
    other = api.client.get(f"/v1/jobs/{ids['job_id']}", headers=b).json()["error"]
    missing = api.client.get("/v1/jobs/job_0000000000000000", headers=b).json()["error"]
    assert other["type"] == missing["type"] == "not_found"
    assert other.keys() == missing.keys()


def test_every_tenant_route_refuses_requests_without_a_valid_key(world) -> None:
    api, _, _, ids = world
    for method, template in B_REQUESTS:
        for headers in (
            {},
            {"Authorization": "Bearer clt_not-a-real-key"},
            {"Authorization": f"Bearer {ADMIN}"},
        ):
            r = api.client.request(method, template.format(**ids), headers=headers)
            assert r.status_code == 401, (method, template, headers, r.text)
            assert r.json()["error"]["type"] == "unauthorized"


def test_a_revoked_key_stops_working(world) -> None:
    api, _, _, _ = world
    admin = {"Authorization": f"Bearer {ADMIN}"}
    key = api.client.post("/v1/admin/tenants/tenant-a/keys", headers=admin).json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert api.client.get("/v1/jobs", headers=headers).status_code == 200
    assert api.client.post(f"/v1/admin/keys/{key['id']}/revoke", headers=admin).status_code == 200
    assert api.client.get("/v1/jobs", headers=headers).status_code == 401


def test_admin_routes_refuse_tenant_keys(world) -> None:
    api, a, _, _ = world
    r = api.client.post("/v1/admin/tenants", json={"name": "evil"}, headers=a)
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    assert api.client.get("/v1/admin/tenants", headers=a).status_code == 403
