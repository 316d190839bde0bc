"""Tenants and API keys: keys are random, shown once, and stored only as a sha256 hash.

A key looks like `clt_<43 url-safe chars>` (256 random bits), so an unsalted sha256 is enough: there is
no dictionary to attack. The first 8 characters are stored in clear as a lookup prefix; the hash is
compared in constant time. The admin key (CLTUNE_ADMIN_KEY) lives only in the environment.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from cltune.config import check_name
from cltune.errors import ConflictError, NotFoundError
from service.db import ApiKeyRow, TenantRow, new_id, session, utcnow

KEY_PREFIX = "clt_"
LOOKUP_CHARS = 8  # stored in clear in api_keys.prefix
LOCAL_TENANT_ID = "t_local"  # the one tenant when CLTUNE_AUTH_DISABLED=1
LOCAL_TENANT_NAME = "local"


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    key: str | None = None  # the plaintext: only on the object returned by create_key


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _tenant(row: TenantRow) -> Tenant:
    return Tenant(row.id, row.name, row.created_at)


def _key(row: ApiKeyRow, plaintext: str | None = None) -> ApiKey:
    return ApiKey(row.id, row.tenant_id, row.prefix, row.created_at, row.revoked_at, plaintext)


def create_tenant(engine: Engine, name: str, tenant_id: str | None = None) -> Tenant:
    """Create a tenant. Raises InvalidNameError for an unsafe name, ConflictError if it exists."""
    check_name(name, "tenant name")
    try:
        with session(engine, write=True) as s:
            row = TenantRow(id=tenant_id or new_id("t"), name=name, created_at=utcnow())
            s.add(row)
            s.flush()
            return _tenant(row)
    except IntegrityError:
        raise ConflictError(f"tenant {name!r} already exists", name=name) from None


def ensure_tenant(engine: Engine, name: str, tenant_id: str) -> Tenant:
    """The tenant with this id, created if missing (the fixed local tenant)."""
    with session(engine) as s:
        row = s.get(TenantRow, tenant_id)
        if row is not None:
            return _tenant(row)
    try:
        return create_tenant(engine, name, tenant_id)
    except ConflictError:  # created by a concurrent process in between
        with session(engine) as s:
            return _tenant(s.get_one(TenantRow, tenant_id))


def list_tenants(engine: Engine) -> list[Tenant]:
    with session(engine) as s:
        return [_tenant(r) for r in s.scalars(select(TenantRow).order_by(TenantRow.created_at))]


def find_tenant(engine: Engine, ref: str) -> Tenant:
    """A tenant by id or by name. Raises NotFoundError."""
    with session(engine) as s:
        row = s.get(TenantRow, ref) or s.scalars(select(TenantRow).where(TenantRow.name == ref)).one_or_none()
        if row is None:
            raise NotFoundError(f"tenant {ref!r} not found", resource="tenant", id=ref)
        return _tenant(row)


def create_key(engine: Engine, tenant_id: str) -> ApiKey:
    """A new key for the tenant; the returned object is the only place the plaintext ever appears."""
    key = generate_key()
    with session(engine, write=True) as s:
        if s.get(TenantRow, tenant_id) is None:
            raise NotFoundError(f"tenant {tenant_id!r} not found", resource="tenant", id=tenant_id)
        row = ApiKeyRow(
            id=new_id("key"),
            tenant_id=tenant_id,
            prefix=key[:LOOKUP_CHARS],
            key_hash=hash_key(key),
            created_at=utcnow(),
        )
        s.add(row)
        s.flush()
        return _key(row, key)


def list_keys(engine: Engine, tenant_id: str) -> list[ApiKey]:
    with session(engine) as s:
        q = select(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id).order_by(ApiKeyRow.created_at)
        return [_key(r) for r in s.scalars(q)]


def revoke_key(engine: Engine, key_id: str) -> ApiKey:
    """Revoke a key (idempotent). Raises NotFoundError."""
    with session(engine, write=True) as s:
        row = s.get(ApiKeyRow, key_id)
        if row is None:
            raise NotFoundError(f"API key {key_id!r} not found", resource="api_key", id=key_id)
        row.revoked_at = row.revoked_at or utcnow()
        return _key(row)


class KeyCache:
    """Recently verified keys (by hash) -> tenant id, each trusted for `ttl` seconds."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[str, tuple[float, str]] = {}

    def get(self, digest: str) -> str | None:
        hit = self._entries.get(digest)
        if hit is None or time.monotonic() - hit[0] > self.ttl:
            return None
        return hit[1]

    def put(self, digest: str, tenant_id: str) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude but bounded; entries are cheap to re-verify
        self._entries[digest] = (time.monotonic(), tenant_id)

    def clear(self) -> None:
        self._entries.clear()


def authenticate(engine: Engine, key: str, cache: KeyCache | None = None) -> str | None:
    """The tenant id of a valid, unrevoked key, else None. With `cache`, a key verified within its
    ttl skips the database (the lookup is by the key's sha256, which reveals nothing)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 256:
        return None
    digest = hash_key(key)
    if cache is not None and (tenant := cache.get(digest)) is not None:
        return tenant
    tenant = _lookup(engine, key, digest)
    if cache is not None and tenant is not None:
        cache.put(digest, tenant)
    return tenant


def _lookup(engine: Engine, key: str, digest: str) -> str | None:
    with session(engine) as s:
        rows = s.execute(
            select(ApiKeyRow.key_hash, ApiKeyRow.tenant_id).where(
                ApiKeyRow.prefix == key[:LOOKUP_CHARS], ApiKeyRow.revoked_at.is_(None)
            )
        ).all()
    found = None
    for stored, tenant_id in rows:  # compare every candidate: time does not depend on which matched
        if hmac.compare_digest(stored, digest):
            found = tenant_id
    return found


def is_admin(key: str, admin_key: str | None) -> bool:
    """Constant-time comparison with CLTUNE_ADMIN_KEY; always False when it is unset."""
    return bool(admin_key) and hmac.compare_digest(key.encode(), (admin_key or "").encode())
