"""The rules every figure is computed by: a developer's reaction and the intervals."""

from __future__ import annotations

import pytest

from feedback.bootstrap import mean_interval, paired_interval
from feedback.metrics import judge, summarise

TRUTH = "total = sum(values)\nreturn total\n"


def test_exact_line_is_accepted_whole():
    outcome = judge("total = sum(values)", TRUTH)
    assert (outcome.reaction, outcome.retained, outcome.exact) == ("accepted", 19, True)


def test_a_close_suggestion_is_taken_and_fixed_keeping_what_survives():
    outcome = judge("total = sum(value)", TRUTH)
    assert outcome.reaction == "edited" and not outcome.exact
    assert outcome.retained == 18  # the missing "s" is typed; nothing suggested is lost
    assert judge("total = sum(valuez)", TRUTH).retained == 18  # one character replaced


def test_a_wrong_suggestion_is_rejected_and_saves_nothing():
    outcome = judge("print('hello world')", TRUTH)
    assert (outcome.reaction, outcome.retained, outcome.suggested) == ("rejected", 0, 20)


def test_a_multi_line_suggestion_is_judged_against_as_many_lines():
    assert judge("total = sum(values)\nreturn total", TRUTH).exact
    assert judge("   \n", TRUTH).reaction == "empty"


def test_a_shorter_suggestion_raises_the_ratio_but_saves_fewer_characters():
    """The ratio rewards stopping early; characters saved does not (docs/architecture.md)."""
    truths = ["result = compute(alpha, beta)", "if value is None:"]
    full = summarise([judge(t, t) for t in truths] + [judge("x = 1", "y = 2 + 3")])
    short = summarise([judge(t[: len(t) * 2 // 3], t) for t in truths] + [judge("", "y = 2")])
    assert short.survival_weighted_acceptance > full.survival_weighted_acceptance
    assert short.chars_saved_per_completion < full.chars_saved_per_completion


def test_intervals_cover_the_estimate_and_pair_by_position():
    interval = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert interval.low <= interval.estimate == 2.5 <= interval.high
    lift = paired_interval([1.0, 2.0, 3.0, 4.0] * 5, [2.0, 3.0, 4.0, 5.5] * 5)
    assert lift.excludes_zero() and lift.estimate == pytest.approx(1.125)
    noise = paired_interval([1.0, 5.0, 2.0, 4.0] * 5, [5.0, 1.0, 4.0, 2.0] * 5)
    assert not noise.excludes_zero()
    with pytest.raises(ValueError, match="equal lengths"):
        paired_interval([1.0], [])


def test_percentile_is_the_nearest_rank():
    from feedback.metrics import percentile

    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert (percentile(values, 0.0), percentile(values, 0.5), percentile(values, 1.0)) == (
        1.0,
        3.0,
        5.0,
    )
    assert percentile(list(range(101)), 0.99) == 99
