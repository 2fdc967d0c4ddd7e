"""Each stored file's owner in the store, rather than rebuilt in memory from the requests at startup.

The files of completed requests already in the store are indexed here, dated by their completion.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    files = op.create_table(
        "files",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("files_by_age", "files", ["created_at"])
    jobs = sa.table(
        "jobs",
        sa.column("request_input", sa.Text),
        sa.column("outcome", sa.Text),
        sa.column("owner", sa.Text),
        sa.column("finished_at", sa.Float),
    )
    connection = op.get_bind()
    query = sa.select(jobs.c.request_input, jobs.c.outcome, jobs.c.owner, jobs.c.finished_at)
    rows = []
    for request_input, outcome, owner, finished_at in connection.execute(
        query.where(jobs.c.outcome.is_not(None))
    ):
        answer = json.loads(outcome)
        if answer["status_code"] != 200 or json.loads(request_input).get("sync_mode"):
            continue  # no files: an error, or images sent inline
        for image in answer["body"].get("images", []):
            rows.append({"name": image["file_name"], "owner": owner, "created_at": finished_at})
    if rows:
        op.bulk_insert(files, rows)


def downgrade() -> None:
    op.drop_table("files")
