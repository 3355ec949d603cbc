"""The tables of the feedback store. Every row is attributable (DESIGN.md, Contracts):
a completion knows its model and adapter, an event its completion, an adapter the run
that trained it, a run its pairs, a pair the completion it came from.

Changes to this file need a new Alembic revision in ``feedback/migrations/versions``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

COMPLETION_OUTCOMES = ("pending", "shown", "accepted", "partial", "rejected", "dismissed")
EVENT_KINDS = (
    "shown",
    "accepted",
    "partial",
    "rejected",
    "dismissed",
    "survival",  # share of an accepted region still standing after window_s
    "typed_instead",  # what the user wrote where a rejected suggestion was
    "written",  # an accepted suggestion's line(s) as they stand: the region and what followed
)
ADAPTER_STATUSES = ("candidate", "canary", "active", "retired", "rolled_back")


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class Completion(Base):
    """One suggestion the server returned, with everything that produced it."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    user: Mapped[str] = mapped_column(String(200))
    client_name: Mapped[str] = mapped_column(String(100), default="")
    client_version: Mapped[str] = mapped_column(String(100), default="")
    language: Mapped[str] = mapped_column(String(50), default="")
    path: Mapped[str] = mapped_column(Text, default="")
    base_model: Mapped[str] = mapped_column(String(300))
    adapter_version: Mapped[str | None] = mapped_column(String(100))
    arm: Mapped[str | None] = mapped_column(String(20))  # "active" | "canary" during a canary
    template: Mapped[str] = mapped_column(String(50), default="")
    prompt_prefix: Mapped[str] = mapped_column(Text, default="")
    prompt_suffix: Mapped[str] = mapped_column(Text, default="")
    # the repository's snippets before the prefix, as sent (redacted); "" for none
    prompt_repository: Mapped[str] = mapped_column(Text, default="", server_default="")
    suggestion: Mapped[str] = mapped_column(Text)
    multiline: Mapped[bool] = mapped_column(default=False)
    latency_ms: Mapped[float] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    generated_tokens: Mapped[int] = mapped_column(Integer, default=0)
    stop_reason: Mapped[str] = mapped_column(String(30), default="")
    redactions: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(20), default="pending")
    accepted_length: Mapped[int | None] = mapped_column(Integer)
    # Kept up to date from the events as they are stored (feedback.recorder), so that the
    # admin views aggregate one table: the survival check nearest two minutes and what the
    # completion saved by feedback.metrics.settled_chars_saved (None while unsettled).
    survival_window_s: Mapped[float | None] = mapped_column(Float)
    survival_ratio: Mapped[float | None] = mapped_column(Float)
    chars_saved: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_completions_created_at", "created_at"),
        Index("ix_completions_language_created_at", "language", "created_at"),
        Index("ix_completions_outcome_created_at", "outcome", "created_at"),
        Index("ix_completions_user_created_at", "user", "created_at"),
        Index("ix_completions_adapter_created_at", "adapter_version", "created_at"),
    )


class FeedbackEvent(Base):
    """Something that happened to a completion. ``id`` is made where the event is born, so
    replaying a journal writes each event once."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    completion_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("completions.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    kind: Mapped[str] = mapped_column(String(20))
    accepted_length: Mapped[int | None] = mapped_column(Integer)
    window_s: Mapped[float | None] = mapped_column(Float)
    survival_ratio: Mapped[float | None] = mapped_column(Float)
    text: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_events_completion_id", "completion_id"),)


class TrainingRun(Base):
    """One nightly run: what it trained on, how, and what the gate decided."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    method: Mapped[str] = mapped_column(String(20))
    base_model: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(20), default="running")
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data_counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    losses: Mapped[dict[str, Any]] = mapped_column(default=dict)
    evaluation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decision: Mapped[str | None] = mapped_column(String(20))  # "published" | "refused"
    reason: Mapped[str | None] = mapped_column(Text)


class PreferencePair(Base):
    """A training example from one logged completion: the kept text against what the model
    suggested (a pair), or several candidates in order (a ranking, for RRHF)."""

    __tablename__ = "preference_pairs"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    completion_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("completions.id", ondelete="CASCADE")
    )
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    user: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(10), default="train")  # "train" | "eval"
    prompt_prefix: Mapped[str] = mapped_column(Text)
    prompt_suffix: Mapped[str] = mapped_column(Text, default="")
    prompt_repository: Mapped[str] = mapped_column(Text, default="", server_default="")
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str | None] = mapped_column(Text)
    chosen_chars_saved: Mapped[int] = mapped_column(Integer, default=0)
    rejected_chars_saved: Mapped[int] = mapped_column(Integer, default=0)
    ranking: Mapped[dict[str, Any] | None] = mapped_column()  # {"candidates": [...], ...}

    __table_args__ = (Index("ix_preference_pairs_run_id", "run_id"),)


class AdapterVersion(Base):
    """A published LoRA adapter in the registry, and the run that trained it."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(100), unique=True)
    base_model: Mapped[str] = mapped_column(String(300))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default="candidate")
    canary_share: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    status_changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)


class AccessToken(Base):
    """A team member's key to a shared ``ghostloop serve --tcp``. Only the SHA-256 digest
    of the token is stored; the token itself is shown once, when it is made."""

    __tablename__ = "access_tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # shown in lists
    user: Mapped[str] = mapped_column(String(200))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_access_tokens_user", "user"),)
