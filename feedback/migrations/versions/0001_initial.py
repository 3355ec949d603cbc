"""initial schema: completions, events, runs, pairs, adapters

Revision ID: 0001
Revises:
Create Date: 2026-11-25 15:19:38.321697
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "completions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user", sa.String(length=200), nullable=False),
        sa.Column("client_name", sa.String(length=100), nullable=False),
        sa.Column("client_version", sa.String(length=100), nullable=False),
        sa.Column("language", sa.String(length=50), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("base_model", sa.String(length=300), nullable=False),
        sa.Column("adapter_version", sa.String(length=100), nullable=True),
        sa.Column("arm", sa.String(length=20), nullable=True),
        sa.Column("template", sa.String(length=50), nullable=False),
        sa.Column("prompt_prefix", sa.Text(), nullable=False),
        sa.Column("prompt_suffix", sa.Text(), nullable=False),
        sa.Column("suggestion", sa.Text(), nullable=False),
        sa.Column("multiline", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("generated_tokens", sa.Integer(), nullable=False),
        sa.Column("stop_reason", sa.String(length=30), nullable=False),
        sa.Column("redactions", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("accepted_length", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("completions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_completions_adapter_created_at", ["adapter_version", "created_at"], unique=False
        )
        batch_op.create_index("ix_completions_created_at", ["created_at"], unique=False)
        batch_op.create_index(
            "ix_completions_user_created_at", ["user", "created_at"], unique=False
        )

    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("base_model", sa.String(length=300), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("data_counts", sa.JSON(), nullable=False),
        sa.Column("losses", sa.JSON(), nullable=False),
        sa.Column("evaluation", sa.JSON(), nullable=False),
        sa.Column("decision", sa.String(length=20), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("version", sa.String(length=100), nullable=False),
        sa.Column("base_model", sa.String(length=300), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("canary_share", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["training_runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("completion_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("accepted_length", sa.Integer(), nullable=True),
        sa.Column("window_s", sa.Float(), nullable=True),
        sa.Column("survival_ratio", sa.Float(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_completion_id", ["completion_id"], unique=False)

    op.create_table(
        "preference_pairs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("completion_id", sa.String(length=32), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user", sa.String(length=200), nullable=False),
        sa.Column("split", sa.String(length=10), nullable=False),
        sa.Column("prompt_prefix", sa.Text(), nullable=False),
        sa.Column("prompt_suffix", sa.Text(), nullable=False),
        sa.Column("chosen", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=True),
        sa.Column("chosen_chars_saved", sa.Integer(), nullable=False),
        sa.Column("rejected_chars_saved", sa.Integer(), nullable=False),
        sa.Column("ranking", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["training_runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("preference_pairs", schema=None) as batch_op:
        batch_op.create_index("ix_preference_pairs_run_id", ["run_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("preference_pairs", schema=None) as batch_op:
        batch_op.drop_index("ix_preference_pairs_run_id")

    op.drop_table("preference_pairs")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_completion_id")

    op.drop_table("events")
    op.drop_table("adapters")
    op.drop_table("training_runs")
    with op.batch_alter_table("completions", schema=None) as batch_op:
        batch_op.drop_index("ix_completions_user_created_at")
        batch_op.drop_index("ix_completions_created_at")
        batch_op.drop_index("ix_completions_adapter_created_at")

    op.drop_table("completions")
