"""Writing and reading completions and their events. Keyword-only, one unit of work each;
the caller owns the session (SQLAlchemy 2.0 style, no global session)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from feedback.schema import Completion, FeedbackEvent, PreferencePair

RowT = TypeVar("RowT", Completion, FeedbackEvent)


def add_new(*, session: Session, rows: Sequence[RowT]) -> list[RowT]:
    """Add the rows (all of one table) whose ids are not stored yet; returns those added.

    Ids are made where a record is born, so a replayed journal repeats them: one look-up
    per call keeps each row stored once.
    """
    if not rows:
        return []
    table = type(rows[0])
    existing = set(session.scalars(select(table.id).where(table.id.in_({r.id for r in rows}))))
    new: dict[str, RowT] = {}
    for row in rows:
        if row.id not in existing:
            new.setdefault(row.id, row)
    session.add_all(new.values())
    return list(new.values())


def record_completion(*, session: Session, completion: Completion) -> bool:
    """Store ``completion`` once; False when a row with its id is already there."""
    return bool(add_new(session=session, rows=[completion]))


def record_event(*, session: Session, event: FeedbackEvent) -> bool:
    """Store ``event`` once (a replayed journal repeats ids); False when already stored."""
    return bool(add_new(session=session, rows=[event]))


def events_of(*, session: Session, completion_id: str) -> list[FeedbackEvent]:
    """A completion's events in the order they happened."""
    query = (
        select(FeedbackEvent)
        .where(FeedbackEvent.completion_id == completion_id)
        .order_by(FeedbackEvent.created_at, FeedbackEvent.id)
    )
    return list(session.scalars(query))


def events_by_completion(
    *, session: Session, completion_ids: Sequence[str], chunk: int = 500
) -> dict[str, list[FeedbackEvent]]:
    """The events of many completions, each completion's in the order they happened
    (read ``chunk`` ids per query, under every database's bound on parameters)."""
    events: dict[str, list[FeedbackEvent]] = defaultdict(list)
    for start in range(0, len(completion_ids), chunk):
        query = (
            select(FeedbackEvent)
            .where(FeedbackEvent.completion_id.in_(completion_ids[start : start + chunk]))
            .order_by(FeedbackEvent.created_at, FeedbackEvent.id)
        )
        for event in session.scalars(query):
            events[event.completion_id].append(event)
    return events


def purge_older_than(*, session: Session, cutoff: datetime) -> tuple[int, int]:
    """Delete completions created before ``cutoff`` and their events; (completions, events).

    Pairs made from them go too (their source is gone); runs and adapters stay.
    """
    old = select(Completion.id).where(Completion.created_at < cutoff)
    events = session.execute(delete(FeedbackEvent).where(FeedbackEvent.completion_id.in_(old)))
    session.execute(delete(PreferencePair).where(PreferencePair.completion_id.in_(old)))
    completions = session.execute(delete(Completion).where(Completion.created_at < cutoff))
    return completions.rowcount, events.rowcount  # type: ignore[attr-defined]


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '90m' or '45s' as a duration; ValueError says what is accepted."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit() or int(number) <= 0:
        raise ValueError(f"age {text!r} must be a positive number with d, h, m or s, e.g. 30d")
    return timedelta(**{units[unit]: int(number)})
