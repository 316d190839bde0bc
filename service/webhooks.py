"""Job webhooks: each tenant's signing secret, the delivery outbox, and the Deliverer that sends it.

When a job ends (succeeded, failed for good, cancelled) and its request named a `webhook_url`, the
transition's own transaction inserts a delivery row (`record`, called from store._set): the event
commits with the transition or not at all, and no HTTP call ever runs inside a job's transaction.
A Deliverer thread in every worker claims due rows (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: BEGIN
IMMEDIATE, as store.claim does), POSTs them outside any transaction and records the outcome: 2xx is
delivered; anything else is retried after BACKOFF_SECONDS (plus jitter) until
CLTUNE_WEBHOOK_MAX_ATTEMPTS, then the delivery is `failed`. Delivery is at least once: a worker that
dies mid-POST leaves the row to be sent again once its claim lapses, so receivers dedupe by
X-Cltune-Delivery.

Signature (Stripe's scheme): `X-Cltune-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>"
keyed with the tenant's secret>`, with a second `v1=` (the previous secret) during a rotation's grace
period; `verify_signature` checks it. A tenant without a secret gets its deliveries unsigned (as GitHub
does) with `X-Cltune-Unsigned` saying why: a verifying receiver rejects them, and nothing is lost
while the tenant sets one up.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cltune.errors import NotFoundError
from service.db import (
    JobRow,
    JobStatus,
    TenantRow,
    WebhookDeliveryRow,
    WebhookSecretRow,
    new_id,
    newest_first,
    session,
    utcnow,
)
from service.settings import Settings, get_settings

log = logging.getLogger("cltune.webhooks")

SECRET_PREFIX = "whsec_"
EVENTS = {
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled",
}
# wait after attempt 1, 2, ...; the last repeats. 8 attempts span about 10 hours
BACKOFF_SECONDS = (10.0, 30.0, 120.0, 600.0, 3600.0, 3 * 3600.0, 6 * 3600.0)
JITTER = 0.2  # each wait is stretched by up to this fraction, so retries of many receivers spread out
MAX_URL_CHARS = 2048
SIGNATURE_HEADER = "X-Cltune-Signature"
ERROR_CHARS = 300  # of a receiver's answer kept in last_error
USER_AGENT = "cltune-webhooks/0.1"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class SignatureError(ValueError):
    """A webhook signature that does not verify; the message says why."""


# ---------------------------------------------------------------- the job's URL


VALID_URL = "an absolute http:// or https:// URL with a host, e.g. https://example.com/hooks/cltune"


def check_url(url: str) -> str:
    """`url` unchanged if the Deliverer can POST to it; else ValueError naming the problem and what is
    valid (the API answers it as a 422 on `webhook_url`)."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError(
            f"contains whitespace or control characters (percent-encode them); valid: {VALID_URL}"
        )
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port outside 0..65535
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        raise ValueError(f"not a valid URL ({e}); valid: {VALID_URL}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme {parts.scheme or '(none)'!r} is not allowed; valid: {VALID_URL}")
    if not parts.hostname:
        raise ValueError(f"the URL names no host; valid: {VALID_URL}")
    return url


def webhook_url_of(spec: dict[str, Any]) -> str | None:
    """The webhook URL a job's request named. It lives in the request as sent (jobs.spec), so a retried
    job notifies the same URL and no column duplicates it."""
    url = spec.get("webhook_url")
    return url if isinstance(url, str) and url else None


# ---------------------------------------------------------------- secrets


@dataclass(frozen=True)
class WebhookSecret:
    tenant_id: str
    created_at: datetime
    previous_valid_until: datetime | None  # the rotated-out secret also signs until then
    secret: str | None = None  # the plaintext: only on the object returned by rotate_secret


def _secret(row: WebhookSecretRow, plaintext: str | None = None) -> WebhookSecret:
    return WebhookSecret(row.tenant_id, row.created_at, row.previous_valid_until, plaintext)


def rotate_secret(engine: Engine, tenant_id: str, grace_seconds: float) -> WebhookSecret:
    """A new signing secret for the tenant (its first, or a replacement). The returned object is the
    only place the API shows it. A replaced secret keeps signing for `grace_seconds` (0: not at all),
    so a receiver can switch to the new one without rejecting deliveries in between.

    Raises:
        NotFoundError: no such tenant.
    """
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    try:
        return _store_secret(engine, tenant_id, secret, grace_seconds)
    except IntegrityError:  # PostgreSQL: a concurrent first rotation inserted the row; replace that one
        return _store_secret(engine, tenant_id, secret, grace_seconds)


