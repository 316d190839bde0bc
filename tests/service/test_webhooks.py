"""Job webhooks against a real HTTP receiver on loopback: the outbox row of every ending transition, the
signature, retries with backoff (time driven through `now`, never slept), failure after the last attempt,
a hanging receiver that cannot slow the worker, and the API (secret shown once, tenancy, 422s)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from service import auth, store, webhooks
from service.db import JobStatus, utcnow
from service.settings import Settings
from service.webhooks import SignatureError, deliver_due, verify_signature
from service.worker import Worker

from .api_support import free_port, job_config, make_api, upload, wait_until

T = "t_a"


@dataclass
class Received:
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    answers: list[int]  # status codes to answer, in order; then 200
    delay: float  # seconds each answer waits (a hanging receiver)
    got: list[Received] = field(default_factory=list)


@contextmanager
def receiving(answers: tuple[int, ...] = (), delay: float = 0.0) -> Iterator[Receiver]:
    """An HTTP server on a free loopback port that records every POST and answers as scripted."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                rec.got.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                code = rec.answers.pop(0) if rec.answers else 200
            time.sleep(rec.delay)
            self.send_response(code)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"nope" if code >= 300 else b"ok!!")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads, server.block_on_close = True, False  # a hanging answer never holds up teardown
    rec = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hooks/cltune", list(answers), delay)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


def _dead_url() -> str:
    """A loopback port nobody listens on: every connection is refused at once."""
    return f"http://127.0.0.1:{free_port()}/gone"


@pytest.fixture
def hooks(settings: Settings) -> Settings:
    """Webhooks to loopback allowed, polled often, with short timeouts."""
    return settings.model_copy(
        update={"webhook_allow_private": True, "webhook_poll_seconds": 0.05, "webhook_timeout_seconds": 2.0}
    )


def _noop(engine: Engine, url: str | None, **spec: Any) -> store.Job:
    return store.enqueue(engine, T, {"kind": "noop", "webhook_url": url, **spec}, {}, max_attempts=3)


def _deliveries(engine: Engine, job: store.Job) -> list[webhooks.Delivery]:
    return webhooks.list_deliveries(engine, T, job_id=job.id)[0]


@contextmanager
def working(settings: Settings) -> Iterator[Worker]:
    """A worker (jobs in-process) running in a thread; on exit it stops, and so does its Deliverer."""
    worker = Worker(settings, worker_id="w1", poll_seconds=0.05, isolate=False)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(10)
        assert not thread.is_alive()
        if worker.deliverer is not None:  # its POST in flight ends within the timeout
            worker.deliverer.stop(timeout=settings.webhook_timeout_seconds + 5)


# ---------------------------------------------------------------- events and signatures


def test_a_finished_job_posts_job_succeeded_signed_with_the_tenant_secret(
    hooks: Settings, engine: Engine
) -> None:
    auth.create_tenant(engine, "acme", tenant_id=T)
    secret = webhooks.rotate_secret(engine, T, grace_seconds=0).secret
    assert secret is not None and secret.startswith("whsec_")
    with receiving() as rx, working(hooks):  # the worker's Deliverer thread sends the webhook
        job = _noop(engine, rx.url, steps=2)
        wait_until(lambda: len(rx.got) == 1, 10, "the webhook", poll=0.02)
    got = rx.got[0]
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-cltune-event"] == "job.succeeded"
    assert got.headers["x-cltune-delivery"] == got.json["id"] and got.json["id"].startswith("whd_")
    assert got.json["type"] == "job.succeeded" and got.json["created_at"].endswith("Z")
    sent = got.json["data"]["job"]
    assert sent["id"] == job.id and sent["status"] == "succeeded" and sent["error"] is None
    assert sent["result"]["steps"] == 2 and sent["webhook_url"] == rx.url
    # the signature verifies with the tenant's secret, and with nothing else
    header = got.headers["x-cltune-signature"]
    assert verify_signature(secret, header, got.body) <= time.time()
    with pytest.raises(SignatureError, match="wrong secret"):
        verify_signature(secret + "x", header, got.body)
    with pytest.raises(SignatureError, match="altered"):
        verify_signature(secret, header, got.body.replace(b"succeeded", b"failed"))
    with pytest.raises(SignatureError, match="tolerance"):
        verify_signature(secret, header, got.body, now=time.time() + 301)
    with pytest.raises(SignatureError, match="malformed"):
        verify_signature(secret, "v1=abc", got.body)
    (d,) = _deliveries(engine, job)
    assert d.status == "delivered", d
    assert d.attempts == 1 and d.last_status_code == 200 and d.signed and d.delivered_at is not None
    assert d.next_attempt_at is None and d.last_error is None


