"""Each replayed position's score, from what the server stored.

Every figure is computed from the store (completion rows and their feedback events, the
same rules as labels and the canary) plus the one thing the store cannot know, the code
that really followed each cursor (for exact-line acceptance). A position where the server
suggested nothing has no row: it counts as an empty suggestion that saved nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from evaluation.positions import Position
from feedback.canary import chars_saved
from feedback.database import StoreError, open_engine
from feedback.replays import StoredReplayError, methods_of
from feedback.schema import Completion
from feedback.store import events_by_completion


@dataclass(frozen=True)
class Scored:
    """One position's completion as the store tells it."""

    chars_saved: float
    exact: bool
    suggested: int
    empty: bool
    latency_ms: float | None
    settled: bool
    adapter: str | None


class UnsettledError(RuntimeError):
    """A served completion has no final event yet: its figures would be guesses."""


def score(position: Position, completion: Completion | None, events: Sequence[Any]) -> Scored:
    if completion is None:
        return Scored(0.0, False, 0, True, None, True, None)
    saved = chars_saved(completion, events)
    suggestion = completion.suggestion.split("\n", 1)[0]
    return Scored(
        chars_saved=float(saved or 0),
        exact=completion.outcome == "accepted"
        and bool(suggestion.strip())
        and suggestion.rstrip() == position.truth.rstrip(),
        suggested=len(completion.suggestion),
        empty=not completion.suggestion.strip(),
        latency_ms=completion.latency_ms,
        settled=saved is not None,
        adapter=completion.adapter_version,
    )


def load_scores(
    session: Session, positions: Sequence[Position], served: Mapping[str, str | None]
) -> list[Scored]:
    """Each position's score, from the completion the replay was served there (or none)."""
    ids = [cid for cid in (served.get(p.key) for p in positions) if cid]
    rows = {c.id: c for c in session.scalars(select(Completion).where(Completion.id.in_(ids)))}
    missing = [cid for cid in ids if cid not in rows]
    if missing:
        raise UnsettledError(f"{len(missing)} served completions are not in the store")
    events = events_by_completion(session=session, completion_ids=ids)
    scores = []
    for position in positions:
        completion_id = served.get(position.key)
        completion = rows[completion_id] if completion_id else None
        scores.append(score(position, completion, events.get(completion_id or "", [])))
    return scores


def reach(
    held_out: Sequence[Position],
    before: Sequence[Scored],
    trained_on: Sequence[Position],
    training_files: Sequence[str],
) -> dict[str, Any]:
    """How much of the typing the base model left undone on the held-out positions the
    night's data holds word for word: a ceiling on what recall alone can add.

    ``untyped`` is, per held-out position, the characters of the true rest of the line the
    base model's suggestion did not save. ``in_night_data`` counts the positions (and their
    untyped characters) whose true rest of line is the rest of line the developer kept at a
    position of the training half (what one night trains on); ``in_training_files`` those
    whose true rest ends some line of the training half's files (what a night that learned
    the whole training half could recall). ``share_of_saved``: those characters over what
    the base model saved, i.e. the most that recall could lift the headline by. A lift
    above it must come from the model generalising (style, names, idioms), which a small
    model learns from one night's few hundred lines only weakly (docs/results.md).
    """
    if len(held_out) != len(before):
        raise ValueError(f"reach needs a score per position: {len(held_out)} vs {len(before)}")
    kept = {p.truth.strip() for p in trained_on if p.truth.strip()}
    lines = {line.strip() for text in training_files for line in text.splitlines()}
    lines.discard("")
    saved = sum(float(s.chars_saved) for s in before)
    parts = {"untyped": [0, 0.0], "in_night_data": [0, 0.0], "in_training_files": [0, 0.0]}
    for position, score in zip(held_out, before, strict=True):
        truth = position.truth.strip()
        gap = max(0.0, len(position.truth.rstrip()) - float(score.chars_saved))
        if not truth or gap <= 0:
            continue
        found = {
            "untyped": True,
            "in_night_data": truth in kept,
            "in_training_files": any(line.endswith(truth) for line in lines),
        }
        for name, hit in found.items():
            if hit:
                parts[name][0] += 1
                parts[name][1] += gap
    return {
        name: {
            "positions": count,
            "chars": round(chars, 1),
            "share_of_saved": round(chars / saved, 4) if saved else None,
        }
        for name, (count, chars) in parts.items()
    }


# What ``ghostloop replays pool --compare`` pairs: the first pass against the second.
COMPARISONS: dict[str, tuple[str, str]] = {
    "night": ("before", "after"),  # the night, both served alike
    "context": ("before_without", "before"),  # repository context alone, the base model
    "product": ("before_without", "after"),  # the night with context against today's base
    "night-context": ("after_without", "after"),  # what context adds to the night
}


def served_ids(report: Mapping[str, Any], method: str, walk: str) -> Mapping[str, Any] | None:
    """The completion each held-out position was served in one of a report's walks:
    before, after (``method``'s night), before_without, after_without (context off)."""
    result = methods_of(report)[method]
    served = report.get("served") or {}
    if walk == "before":
        return served.get("before")
    if walk == "after":
        after = result.get("served")
        if after is None and method == report.get("method"):
            after = served.get("after")
        return after
    if walk == "before_without":
        return ((report.get("context") or {}).get("served") or {}).get("before_without")
    if walk == "after_without":
        return (result.get("context") or {}).get("served")
    raise ValueError(f"unknown walk {walk!r}")


def stored_scores(
    name: str, report: Mapping[str, Any], method: str | None = None, compare: str = "night"
) -> tuple[list[Position], list[Scored], list[Scored]]:
    """A stored replay's held-out positions and each one's score in the two walks
    ``compare`` pairs (``COMPARISONS``; by default before and after ``method``'s night,
    the report's first method by default), read back from the replay's own store as the
    report was computed. StoredReplayError when they cannot be."""
    results = methods_of(report)
    chosen = method or next(iter(results))
    if chosen not in results:
        raise StoredReplayError(
            f"replay {name!r} has no method {chosen!r}: it ran {', '.join(results)}"
        )
    first, second = COMPARISONS[compare]
    before_ids = served_ids(report, chosen, first)
    after_ids = served_ids(report, chosen, second)
    if not after_ids or not report.get("positions") or not before_ids:
        missing = second if not after_ids else first
        walk = {
            "before": "before any night",
            "after": f"after {chosen}'s night",
            "before_without": "without repository context before any night",
            "after_without": f"without repository context after {chosen}'s night",
        }[missing]
        raise StoredReplayError(
            f"replay {name!r} has no held-out walk {walk} to pool: nothing was published, "
            "the replay ran without repository context (GHOSTLOOP_REPO_CONTEXT_TOKENS), or "
            "the report predates per-position records"
        )
    url = str(report.get("store") or "")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoredReplayError(f"replay {name!r} names no readable store ({url!r})") from None
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise StoredReplayError(
            f"replay {name!r}'s store {parsed.database} is gone: its figures can no longer "
            "be pooled (the report itself still reads with 'ghostloop replays show')"
        )
    try:
        positions = [Position(**row) for row in report["positions"]]
        engine = open_engine(url)
        try:
            with Session(engine) as session:
                before = load_scores(session, positions, before_ids)
                after = load_scores(session, positions, after_ids)
        finally:
            engine.dispose()
    except (StoreError, SQLAlchemyError, UnsettledError, TypeError, AttributeError) as error:
        raise StoredReplayError(f"replay {name!r}'s store cannot be read back: {error}") from None
    return positions, before, after