def _store_secret(engine: Engine, tenant_id: str, secret: str, grace_seconds: float) -> WebhookSecret:
    now = utcnow()
    with session(engine, write=True) as s:
        if s.get(TenantRow, tenant_id) is None:
            raise NotFoundError(f"tenant {tenant_id!r} not found", resource="tenant", id=tenant_id)
        row = s.get(WebhookSecretRow, tenant_id, with_for_update=True)
        if row is None:
            row = WebhookSecretRow(tenant_id=tenant_id, secret=secret, created_at=now)
            s.add(row)
        else:
            keep = grace_seconds > 0
            row.previous_secret = row.secret if keep else None
            row.previous_valid_until = now + timedelta(seconds=grace_seconds) if keep else None
            row.secret, row.created_at = secret, now
        s.flush()
        return _secret(row, secret)


def get_secret(engine: Engine, tenant_id: str) -> WebhookSecret:
    """When the tenant's secret was made (never the secret itself). Raises NotFoundError if it has none."""
    with session(engine) as s:
        row = s.get(WebhookSecretRow, tenant_id)
        if row is None:
            raise NotFoundError(
                "no webhook secret yet: create one with POST /v1/webhooks/secret (deliveries are sent "
                "unsigned until then)",
                resource="webhook_secret",
            )
        return _secret(row)


def _signing_secrets(s: Session, tenant_id: str, now: datetime) -> tuple[str, ...]:
    row = s.get(WebhookSecretRow, tenant_id)
    if row is None:
        return ()
    grace = row.previous_secret and row.previous_valid_until and row.previous_valid_until > now
    return (row.secret, row.previous_secret) if grace and row.previous_secret else (row.secret,)


# ---------------------------------------------------------------- signatures


