"""The LoRAs a request asked for get their own column, out of the generation parameters.

Older rows kept them inside `params`, with the file each was fetched to (fetched anew after a restart
anyway): only the path and scale move over.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("loras", sa.Text, nullable=False, server_default="[]"))
    jobs = sa.table(
        "jobs", sa.column("request_id", sa.Text), sa.column("params", sa.Text), sa.column("loras", sa.Text)
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.request_id, jobs.c.params).where(jobs.c.params.is_not(None)))
    for request_id, text in rows.all():
        params = json.loads(text)
        loras = [{"path": lora["path"], "scale": lora["scale"]} for lora in params.pop("loras", [])]
        connection.execute(
            jobs.update()
            .where(jobs.c.request_id == request_id)
            .values(params=json.dumps(params), loras=json.dumps(loras))
        )


def downgrade() -> None:
    jobs = sa.table(
        "jobs", sa.column("request_id", sa.Text), sa.column("params", sa.Text), sa.column("loras", sa.Text)
    )
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(jobs.c.request_id, jobs.c.params, jobs.c.loras).where(jobs.c.params.is_not(None))
    )
    for request_id, text, loras in rows.all():
        params = {**json.loads(text), "loras": json.loads(loras)}
        connection.execute(
            jobs.update().where(jobs.c.request_id == request_id).values(params=json.dumps(params))
        )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("loras")
