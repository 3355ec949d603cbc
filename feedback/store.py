"""Writing and reading completions and their events. Keyword-only, one unit of work each;
the caller owns the session (SQLAlchemy 2.0 style, no global session)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.schema import Completion, FeedbackEvent


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