def _digest(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def sign(keys: tuple[str, ...] | list[str], body: bytes, t: int) -> str:
    """The X-Cltune-Signature value: `t=<t>,v1=<hex>` with one v1 per key (current secret first)."""
    return ",".join([f"t={t}", *(f"v1={_digest(k, t, body)}" for k in keys)])


def verify_signature(
    secret: str, header: str | None, body: bytes | str, tolerance_s: float = 300, now: float | None = None
) -> int:
    """Check an X-Cltune-Signature header against the raw request body (the bytes received, before any
    JSON parsing: re-serialised JSON differs). Returns the signed unix time.

    Raises:
        SignatureError: the header is missing or malformed; its timestamp is more than `tolerance_s`
            seconds from `now` (default: the clock; a replayed or long-delayed request); or no v1
            signature matches (a wrong secret or an altered body).
    """
    if not header:
        raise SignatureError(
            f"no {SIGNATURE_HEADER} header: the delivery is unsigned (its tenant has no webhook secret)"
        )
    t, sigs = None, []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit():
            t = int(value)
        elif key == "v1":
            sigs.append(value)
    if t is None or not sigs:
        raise SignatureError(
            f"malformed {SIGNATURE_HEADER} {header[:100]!r}: expected 't=<unix seconds>,v1=<hex>[,v1=...]'"
        )
    age = (time.time() if now is None else now) - t
    if abs(age) > tolerance_s:
        raise SignatureError(
            f"signed at {t}, {age:.0f} s from now: outside the tolerance of {tolerance_s:g} s "
            "(a replayed or delayed request, or a wrong clock)"
        )
    data = body.encode() if isinstance(body, str) else body
    expected = _digest(secret, t, data).encode()
    if not any(hmac.compare_digest(expected, s.encode("utf-8", "replace")) for s in sigs):
        raise SignatureError("no v1 signature matches: a wrong secret, or the body was altered")
    return t


# ---------------------------------------------------------------- the outbox


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def job_summary(job: JobRow) -> dict[str, Any]:
    """The job as GET /v1/jobs/{id} shows it, less what can be large (spec, traceback): fetch those."""
    return {
        "id": job.id,
        "status": job.status,
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "progress": job.progress,
        "result": job.result,
        "error": job.error,
        "webhook_url": webhook_url_of(job.spec),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
    }


def record(s: Session, job: JobRow, status: JobStatus) -> None:
    """Queue the job's webhook in the caller's transaction if `status` ends the job and its request
    named a webhook_url (the outbox: it commits with the transition, or not at all)."""
    url = webhook_url_of(job.spec)
    if url is None or status not in EVENTS:
        return
    now, delivery_id = utcnow(), new_id("whd")
    payload = {
        "id": delivery_id,
        "type": EVENTS[status],
        "created_at": _iso(now),
        "data": {"job": job_summary(job)},
    }
    s.add(
        WebhookDeliveryRow(
            id=delivery_id,
            tenant_id=job.tenant_id,
            job_id=job.id,
            type=EVENTS[status],
            payload=payload,
            url=url,
            status=DeliveryStatus.PENDING.value,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


@dataclass(frozen=True)
class Delivery:
    id: str
    tenant_id: str
    job_id: str
    type: str
    url: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    last_status_code: int | None
    signed: bool | None
    payload: dict[str, Any]
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, row: WebhookDeliveryRow) -> Delivery:
        return cls(
            **{f: getattr(row, f) for f in cls.__dataclass_fields__ if f != "status"},
            status=DeliveryStatus(row.status),
        )


def list_deliveries(
    engine: Engine,
    tenant_id: str,
    job_id: str | None = None,
    status: DeliveryStatus | str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Delivery], int]:
    """The tenant's deliveries, newest first, and the total count matching the filters."""
    cond = [WebhookDeliveryRow.tenant_id == tenant_id]
    if job_id is not None:
        cond.append(WebhookDeliveryRow.job_id == job_id)
    if status is not None:
        cond.append(WebhookDeliveryRow.status == DeliveryStatus(status).value)
    with session(engine) as s:
        rows, total = newest_first(s, WebhookDeliveryRow, cond, limit, offset)
        return [Delivery.of(r) for r in rows], total


# ---------------------------------------------------------------- delivery


@dataclass(frozen=True)
class _Claimed:
    id: str
    attempt: int  # the row's attempt count after this claim: the fence for recording the outcome
    type: str
    url: str
    body: bytes
    keys: tuple[str, ...]  # signing secrets; empty: unsigned


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None
    final: bool = False  # retrying cannot help (a refused address): failed at once


def backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based), jitter included."""
    base = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS)) - 1]
    return base * (1 + JITTER * random.random())


def _claim_seconds(settings: Settings) -> float:
    """How long a claimed delivery is reserved: its POST may take connect + write + read timeouts."""
    return 4 * settings.webhook_timeout_seconds + 30


def _claim(engine: Engine, now: datetime, limit: int, reserve_s: float) -> list[_Claimed]:
    """Take up to `limit` due deliveries: count the attempt and push next_attempt_at past the POST, so
    no other Deliverer takes them meanwhile (and a dead one's claim lapses on its own)."""
    due = (
        WebhookDeliveryRow.status == DeliveryStatus.PENDING.value,
        WebhookDeliveryRow.next_attempt_at <= now,
    )
    with session(engine) as s:  # a plain read first: an idle poll never takes SQLite's write lock
        if s.scalar(select(WebhookDeliveryRow.id).where(*due).limit(1)) is None:
            return []
    with session(engine, write=True) as s:
        q = (
            select(WebhookDeliveryRow)
            .where(*due)
            .order_by(WebhookDeliveryRow.next_attempt_at, WebhookDeliveryRow.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        out = []
        for row in s.scalars(q):
            row.attempts += 1
            row.next_attempt_at = now + timedelta(seconds=reserve_s)
            body = json.dumps(row.payload, separators=(",", ":")).encode()
            keys = _signing_secrets(s, row.tenant_id, now)
            out.append(_Claimed(row.id, row.attempts, row.type, row.url, body, keys))
        return out


def _headers(c: _Claimed) -> dict[str, str]:
    h = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Cltune-Event": c.type,
        "X-Cltune-Delivery": c.id,
        "X-Cltune-Attempt": str(c.attempt),
    }
    if c.keys:
        h[SIGNATURE_HEADER] = sign(c.keys, c.body, int(time.time()))  # the real clock: receivers check it
    else:
        h["X-Cltune-Unsigned"] = "the tenant has no webhook secret; create one with POST /v1/webhooks/secret"
    return h


def _private_address(url: str) -> str | None:
    """The first address the URL's host resolves to that is not public (loopback, private, link-local
    such as cloud metadata, reserved), or None. The POST resolves again, so a host that changes its
    answer in between (DNS rebinding) is not stopped here; egress rules on the workers' network are."""
    parts = urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None  # unresolvable: the POST fails with the resolver's own error, and is retried
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])  # drop an IPv6 zone
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if not addr.is_global:
            return str(addr)
    return None


