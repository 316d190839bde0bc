"""Alembic environment, driven from code: `service.db.init_db(engine)` passes its open connection in
`config.attributes["connection"]`, so no alembic.ini is needed at run time. For new revisions:
`alembic -x url=sqlite:///data/cltune.db ...` is not wired; write them by hand in versions/."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine

from service.db import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        _run(conn)


def _run(connection: Any) -> None:
    # batch mode lets later revisions ALTER tables on SQLite (copy-and-move)
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
