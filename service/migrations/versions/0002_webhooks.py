"""Job webhooks: one signing secret per tenant, and the delivery outbox.

A job's webhook URL needs no column: it is part of the request as sent (jobs.spec).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=False), nullable=nullable)  # naive UTC, see db.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "webhook_secrets",
        sa.Column(
            "tenant_id", sa.String(32), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("secret", sa.String(64), nullable=False),
        _ts("created_at"),
        sa.Column("previous_secret", sa.String(64), nullable=True),
        _ts("previous_valid_until", nullable=True),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        _ts("next_attempt_at", nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_status_code", sa.Integer, nullable=True),
        sa.Column("signed", sa.Boolean, nullable=True),
        _ts("created_at"),
        _ts("delivered_at", nullable=True),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_deliveries_tenant_created", "webhook_deliveries", ["tenant_id", "created_at"])
    op.create_index("ix_webhook_deliveries_job", "webhook_deliveries", ["job_id"])


def downgrade() -> None:
    for table in ("webhook_deliveries", "webhook_secrets"):
        op.drop_table(table)