def _post(client: httpx.Client, c: _Claimed, settings: Settings) -> _Outcome:
    """One attempt: 2xx is success; any other answer, a timeout or a connection error is a failure."""
    if not settings.webhook_allow_private and (addr := _private_address(c.url)):
        host = urlsplit(c.url).hostname
        return _Outcome(
            False,
            error=f"refused: host {host!r} resolves to {addr}, a loopback, private or link-local address "
            "(set CLTUNE_WEBHOOK_ALLOW_PRIVATE=1 on the workers to allow it)",
            final=True,
        )
    try:
        with client.stream("POST", c.url, content=c.body, headers=_headers(c)) as r:
            if 200 <= r.status_code < 300:
                return _Outcome(True, r.status_code)  # the body is not read: it does not matter
            return _Outcome(False, r.status_code, f"HTTP {r.status_code} {r.reason_phrase}{_head(r)}")
    except httpx.HTTPError as e:
        return _Outcome(False, error=f"{type(e).__name__}: {e or 'no detail'}"[:ERROR_CHARS])
    except Exception as e:  # a bad delivery must not end the round for the others
        log.exception("webhook %s: unexpected error", c.id)
        return _Outcome(False, error=f"{type(e).__name__}: {e}"[:ERROR_CHARS])


def _head(r: httpx.Response) -> str:
    """': <the start of the answer>' for last_error, or '' if there is none (or it does not come)."""
    try:
        text = next(r.iter_bytes(ERROR_CHARS), b"")[:ERROR_CHARS].decode("utf-8", "replace").strip()
    except httpx.HTTPError:
        return ""
    return f": {text}" if text else ""


def _record(engine: Engine, c: _Claimed, out: _Outcome, now: datetime, max_attempts: int) -> None:
    """Store an attempt's outcome: delivered; failed (attempts spent, or `final`); else due again after
    the backoff. Only the latest claim may write: an attempt whose claim lapsed finds nothing to update."""
    with session(engine, write=True) as s:
        q = select(WebhookDeliveryRow).where(
            WebhookDeliveryRow.id == c.id,
            WebhookDeliveryRow.attempts == c.attempt,
            WebhookDeliveryRow.status == DeliveryStatus.PENDING.value,
        )
        row = s.scalars(q.with_for_update()).one_or_none()
        if row is None:
            log.warning("webhook %s: attempt %d outlived its claim; its outcome is dropped", c.id, c.attempt)
            return
        row.last_status_code, row.last_error, row.signed = out.status_code, out.error, bool(c.keys)
        if out.ok:
            row.status, row.delivered_at, row.next_attempt_at = DeliveryStatus.DELIVERED.value, now, None
        elif out.final or row.attempts >= max_attempts:
            row.status, row.next_attempt_at = DeliveryStatus.FAILED.value, None
        else:
            row.next_attempt_at = now + timedelta(seconds=backoff(row.attempts))


def _client(settings: Settings) -> httpx.Client:
    # no redirects: a 3xx is the receiver's answer (a failure), and a redirect could lead anywhere
    return httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)


def deliver_due(
    engine: Engine,
    settings: Settings | None = None,
    now: datetime | None = None,
    client: httpx.Client | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Attempt every delivery due at `now` once (up to CLTUNE_WEBHOOK_CONCURRENCY POSTs at a time) and
    record each outcome; returns the number of attempts. `now` (default: the clock) also dates the
    retries, so tests drive the backoff without waiting for it."""
    settings = settings or get_settings()
    clock: Callable[[], datetime] = (lambda: now) if now is not None else utcnow
    own = client is None
    http = client or _client(settings)
    n = 0
    try:
        while not (stop and stop.is_set()):
            batch = _claim(engine, clock(), settings.webhook_concurrency, _claim_seconds(settings))
            if not batch:
                break
            with ThreadPoolExecutor(len(batch), thread_name_prefix="webhook-post") as pool:
                outcomes = list(pool.map(lambda c: _post(http, c, settings), batch))
            for c, out in zip(batch, outcomes, strict=True):
                _record(engine, c, out, clock(), settings.webhook_max_attempts)
            n += len(batch)
    finally:
        if own:
            http.close()
    return n


class Deliverer:
    """Sends due webhook deliveries from a daemon thread that polls every CLTUNE_WEBHOOK_POLL_SECONDS.
    Every worker runs one (`start()` / `stop()`); the claims keep two from sending the same delivery at
    once. It never holds up the worker: POSTs run here, with timeouts, outside any transaction."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Deliverer:
        self._thread = threading.Thread(target=self._loop, name="webhook-deliverer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 0.0) -> None:
        """Stop after the attempts in flight; wait up to `timeout` seconds for that (default: not at all)."""
        self._stop.set()
        if self._thread is not None and timeout > 0:
            self._thread.join(timeout)

    def _loop(self) -> None:
        with _client(self.settings) as client:
            while not self._stop.is_set():
                try:
                    deliver_due(self.engine, self.settings, client=client, stop=self._stop)
                except Exception:  # a database hiccup: logged, and the next poll tries again
                    log.exception("webhook delivery round failed")
                self._stop.wait(self.settings.webhook_poll_seconds)
