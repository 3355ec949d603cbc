"""The canary's arms, its per-completion value and its test."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from feedback.canary import arm_for, chars_saved, difference_interval


def test_arms_are_sticky_per_user_and_follow_the_share() -> None:
    users = [f"dev{i}" for i in range(10_000)]
    arms = [arm_for(user, "v7", 0.2) for user in users]
    assert 0.18 < arms.count("canary") / len(users) < 0.22
    assert arms == [arm_for(user, "v7", 0.2) for user in users]  # sticky
    reshuffled = [arm_for(user, "v8", 0.2) for user in users]
    assert reshuffled != arms  # a new canary draws its own users
    assert {arm_for(user, None, 0.5) for user in users[:50]} == {"active"}
    assert {arm_for(user, "v7", 0.0) for user in users[:50]} == {"active"}


def completion(outcome: str, accepted_length: int | None = None) -> Any:
    return SimpleNamespace(outcome=outcome, accepted_length=accepted_length)


def survival(window_s: float, ratio: float, event_id: str = "e") -> Any:
    return SimpleNamespace(kind="survival", window_s=window_s, survival_ratio=ratio, id=event_id)


def test_a_completion_is_worth_its_retained_characters() -> None:
    assert chars_saved(completion("rejected"), []) == 0
    assert chars_saved(completion("dismissed"), []) == 0
    assert chars_saved(completion("shown"), []) is None  # no fate yet
    assert chars_saved(completion("accepted", 20), []) is None  # not settled
    checks = [survival(30, 1.0, "a"), survival(120, 0.5, "b"), survival(600, 0.0, "c")]
    assert chars_saved(completion("accepted", 20), checks) == 10  # the 2-minute window
    assert chars_saved(completion("partial", 7), [survival(0.2, 1.0)]) == 7


def test_the_interval_finds_a_real_difference_and_no_false_one() -> None:
    even = {f"u{i}": [0, 5, 10, 0, 5] * 8 for i in range(6)}
    same = {f"w{i}": [5, 0, 10, 5, 0] * 8 for i in range(6)}
    estimate, low, high = difference_interval(even, same, 0.95)
    assert estimate == pytest.approx(0.0) and low < 0 < high
    better = {user: [v + 3 for v in values] for user, values in same.items()}
    estimate, low, high = difference_interval(even, better, 0.95)
    assert estimate == pytest.approx(3.0) and 0 < low < 3 < high


def test_one_user_does_not_carry_an_arm() -> None:
    """Arms are clustered by user: one user far ahead among equals is not a lift."""
    active = {f"a{i}": [4] * 30 for i in range(4)}
    canary = {"fan": [40] * 30, **{f"c{i}": [3] * 30 for i in range(3)}}
    _, low, high = difference_interval(active, canary, 0.95)
    assert low < 0 < high
    pooled = {"everyone": [v for values in canary.values() for v in values]}
    _, pooled_low, _ = difference_interval(active, pooled, 0.95)
    assert pooled_low > 0  # what a test ignoring users would wrongly conclude
