"""Writing and reading completions and their events. Keyword-only, one unit of work each;
the caller owns the session (SQLAlchemy 2.0 style, no global session)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from feedback.schema import Completion, FeedbackEvent, PreferencePair


def record_completion(*, session: Session, completion: Completion) -> bool:
    """Store ``completion`` once; False when a row with its id is already there."""
    if session.get(Completion, completion.id) is not None:
        return False
    session.add(completion)
    return True


def record_event(*, session: Session, event: FeedbackEvent) -> bool:
    """Store ``event`` once (a replayed journal repeats ids); False when already stored."""
    if session.get(FeedbackEvent, event.id) is not None:
        return False
    session.add(event)
    return True


def events_of(*, session: Session, completion_id: str) -> list[FeedbackEvent]:
    """A completion's events in the order they happened."""
    query = (
        select(FeedbackEvent)
        .where(FeedbackEvent.completion_id == completion_id)
        .order_by(FeedbackEvent.created_at, FeedbackEvent.id)
    )
    return list(session.scalars(query))


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
