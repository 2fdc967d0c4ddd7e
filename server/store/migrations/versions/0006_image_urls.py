"""An edit's reference images (`image_urls`, as requested) get their own column, as LoRAs have: they are
fetched again when an unfinished request is recovered.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("image_urls", sa.Text, nullable=False, server_default="[]"))


def downgrade() -> None:
    op.drop_column("jobs", "image_urls")