def test_every_ending_transition_queues_its_event_and_nothing_else_does(
    hooks: Settings, engine: Engine
) -> None:
    """queued -> cancelled, running -> cancelled, a retried failure (no event), a final failure; a job
    without a URL gets none. The tenant has no secret: deliveries go out unsigned and say so."""
    with receiving() as rx:
        queued = _noop(engine, rx.url)
        assert store.request_cancel(engine, T, queued.id).status is JobStatus.CANCELLED
        failing, running, silent = _noop(engine, rx.url), _noop(engine, rx.url), _noop(engine, None)
        for job in (failing, running, silent):
            claimed = store.claim(engine, "w1", 30)
            assert claimed is not None and claimed.id == job.id
        store.fail(engine, failing.id, "w1", "RuntimeError: first", None, retry=True)  # re-queued: no event
        assert _deliveries(engine, failing) == []
        store.request_cancel(engine, T, running.id)  # running: only cancel_requested, no event yet
        assert _deliveries(engine, running) == []
        store.mark_cancelled(engine, running.id, "w1")
        assert (again := store.claim(engine, "w1", 30)) is not None and again.id == failing.id
        store.fail(engine, failing.id, "w1", "RuntimeError: second", None, retry=False)
        store.finish(engine, silent.id, "w1", {"ok": True})
        assert deliver_due(engine, hooks) == 3
    events = {r.json["data"]["job"]["id"]: r for r in rx.got}
    assert set(events) == {queued.id, running.id, failing.id}
    assert {j: r.headers["x-cltune-event"] for j, r in events.items()} == {
        queued.id: "job.cancelled",
        running.id: "job.cancelled",
        failing.id: "job.failed",
    }
    assert events[failing.id].json["data"]["job"]["error"] == "RuntimeError: second"
    unsigned = events[queued.id]
    assert (
        "x-cltune-signature" not in unsigned.headers
        and "POST /v1/webhooks/secret" in unsigned.headers["x-cltune-unsigned"]
    )
    with pytest.raises(SignatureError, match="unsigned"):
        verify_signature("whsec_any", unsigned.headers.get("x-cltune-signature"), unsigned.body)
    assert _deliveries(engine, queued)[0].signed is False
    assert webhooks.list_deliveries(engine, T, job_id=silent.id) == ([], 0)


# ---------------------------------------------------------------- retries


def test_a_receiver_that_fails_twice_gets_three_attempts_with_growing_waits(
    hooks: Settings, engine: Engine
) -> None:
    with receiving(answers=(500, 503)) as rx:
        job = _noop(engine, rx.url)
        store.request_cancel(engine, T, job.id)
        now = utcnow()
        waits = []
        for attempt, expect in ((1, "pending"), (2, "pending"), (3, "delivered")):
            assert deliver_due(engine, hooks, now=now) == 1
            assert deliver_due(engine, hooks, now=now) == 0  # not due again yet
            (d,) = _deliveries(engine, job)
            assert d.attempts == attempt and d.status == expect, d
            if d.next_attempt_at is not None:
                waits.append((d.next_attempt_at - now).total_seconds())
                now = d.next_attempt_at
    first, second = waits
    assert 10 <= first <= 10 * 1.2 and 30 <= second <= 30 * 1.2  # backoff plus at most 20 % jitter
    assert [r.headers["x-cltune-attempt"] for r in rx.got] == ["1", "2", "3"]
    assert len({r.headers["x-cltune-delivery"] for r in rx.got}) == 1  # one delivery, three attempts
    assert d.last_status_code == 200 and d.last_error is None


def test_a_dead_url_is_failed_after_the_last_attempt(hooks: Settings, engine: Engine) -> None:
    job = _noop(engine, _dead_url())
    store.request_cancel(engine, T, job.id)
    now, waits = utcnow(), []
    for _ in range(hooks.webhook_max_attempts):
        assert deliver_due(engine, hooks, now=now) == 1
        (d,) = _deliveries(engine, job)
        if d.next_attempt_at is not None:
            waits.append(d.next_attempt_at - now)
            now = d.next_attempt_at
    assert d.status == "failed" and d.attempts == hooks.webhook_max_attempts == 8
    assert "ConnectError" in (d.last_error or "") and d.last_status_code is None and d.next_attempt_at is None
    assert waits == sorted(waits) and len(waits) == 7 and waits[-1] >= timedelta(hours=6)
    assert deliver_due(engine, hooks, now=now + timedelta(days=30)) == 0  # failed is final


def test_a_private_address_is_refused_unless_the_workers_allow_it(settings: Settings, engine: Engine) -> None:
    with receiving() as rx:
        job = _noop(engine, rx.url)
        store.request_cancel(engine, T, job.id)
        assert deliver_due(engine, settings) == 1  # webhook_allow_private defaults to False
    (d,) = _deliveries(engine, job)
    assert d.status == "failed" and d.attempts == 1 and rx.got == []
    assert "127.0.0.1" in (d.last_error or "") and "CLTUNE_WEBHOOK_ALLOW_PRIVATE=1" in (d.last_error or "")


