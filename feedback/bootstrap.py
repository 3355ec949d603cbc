"""The one bootstrap every interval in Ghostloop is drawn with: the gate's, the canary's
and the replay's.

A paired lift resamples positions and takes each one's before and after together, so what
the positions share (an easy file, a hard one) cancels; with ``groups`` (which replay a
position came from, when several are pooled) each group is resampled within itself, so
every round keeps their sizes. The canary's two arms are different users, not pairs: its
resample is two-level (users, then each user's completions), so one prolific user cannot
make an interval look tighter than the users behind it allow.

Written here rather than taken from ``scipy.stats.bootstrap``: that resamples one sample
(or paired samples) per call for one statistic, while the replay reads five metrics and
their lifts off the same resampled rows, and neither stratified nor two-level resampling
is one of its methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ROUNDS = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_list(self) -> list[float]:
        return [self.estimate, self.low, self.high]


def resample(
    n: int,
    rng: np.random.Generator,
    groups: Sequence[int] | None = None,
    rounds: int = ROUNDS,
) -> np.ndarray:
    """``rounds`` resamples of ``n`` positions, as row indices (shape rounds x n). With
    ``groups`` (one label per position) each group is resampled within itself."""
    if groups is None:
        return rng.integers(0, n, size=(rounds, n))
    if len(groups) != n:
        raise ValueError(f"one group per position: {len(groups)} groups, {n} positions")
    labels = np.asarray(groups)
    parts = []
    for label in dict.fromkeys(groups):  # in order of first appearance
        members = np.flatnonzero(labels == label)
        parts.append(members[rng.integers(0, len(members), size=(rounds, len(members)))])
    return np.concatenate(parts, axis=1)


def interval(point: float, draws: np.ndarray, level: float = LEVEL) -> Interval:
    """``point`` with the central ``level`` share of its bootstrap ``draws``."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(point), float(low), float(high))


def mean_interval(values: Sequence[float], seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean with its bootstrap interval."""
    if not len(values):
        return Interval(0.0, 0.0, 0.0)
    array = np.asarray(values, dtype=float)
    rows = resample(len(array), np.random.default_rng(seed))
    return interval(float(array.mean()), array[rows].mean(axis=1), level)


def paired_interval(
    before: Sequence[float], after: Sequence[float], seed: int = 0, level: float = LEVEL
) -> Interval:
    """Mean of ``after - before`` over the same positions, resampled by position."""
    if len(before) != len(after):
        raise ValueError(f"paired figures need equal lengths, got {len(before)} and {len(after)}")
    return mean_interval([b - a for a, b in zip(before, after, strict=True)], seed, level)


def clustered_means(
    clusters: Sequence[Sequence[float]], rng: np.random.Generator, rounds: int = ROUNDS
) -> np.ndarray:
    """The mean over all values in ``rounds`` two-level resamples: clusters (users) drawn
    with replacement, and each drawn cluster's values drawn with replacement."""
    totals = np.empty((rounds, len(clusters)))
    counts = np.array([len(v) for v in clusters], dtype=float)
    for column, values in enumerate(clusters):
        array = np.asarray(values, dtype=float)
        draws = rng.integers(0, len(array), size=(rounds, len(array)))
        totals[:, column] = array[draws].sum(axis=1)
    picks = rng.multinomial(len(clusters), [1 / len(clusters)] * len(clusters), size=rounds)
    return (picks * totals).sum(axis=1) / np.maximum((picks * counts).sum(axis=1), 1.0)
