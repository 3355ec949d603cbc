"""What a suggestion is worth to the developer, and how sure we are of it.

One set of rules serves the nightly gate, the replay and the admin views, so that every
figure means the same everywhere. The headline is characters saved per completion: the
characters of a suggestion that still stand in the code (0 for a reject). The ratio of
retained to suggested characters is reported beside it, never alone: a model can raise it
by suggesting less (docs/architecture.md, the lab run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

KEPT_WINDOW_S = 120.0  # "what stands in the code after 2 min": labels and the canary
EDIT_SIMILARITY = 0.5  # above this a developer takes a suggestion and fixes it up


class SurvivalCheck(Protocol):
    id: str
    kind: str
    window_s: float | None


Check = TypeVar("Check", bound=SurvivalCheck)


def kept_check(events: Sequence[Check]) -> Check | None:
    """The survival check that says what was kept: the one nearest two minutes."""
    checks = [e for e in events if e.kind == "survival" and e.window_s is not None]
    if not checks:
        return None
    return min(checks, key=lambda e: (abs(float(e.window_s or 0) - KEPT_WINDOW_S), e.id))


def settled_chars_saved(
    outcome: str, accepted_length: int | None, survival_ratio: float | None
) -> int | None:
    """Characters a completion saved: 0 for a reject or dismissal, the accepted length times
    the kept share once a survival check has measured it; None while unsettled."""
    if outcome in ("rejected", "dismissed"):
        return 0
    if outcome not in ("accepted", "partial") or survival_ratio is None or not accepted_length:
        return None
    return round(accepted_length * min(1.0, max(0.0, float(survival_ratio))))


def nearer_kept_window(window_s: float, than_s: float | None) -> bool:
    """Whether a survival check at ``window_s`` says more about what was kept than one at
    ``than_s`` (the rule of ``kept_check``, applied one event at a time)."""
    return than_s is None or abs(window_s - KEPT_WINDOW_S) < abs(than_s - KEPT_WINDOW_S)


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete, substitute) that turn ``a`` into ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def survival_ratio(inserted: str, now: str) -> float:
    """Share of ``inserted`` still standing in ``now``: 1 untouched, 0 rewritten or gone."""
    if not inserted:
        return 0.0
    if abs(len(now) - len(inserted)) >= len(inserted):
        # the distance is at least the length difference: nothing is left, and the
        # quadratic edit distance against a region grown huge is not worth computing
        return 0.0
    return max(0.0, 1.0 - levenshtein(inserted, now) / len(inserted))


def common_subsequence(a: str, b: str) -> int:
    """Length of the longest common subsequence: characters of ``a`` left standing in ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for char_a in a:
        current = [0]
        for j, char_b in enumerate(b, start=1):
            current.append(
                previous[j - 1] + 1 if char_a == char_b else max(previous[j], current[j - 1])
            )
        previous = current
    return previous[-1]


def similarity(a: str, b: str) -> float:
    longest = max(len(a), len(b))
    return 1.0 - levenshtein(a, b) / longest if longest else 1.0


def expected_span(suggestion: str, truth: str) -> str:
    """The part of ``truth`` a suggestion is judged against: as many lines as it has."""
    lines = max(1, suggestion.count("\n") + 1)
    return "\n".join(truth.split("\n")[:lines])


Reaction = Literal["accepted", "edited", "rejected", "empty"]


@dataclass(frozen=True)
class Outcome:
    """What a developer who knows the true code does with a suggestion."""

    reaction: Reaction
    suggested: int  # characters suggested
    retained: int  # characters of the suggestion still standing: characters saved
    exact: bool  # the suggestion is exactly the true line(s)


def judge(suggestion: str, truth: str, threshold: float = EDIT_SIMILARITY) -> Outcome:
    """Accept an exact match, accept-then-edit a close one, reject the rest.

    After an edit the region holds the true code; the retained characters are those of
    the suggestion still standing in it (the longest common subsequence): typing what was
    missing destroys nothing, deleting or replacing a character does.
    """
    text = suggestion.rstrip()
    if not text.strip():
        return Outcome("empty", 0, 0, False)
    span = expected_span(text, truth).rstrip()
    if text == span:
        return Outcome("accepted", len(text), len(text), True)
    if similarity(text, span) >= threshold:
        return Outcome("edited", len(text), common_subsequence(text, span), False)
    return Outcome("rejected", len(text), 0, False)


@dataclass(frozen=True)
class Summary:
    """The figures of one set of completions (DESIGN.md, the replay's M)."""

    completions: int
    chars_saved_per_completion: float
    exact_line_acceptance: float
    survival_weighted_acceptance: float  # retained / suggested: never the headline
    mean_suggestion_chars: float
    empty_rate: float


def summarise(outcomes: Sequence[Outcome]) -> Summary:
    count = len(outcomes)
    if not count:
        return Summary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    suggested = sum(o.suggested for o in outcomes)
    retained = sum(o.retained for o in outcomes)
    return Summary(
        completions=count,
        chars_saved_per_completion=retained / count,
        exact_line_acceptance=sum(o.exact for o in outcomes) / count,
        survival_weighted_acceptance=retained / suggested if suggested else 0.0,
        mean_suggestion_chars=suggested / count,
        empty_rate=sum(o.reaction == "empty" for o in outcomes) / count,
    )


def percentile(values: Sequence[float], share: float) -> float:
    """The value at ``share`` (0-1) of the sorted values, interpolated linearly between
    the two nearest (numpy's default rule): every p50, p95 and p99 Ghostloop prints."""
    if not values:
        raise ValueError("a percentile of no values")
    ordered = sorted(values)
    rank = share * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
