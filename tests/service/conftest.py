"""Job-store fixtures: a fresh SQLite file per test, and a PostgreSQL schema per test session.

`db_url` / `engine` are parametrised over both backends, so every store and worker test runs on
SQLite and on PostgreSQL. The PostgreSQL schema is created for the session and dropped at the end
(other users of the `test` database never see our tables); rows are deleted after each test.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from service.db import Base, init_db, make_engine
from service.settings import Settings

PG_SERVER = os.environ.get("CLTUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> str | None:
    try:
        eng = create_engine(PG_SERVER, connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
        return None
    except Exception as e:  # any driver error means: no server to test against
        return (
            f"PostgreSQL at {PG_SERVER} is not reachable ({type(e).__name__}: {str(e).splitlines()[0]}); start "
            "it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )


@pytest.fixture(scope="session")
def pg_schema_url() -> Iterator[str]:
    """A URL whose connections live in a fresh schema (search_path), migrated once, dropped at the end."""
    why = _pg_reachable()
    if why:
        pytest.skip(why)
    schema = f"cltune_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_SERVER)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    eng = make_engine(url)
    init_db(eng)
    eng.dispose()
    try:
        yield url
    finally:
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _clear(url: str) -> None:
    eng = make_engine(url)
    with eng.begin() as c:
        for table in reversed(Base.metadata.sorted_tables):
            c.execute(table.delete())
    eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file in tmp_path, or the session's PostgreSQL schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cltune.db'}"
        eng = make_engine(url)
        init_db(eng)
        eng.dispose()
        yield url
        return
    url = request.getfixturevalue("pg_schema_url")
    yield url
    _clear(url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    """Service settings on the test database with short leases and intervals (seconds)."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        lease_seconds=5,
        heartbeat_seconds=0.5,
        max_attempts=3,
        cancel_grace_seconds=2,
    )
