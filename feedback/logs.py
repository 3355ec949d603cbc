"""Reading the log back: completions filtered as an admin asks for them, and one
completion with everything that happened to it. The terminal and the web views share
these queries, so both show the same rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from feedback.schema import COMPLETION_OUTCOMES, Completion, FeedbackEvent
from feedback.store import events_by_completion, events_of, parse_age

Query = TypeVar("Query", bound=Select)  # type: ignore[type-arg]  # any columns
BASE_ADAPTER = "base"  # how the views name "no adapter": the base model served


class UnknownCompletionError(LookupError):
    """No completion has the id asked for."""


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """'2d' (that long ago), '2026-11-20' or '2026-11-20T14:00' (UTC unless it says
    otherwise) as an aware datetime; ValueError says what is accepted."""
    now = now or datetime.now(UTC)
    try:
        return now - parse_age(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"time {text!r} is neither an age such as 2d, 12h, 30m nor a date such as "
            "2026-11-20 or 2026-11-20T14:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LogFilter:
    """Which completions to look at; None matches everything."""

    user: str | None = None
    language: str | None = None
    adapter: str | None = None  # a version, or "base" for the base model
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.outcome is not None and self.outcome not in COMPLETION_OUTCOMES:
            raise ValueError(
                f"outcome {self.outcome!r} is not one of {', '.join(COMPLETION_OUTCOMES)}"
            )
        if self.since and self.until and self.since >= self.until:
            raise ValueError(
                f"since ({self.since:%F %T}) must come before until ({self.until:%F %T})"
            )

    def apply(self, query: Query) -> Query:
        if self.user is not None:
            query = query.where(Completion.user == self.user)
        if self.language is not None:
            query = query.where(Completion.language == self.language)
        if self.adapter == BASE_ADAPTER:
            query = query.where(Completion.adapter_version.is_(None))
        elif self.adapter is not None:
            query = query.where(Completion.adapter_version == self.adapter)
        if self.outcome is not None:
            query = query.where(Completion.outcome == self.outcome)
        if self.since is not None:
            query = query.where(Completion.created_at >= self.since)
        if self.until is not None:
            query = query.where(Completion.created_at < self.until)
        return query

    def as_query_args(self) -> dict[str, str]:
        """The filter as URL query arguments (for links that keep it)."""
        values = {
            "user": self.user,
            "language": self.language,
            "adapter": self.adapter,
            "outcome": self.outcome,
            "since": self.since.isoformat(timespec="minutes") if self.since else None,
            "until": self.until.isoformat(timespec="minutes") if self.until else None,
        }
        return {key: value for key, value in values.items() if value}


def recent(
    *, session: Session, where: LogFilter, limit: int = 50, offset: int = 0
) -> list[Completion]:
    """The newest completions that match, newest first."""
    query = where.apply(select(Completion))
    query = query.order_by(Completion.created_at.desc(), Completion.id.desc())
    return list(session.scalars(query.limit(limit).offset(offset)))


def count(*, session: Session, where: LogFilter) -> int:
    return int(session.scalar(where.apply(select(func.count()).select_from(Completion))) or 0)


def survival_so_far(events: Sequence[FeedbackEvent]) -> dict[str, float]:
    """Survival ratios measured so far, by window ('30s': 0.93, ...)."""
    return {
        f"{event.window_s:g}s": round(float(event.survival_ratio or 0.0), 4)
        for event in events
        if event.kind == "survival" and event.window_s is not None
    }


def log_record(completion: Completion, events: Sequence[FeedbackEvent]) -> dict[str, Any]:
    """One completion as a JSON line (``ghostloop logs --json``; DESIGN.md's fields)."""
    return {
        "id": completion.id,
        "time": aware(completion.created_at).isoformat(),
        "user": completion.user,
        "language": completion.language,
        "path": completion.path,
        "adapter": completion.adapter_version,
        "arm": completion.arm,
        "outcome": completion.outcome,
        "accepted_length": completion.accepted_length,
        "survival": survival_so_far(events),
        "chars_saved": completion.chars_saved,
        "suggestion": completion.suggestion,
        "latency_ms": round(completion.latency_ms, 1),
    }


def records(
    *, session: Session, where: LogFilter, limit: int = 50, offset: int = 0
) -> list[dict[str, Any]]:
    rows = recent(session=session, where=where, limit=limit, offset=offset)
    events = events_by_completion(session=session, completion_ids=[row.id for row in rows])
    return [log_record(row, events.get(row.id, [])) for row in rows]


@dataclass(frozen=True)
class CompletionDetail:
    completion: Completion
    events: list[FeedbackEvent]
    final_text: str | None  # what stands where the suggestion went, as last measured
    final_from: str | None  # the event that says so: "survival after 120s", "typed instead"


def detail(*, session: Session, completion_id: str) -> CompletionDetail:
    completion = session.get(Completion, completion_id)
    if completion is None:
        raise UnknownCompletionError(
            f"no completion has id {completion_id!r} — 'ghostloop logs' lists the ids"
        )
    events = events_of(session=session, completion_id=completion_id)
    final_text, final_from = None, None
    for event in events:  # the last measurement wins: it is what stands now
        if event.kind == "survival" and event.text is not None:
            final_text, final_from = event.text, f"the survival check after {event.window_s:g} s"
        elif event.kind == "typed_instead" and event.text is not None:
            final_text, final_from = event.text, "what the developer typed instead"
    return CompletionDetail(completion, events, final_text, final_from)


def aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
