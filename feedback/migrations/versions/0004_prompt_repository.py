"""the repository snippets a prompt held (issue 40): on completions and preference pairs

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("completions", "preference_pairs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("prompt_repository", sa.Text(), nullable=False, server_default="")
            )


def downgrade() -> None:
    for table in ("completions", "preference_pairs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("prompt_repository")