def test_a_hanging_receiver_does_not_hold_up_the_worker(hooks: Settings, engine: Engine) -> None:
    hooks = hooks.model_copy(update={"webhook_timeout_seconds": 1.0})
    with receiving(delay=3.0) as rx:  # answers after 3 s; the Deliverer gives up after 1 s
        jobs = [_noop(engine, rx.url) for _ in range(3)]
        t0 = time.monotonic()
        with working(hooks):
            wait_until(lambda: store.count_by_status(engine)["succeeded"] == 3, 10, "the jobs", poll=0.02)
            elapsed = time.monotonic() - t0
            wait_until(lambda: len(rx.got) >= 1, 5, "the first POST", poll=0.02)
    # had a POST run on the claim loop or in a supervisor, each job would wait for its timeout (1 s)
    assert elapsed < 1.5, elapsed
    errors = [d.last_error or "" for j in jobs for d in _deliveries(engine, j)]
    assert any(e.startswith("ReadTimeout") for e in errors), errors  # the POST itself did give up


# ---------------------------------------------------------------- the API


def test_the_secret_is_shown_once_and_a_tenant_sees_only_its_own_deliveries(tmp_path: Path) -> None:
    api = make_api(tmp_path, webhook_allow_private=True)
    c = api.client
    _, ha = api.tenant("acme")
    _, hb = api.tenant("other")
    assert c.get("/v1/webhooks/secret", headers=ha).status_code == 404
    first = c.post("/v1/webhooks/secret", headers=ha)
    assert first.status_code == 201, first.text
    second = c.post("/v1/webhooks/secret", headers=ha).json()  # rotated: the first still signs (grace)
    assert second["secret"] != first.json()["secret"] and second["previous_valid_until"] is not None
    shown = c.get("/v1/webhooks/secret", headers=ha)
    assert shown.status_code == 200 and "secret" not in shown.json() and "whsec_" not in shown.text
    with receiving() as rx:
        ds = upload(api, ha)
        r = c.post("/v1/jobs", json={"config": job_config(ds), "webhook_url": rx.url}, headers=ha)
        assert r.status_code == 201 and r.json()["webhook_url"] == rx.url, r.text
        job = r.json()["id"]
        assert c.post(f"/v1/jobs/{job}/cancel", headers=ha).json()["status"] == "cancelled"
        listed = c.get("/v1/webhooks/deliveries", params={"job_id": job}, headers=ha).json()
        assert listed["total"] == 1 and listed["items"][0]["status"] == "pending"
        assert listed["items"][0]["type"] == "job.cancelled" and listed["items"][0]["url"] == rx.url
        assert c.get("/v1/webhooks/deliveries", headers=hb).json()["total"] == 0
        other = c.get("/v1/webhooks/deliveries", params={"job_id": job}, headers=hb)
        assert other.status_code == 404 and other.json()["error"]["type"] == "not_found"
        assert deliver_due(c.app.state.db, api.settings) == 1  # type: ignore[attr-defined]
    (got,) = rx.got
    header = got.headers["x-cltune-signature"]
    assert header.count("v1=") == 2  # new secret first, then the rotated-out one
    for secret in (second["secret"], first.json()["secret"]):
        verify_signature(secret, header, got.body)
    done = c.get("/v1/webhooks/deliveries", params={"status": "delivered"}, headers=ha).json()
    assert done["total"] == 1 and done["items"][0]["last_status_code"] == 200 and done["items"][0]["signed"]


@pytest.mark.parametrize(
    "url, says",
    [
        ("ftp://example.com/hook", "scheme 'ftp' is not allowed"),
        ("example.com/hook", "scheme '(none)' is not allowed"),
        ("https:///hook", "no host"),
        ("https://exa mple.com/hook", "whitespace"),
        ("http://example.com:99999/", "not a valid URL"),
        ("https://example.com/" + "a" * 2048, "at most 2048 characters"),
        (5, "valid string"),
    ],
)
def test_a_bad_webhook_url_is_a_422_naming_the_field_and_what_is_valid(
    tmp_path: Path, url: Any, says: str
) -> None:
    api = make_api(tmp_path)
    _, h = api.tenant("acme")
    r = api.client.post(
        "/v1/jobs", json={"config": job_config("ds_0123456789abcdef"), "webhook_url": url}, headers=h
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request" and [e["field"] for e in err["errors"]] == ["webhook_url"]
    assert says in err["message"] and "webhook_url" in err["message"]
    if isinstance(url, str) and len(url) < 100:
        assert "http:// or https://" in err["message"]
