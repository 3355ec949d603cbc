"""The rules that turn recorded fates into training examples."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from feedback.schema import Completion, FeedbackEvent
from trainer.labels import (
    CorruptRow,
    DataCounts,
    Example,
    cap_users,
    deduplicate,
    label,
    split_by_time,
    without_rest_of_line,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def completion(
    outcome: str,
    *,
    suggestion: str = "return total",
    accepted: int | None = None,
    user: str = "alice",
) -> Completion:
    return Completion(
        id=uuid.uuid4().hex,
        created_at=T0,
        user=user,
        base_model="tiny",
        template="prefix-only",
        prompt_prefix="def f(values):\n    total = sum(values)\n    ",
        prompt_suffix="\n",
        suggestion=suggestion,
        latency_ms=1.0,
        outcome=outcome,
        accepted_length=accepted,
    )


def event(row: Completion, kind: str, **values: object) -> FeedbackEvent:
    return FeedbackEvent(id=uuid.uuid4().hex, completion_id=row.id, kind=kind, **values)


def test_an_accept_is_labelled_by_what_stands_after_two_minutes():
    row = completion("accepted", accepted=12)
    events = [
        event(row, "accepted", accepted_length=12),
        event(row, "survival", window_s=30.0, survival_ratio=1.0, text="return total"),
        event(row, "survival", window_s=120.0, survival_ratio=0.5, text="return totalx2"),
        event(row, "survival", window_s=600.0, survival_ratio=0.0, text=""),
    ]
    example = label(row, events)
    assert example is not None
    assert (example.kept, example.chars_saved) == ("return totalx2", 6)
    assert events[2].id in example.event_ids and events[0].id in example.event_ids


def test_an_accept_that_stopped_short_is_labelled_by_the_line_finished_there():
    """The region saved its characters; the target is the whole line the developer wrote,
    not the cut-off suggestion followed by a newline (that teaches stopping early)."""
    row = completion("accepted", suggestion="return tot", accepted=10)
    events = [
        event(row, "accepted", accepted_length=10),
        event(row, "survival", window_s=120.0, survival_ratio=1.0, text="return tot"),
        event(row, "written", window_s=120.0, text="return total / len(values)"),
        event(row, "written", window_s=30.0, text="return tot + 1"),  # another window's
    ]
    example = label(row, events)
    assert example is not None
    assert (example.kept, example.chars_saved) == ("return total / len(values)", 10)
    assert events[2].id in example.event_ids
    assert example.rejected == "return tot"  # the short suggestion loses to the line


def test_the_repository_part_of_the_prompt_travels_with_the_example():
    row = completion("accepted", accepted=12)
    row.prompt_repository = "# Path: a.py\n# total = 0\n"
    events = [
        event(row, "accepted", accepted_length=12),
        event(row, "survival", window_s=120.0, survival_ratio=1.0, text="return total"),
    ]
    example = label(row, events)
    assert example is not None and example.repository == row.prompt_repository


def test_a_line_that_is_not_the_regions_own_is_ignored():
    row = completion("accepted", accepted=12)
    events = [
        event(row, "accepted", accepted_length=12),
        event(row, "survival", window_s=120.0, survival_ratio=1.0, text="return total"),
        event(row, "written", window_s=120.0, text="pass"),
    ]
    example = label(row, events)
    assert example is not None and example.kept == "return total"


def test_what_already_followed_the_cursor_on_its_line_is_not_a_target():
    row = completion("rejected")
    row.prompt_suffix = ")\n    return total\n"  # the cursor sat before an auto-closed bracket
    example = label(row, [event(row, "rejected"), event(row, "typed_instead", text="values)")])
    assert example is not None and example.kept == "values"
    nothing = label(row, [event(row, "rejected"), event(row, "typed_instead", text=")")])
    assert nothing is None  # nothing was typed there: nothing to learn
    assert without_rest_of_line("a, b)", "\n") == "a, b)"
    assert without_rest_of_line("x)\n  y)", ")\n") == "x)\n  y)"  # a block is left whole


def test_a_reject_is_labelled_by_what_was_typed_instead_and_saved_nothing():
    row = completion("rejected")
    example = label(row, [event(row, "rejected"), event(row, "typed_instead", text="return 0")])
    assert example is not None and (example.kept, example.chars_saved) == ("return 0", 0)


@pytest.mark.parametrize(
    ("outcome", "events"),
    [
        ("accepted", []),  # accepted, not settled: no survival check yet
        ("rejected", [("typed_instead", {"text": "   "})]),  # nothing typed there
        ("shown", []),
        ("pending", []),
    ],
)
def test_fates_that_teach_nothing_yield_no_example(outcome, events):
    row = completion(outcome, accepted=3 if outcome == "accepted" else None)
    assert label(row, [event(row, kind, **values) for kind, values in events]) is None


def test_corrupt_rows_are_refused():
    row = completion("accepted", accepted=99)  # longer than the suggestion
    with pytest.raises(CorruptRow, match="accepted_length=99"):
        label(row, [])
    row = completion("partial", accepted=3)
    with pytest.raises(CorruptRow, match=r"ratio=1\.5"):
        label(row, [event(row, "survival", window_s=120.0, survival_ratio=1.5, text="ret")])


def example(index: int, user: str = "alice", kept: str = "return total") -> Example:
    return Example(
        completion_id=f"{index:032d}",
        created_at=T0 + timedelta(minutes=index),
        user=user,
        template="prefix-only",
        prefix=f"x = {index}\n",
        suffix="",
        suggestion="pass",
        kept=kept,
        chars_saved=0,
        outcome="rejected",
        event_ids=(),
    )


def test_duplicates_collapse_to_the_newest():
    counts = DataCounts()
    first, again = example(1), example(2)
    again = Example(**{**again.__dict__, "prefix": first.prefix})
    assert deduplicate([first, again, example(3)], counts) == [again, example(3)]
    assert counts.duplicates == 1


def test_no_user_takes_more_than_their_share_and_their_newest_stay():
    counts = DataCounts()
    rows = [example(i, "alice") for i in range(10)] + [example(20 + i, "bob") for i in range(4)]
    kept = cap_users(rows, 0.5, counts)
    assert counts.users == {"alice": 4, "bob": 4} and counts.capped == 6
    assert [e.completion_id for e in kept if e.user == "alice"] == [
        f"{i:032d}" for i in range(6, 10)
    ]
    alone = DataCounts()
    assert len(cap_users(rows[:10], 0.5, alone)) == 10  # one user: nobody to balance


def test_the_newest_examples_are_held_out():
    counts = DataCounts()
    train, held = split_by_time([example(i) for i in reversed(range(10))], 0.2, counts)
    assert [e.completion_id for e in held] == [f"{i:032d}" for i in (8, 9)]
    assert max(e.created_at for e in train) < min(e.created_at for e in held)
    assert (counts.train, counts.eval) == (8, 2)
