"""completions carry their kept survival check and characters saved; indexes for the
admin views

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 10:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from feedback.metrics import nearer_kept_window, settled_chars_saved

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("completions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("survival_window_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("survival_ratio", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("chars_saved", sa.Integer(), nullable=True))
        batch_op.create_index(
            "ix_completions_language_created_at", ["language", "created_at"], unique=False
        )
        batch_op.create_index(
            "ix_completions_outcome_created_at", ["outcome", "created_at"], unique=False
        )
    _backfill()


def _backfill() -> None:
    """Work out the new columns for the rows stored before them, as the recorder now does
    for each new event."""
    connection = op.get_bind()
    completions = sa.table(
        "completions",
        sa.column("id"),
        sa.column("outcome"),
        sa.column("accepted_length"),
        sa.column("survival_window_s"),
        sa.column("survival_ratio"),
        sa.column("chars_saved"),
    )
    events = sa.table(
        "events",
        sa.column("completion_id"),
        sa.column("kind"),
        sa.column("window_s"),
        sa.column("survival_ratio"),
    )
    kept: dict[str, tuple[float, float | None]] = {}
    for completion_id, window_s, ratio in connection.execute(
        sa.select(events.c.completion_id, events.c.window_s, events.c.survival_ratio).where(
            events.c.kind == "survival", events.c.window_s.is_not(None)
        )
    ):
        if nearer_kept_window(window_s, kept.get(completion_id, (None, None))[0]):
            kept[completion_id] = (window_s, ratio)
    rows = connection.execute(
        sa.select(completions.c.id, completions.c.outcome, completions.c.accepted_length)
    ).all()
    updates = []
    for completion_id, outcome, accepted_length in rows:
        window_s, ratio = kept.get(completion_id, (None, None))
        saved = settled_chars_saved(outcome, accepted_length, ratio)
        if window_s is not None or saved is not None:
            updates.append({"key": completion_id, "w": window_s, "r": ratio, "s": saved})
    statement = (
        sa.update(completions)
        .where(completions.c.id == sa.bindparam("key"))
        .values(
            survival_window_s=sa.bindparam("w"),
            survival_ratio=sa.bindparam("r"),
            chars_saved=sa.bindparam("s"),
        )
    )
    for start in range(0, len(updates), BATCH):
        connection.execute(statement, updates[start : start + BATCH])


def downgrade() -> None:
    with op.batch_alter_table("completions", schema=None) as batch_op:
        batch_op.drop_index("ix_completions_outcome_created_at")
        batch_op.drop_index("ix_completions_language_created_at")
        batch_op.drop_column("chars_saved")
        batch_op.drop_column("survival_ratio")
        batch_op.drop_column("survival_window_s")
