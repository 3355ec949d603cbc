from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.metrics import levenshtein, survival_ratio
from lsp_server.survival import Region, SurvivalTracker, changed_span, typed_instead, written


def tracker_with(
    *windows: float, clock: list[float] | None = None
) -> tuple[SurvivalTracker, list[Any], list[tuple[str, str, dict[str, Any]]]]:
    """A tracker whose checks run when the test calls them, and what it recorded; its
    clock reads ``clock[0]``."""
    scheduled: list[Any] = []
    recorded: list[tuple[str, str, dict[str, Any]]] = []
    now = clock if clock is not None else [0.0]
    tracker = SurvivalTracker(
        windows,
        lambda delay, call: scheduled.append(call),
        lambda cid, kind, **fields: recorded.append((cid, kind, fields)),
        clock=lambda: now[0],
    )
    return tracker, scheduled, recorded


def follow(text: str, region: Region, new_text: str) -> str:
    region.apply(*changed_span(text, new_text))
    return new_text[region.start : region.end]


def test_edit_distance_and_survival():
    assert levenshtein("kitten", "sitting") == 3
    assert survival_ratio("return total", "return total") == 1.0
    assert survival_ratio("return total", "") == 0.0
    assert 0.7 < survival_ratio("return total", "return totals") < 1.0


def test_changed_span_finds_the_single_difference():
    assert changed_span("abcdef", "abXYef") == (2, 4, 2)
    assert changed_span("aaa", "aaaa") == (3, 3, 1)
    assert changed_span("same", "same") == (4, 4, 0)


def test_region_shifts_with_edits_before_it_and_ignores_edits_after():
    text = "x = 1\nreturn total\n"
    region = Region("c", 6, 18)
    text2 = "# note\n" + text
    assert follow(text, region, text2) == "return total"
    assert follow(text2, region, text2 + "more()\n") == "return total"


def test_region_records_edits_inside_it_but_not_text_typed_after_it():
    text = "return total\n"
    region = Region("c", 0, 12)
    assert follow(text, region, "return total + tax\n") == "return total"
    assert follow("return total + tax\n", region, "return sum + tax\n") == "return sum"


def test_empty_region_takes_what_is_typed_at_it():
    region = Region("c", 4, 4)
    assert follow("x = \n", region, "x = compute()\n") == "compute()"


def test_region_deleted_entirely_is_empty():
    region = Region("c", 4, 16)
    assert follow("x = return total\n", region, "x = \n") == ""


def test_typing_at_the_spot_of_a_rejected_suggestion_is_captured():
    text = "def f():\n    return a + b\n    # end\n"
    assert typed_instead(text, 13, multiline=False) == "return a + b"
    block = "    for x in y:\n        use(x)\n        more(x)\n    done()\n"
    assert typed_instead(block, 4, multiline=True) == "for x in y:\n        use(x)\n        more(x)"


def test_tracker_measures_survival_of_an_accepted_suggestion_at_each_window():
    tracker, scheduled, recorded = tracker_with(30.0, 120.0)
    tracker.served("u", "c1", "total = ", 8, multiline=False)
    tracker.changed("u", "total = sum(items)")  # the client inserts the suggestion
    tracker.accepted("c1", "sum(items)")
    scheduled[0]()
    tracker.changed("u", "total = sum(prices)")  # the user rewrites part of it
    scheduled[1]()
    assert [(k, f["window_s"], f["text"]) for _, k, f in recorded] == [
        ("survival", 30.0, "sum(items)"),
        ("written", 120.0, "sum(prices)"),
        ("survival", 120.0, "sum(prices)"),
    ]
    assert recorded[0][2]["survival_ratio"] == 1.0
    assert 0.4 < recorded[2][2]["survival_ratio"] < 1.0


def test_the_line_as_written_runs_from_the_region_to_the_end_of_its_last_line():
    text = "    x = foo(a, b)\n    y = 1\n"
    assert written(text, 8, 14) == "foo(a, b)"  # region "foo(a," typed on to ", b)"
    assert written(text, 8, 17) == "foo(a, b)"
    assert written("a\nb = 1\nc\n", 2, 8) == "b = 1\n"  # a region that ends its line
    assert written("x = foo", 4, 7) == "foo"  # the last line of the document


