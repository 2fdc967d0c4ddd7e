"""The jobs table as the first release made it.

Stores made before migrations existed already have it: then nothing is created.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("jobs"):
        return
    op.create_table(
        "jobs",
        sa.Column("request_id", sa.Text, primary_key=True),
        sa.Column("app_id", sa.Text, nullable=False),
        sa.Column("request_input", sa.Text, nullable=False),
        sa.Column("base_url", sa.Text, nullable=False),
        sa.Column("params", sa.Text),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("start_timeout", sa.Float),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("inference_seconds", sa.Float),
        sa.Column("logs", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text),
        sa.Column("owner", sa.Text),
        sa.Column("webhook_url", sa.Text),
    )
    op.create_index("jobs_by_finish", "jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_table("jobs")
