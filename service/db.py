"""Stored rows (SQLAlchemy 2, typed ORM), engines and schema migrations.

SQLite is the embedded default (one file in the data dir, WAL); PostgreSQL serves several hosts.
Rows are named `...Row`; the job state machine and the domain objects live in service/store.py,
webhook secrets and deliveries in service/webhooks.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

MIGRATIONS = Path(__file__).parent / "migrations"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """`<prefix>_<16 hex>`: 64 random bits, unguessable across tenants."""
    return f"{prefix}_{secrets.token_hex(8)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite has no time zones), returned as aware UTC on every backend."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, _dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use service.db.utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, _dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "t_<hex>"
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "key_<hex>"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)  # first 8 characters of the key: lookup
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key; the key is never stored
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "ds_<hex>"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))  # chat | alpaca | prompt_completion
    examples: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # the claim query: WHERE status='queued' ORDER BY priority DESC, created_at
        Index("ix_jobs_claim", "status", "priority", "created_at"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "job_<hex>"
    tenant_id: Mapped[str] = mapped_column(String(32))  # no FK: internal jobs may have no tenant row
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the request as sent (dataset ids, not paths)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # the resolved RunConfig the runner trains
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher runs first
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    traceback: Mapped[str | None] = mapped_column(Text, default=None)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # last step/total/loss/eta
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # the SSE cursor
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(32))
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")  # debug | info | warning | error
    type: Mapped[str] = mapped_column(String(32))  # transition name | progress | log | eval
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class WebhookSecretRow(Base):
    __tablename__ = "webhook_secrets"

    # one per tenant. Stored in clear, unlike API keys: the server needs it to sign every delivery
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(64))  # "whsec_<43 url-safe chars>"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    previous_secret: Mapped[str | None] = mapped_column(String(64), default=None)  # rotated out; still
    previous_valid_until: Mapped[datetime | None] = mapped_column(default=None)  # signs until then


class WebhookDeliveryRow(Base):
    """The outbox: written in the transaction that ends a job, sent later by a worker's Deliverer."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # the claim query: WHERE status='pending' AND next_attempt_at <= now ORDER BY next_attempt_at
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant_created", "tenant_id", "created_at"),
        Index("ix_webhook_deliveries_job", "job_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "whd_<hex>": X-Cltune-Delivery
    tenant_id: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.cancelled
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)  # the body sent, as JSON
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # POSTs started so far
    # pending: when the next attempt is due (while one is in flight: when it is retried if it never reports)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    signed: Mapped[bool | None] = mapped_column(Boolean, default=None)  # the last attempt carried a signature
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


# ---------------------------------------------------------------- engines


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine for `url`. SQLite: WAL, a 30 s busy timeout, foreign keys, and transactions that
    take the write lock at BEGIN when opened through `writer(engine)` (so claims are atomic)."""
    if not url.startswith("sqlite"):
        kwargs.setdefault("pool_pre_ping", True)
        # FastAPI runs sync routes on up to 40 threads: enough connections that none waits for one
        kwargs.setdefault("pool_size", 20)
        kwargs.setdefault("max_overflow", 20)
        return create_engine(url, **kwargs)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy emit BEGIN itself (pysqlite's own is lazy)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA busy_timeout=30000")  # ms a writer waits for the lock instead of failing
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock now: a read-then-write transaction (claim) cannot interleave
        # with another writer. Plain reads stay DEFERRED so API polling never queues behind workers.
        mode = "IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine whose transactions are write transactions (SQLite: BEGIN IMMEDIATE)."""
    return engine.execution_options(sqlite_immediate=True)


@contextmanager
def session(engine: Engine, *, write: bool = False) -> Iterator[Session]:
    """A Session in one transaction: committed on success, rolled back on error.
    Rows stay readable after the block (expire_on_commit=False)."""
    with Session(writer(engine) if write else engine, expire_on_commit=False) as s, s.begin():
        yield s


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    url = engine.url.render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ini syntax: % must be doubled
    return cfg


def init_db(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration (idempotent; safe with several workers
    on PostgreSQL: an advisory lock serialises concurrent upgrades)."""
    from alembic import command

    cfg = alembic_config(engine)
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(74224001)")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def newest_first(s: Session, row: Any, cond: list[Any], limit: int, offset: int) -> tuple[list[Any], int]:
    """One page of the `row` table's rows matching `cond`, newest first (created_at, then id, so pages
    never overlap), and how many rows match in all."""
    total = s.scalar(select(func.count()).select_from(row).where(*cond)) or 0
    page = s.scalars(
        select(row).where(*cond).order_by(row.created_at.desc(), row.id.desc()).limit(limit).offset(offset)
    )
    return list(page), total