def test_a_suggestion_that_stopped_short_is_kept_as_the_region_and_the_line_as_written():
    """Typing after an accepted region saves nothing, so the survival text is the region;
    the line that was finished there is recorded once, at the window nearest two minutes."""
    tracker, scheduled, recorded = tracker_with(30.0, 120.0, 600.0)
    tracker.served("u", "c1", "def f():\n    \n    pass\n", 13, multiline=False)
    tracker.changed("u", "def f():\n    return foo(a\n    pass\n")
    tracker.accepted("c1", "return foo(a")
    tracker.changed("u", "def f():\n    return foo(a, b)\n    pass\n")  # typed after it
    for check in scheduled:
        check()
    assert [(k, f["window_s"], f["text"]) for _, k, f in recorded] == [
        ("survival", 30.0, "return foo(a"),
        ("written", 120.0, "return foo(a, b)"),
        ("survival", 120.0, "return foo(a"),
        ("survival", 600.0, "return foo(a"),
    ]
    assert {f["survival_ratio"] for _, k, f in recorded if k == "survival"} == {1.0}


def test_tracker_captures_what_was_typed_after_a_rejection():
    tracker, scheduled, recorded = tracker_with(30.0)
    tracker.served("u", "c2", "x = \nnext()\n", 4, multiline=False)
    tracker.rejected("c2")
    tracker.changed("u", "x = compute(1)\nnext()\n")
    scheduled[0]()
    assert [(kind, fields["text"]) for _, kind, fields in recorded] == [
        ("typed_instead", "compute(1)")
    ]


def test_a_second_suggestion_made_for_an_older_text_keeps_the_first_region_right():
    tracker, scheduled, recorded = tracker_with(30.0)
    tracker.served("u", "first", "a = \n", 4, multiline=False)
    tracker.changed("u", "a = one\n")
    tracker.accepted("first", "one")
    # asked for at the start of line 2 before "one" was inserted, served after it
    tracker.served("u", "second", "a = \n", 5, multiline=False)
    tracker.rejected("second")
    tracker.changed("u", "a = one\nb = 2")
    scheduled[0]()
    scheduled[1]()
    assert [(cid, kind, fields["text"]) for cid, kind, fields in recorded] == [
        ("first", "written", "one"),
        ("first", "survival", "one"),
        ("second", "typed_instead", "b = 2"),
    ]


def test_the_session_end_measures_what_every_window_would_have():
    """The editor closes 12.5 s after an accept and 3 s after a reject: both are measured
    from the last text, at the time they reached, and their later checks find nothing."""
    clock = [100.0]
    tracker, scheduled, recorded = tracker_with(30.0, 120.0, clock=clock)
    tracker.served("u", "kept", "total = \n", 8, multiline=False)
    tracker.changed("u", "total = sum(items)\n")
    tracker.accepted("kept", "sum(items)")
    tracker.served("u", "other", "total = sum(items)\n", 19, multiline=False)
    clock[0] = 109.5
    tracker.rejected("other")
    tracker.changed("u", "total = sum(prices)\n")
    tracker.changed("u", "total = sum(prices)\nx = 1")
    tracker.served("v", "elsewhere", "y = ", 4, multiline=False)  # never taken: nothing
    clock[0] = 112.5
    tracker.final()
    assert [(c, k, f["window_s"], f["text"], f["final"]) for c, k, f in recorded] == [
        ("kept", "written", 12.5, "sum(prices)", True),
        ("kept", "survival", 12.5, "sum(prices)", True),
        ("other", "typed_instead", 3.0, "x = 1", True),
    ]
    for check in scheduled:
        check()
    assert len(recorded) == 3


def test_closing_a_document_measures_its_suggestions_only():
    clock = [0.0]
    tracker, scheduled, recorded = tracker_with(30.0, clock=clock)
    for uri in ("a", "b"):
        tracker.served(uri, f"in-{uri}", "x = ", 4, multiline=False)
        tracker.changed(uri, "x = 1")
        tracker.accepted(f"in-{uri}", "1")
    clock[0] = 5.0
    tracker.closed("a")
    assert [(c, k) for c, k, _ in recorded] == [("in-a", "written"), ("in-a", "survival")]
    scheduled[1]()  # b's own window still comes
    assert recorded[-1][0] == "in-b" and recorded[-1][2]["window_s"] == 30.0


@settings(max_examples=500, deadline=None)
@given(
    inserted=st.text(alphabet="ab ", max_size=12),
    now=st.text(alphabet="ab ", max_size=30),
)
def test_survival_is_the_edit_distance_rule_whatever_the_lengths(inserted: str, now: str):
    expected = max(0.0, 1.0 - levenshtein(inserted, now) / len(inserted)) if inserted else 0.0
    assert survival_ratio(inserted, now) == expected


def test_a_region_grown_huge_is_measured_without_the_quadratic_distance():
    # a paste of 2 MB into an accepted region: nothing of it is left, found at once
    assert survival_ratio("return total", "x" * 2_000_000) == 0.0
