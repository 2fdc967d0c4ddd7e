"""Indexes for what a start reads: the unfinished requests and the webhooks still to send (the finished
ones are no longer all read back into memory).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("jobs_by_status", "jobs", ["status"])
    op.create_index("jobs_by_webhook_pending", "jobs", ["webhook_pending"])


def downgrade() -> None:
    op.drop_index("jobs_by_webhook_pending", "jobs")
    op.drop_index("jobs_by_status", "jobs")
