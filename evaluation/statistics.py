"""The replay's figures: each pass's with 95 % bootstrap intervals, and the paired lift.

The headline is characters saved per completion; lifts are PAIRED over the same positions
(each position's after minus its before, resampled together), which is what makes a
20 % lift visible with a few hundred positions (docs/architecture.md, the lab run).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evaluation.positions import Position
from evaluation.scoring import Scored
from feedback.bootstrap import interval, resample
from feedback.metrics import percentile
from feedback.replays import METRICS


def _rounded(point: float, draws: np.ndarray) -> list[float]:
    """[estimate, low, high] of a 95 % interval, as the report stores it."""
    found = interval(point, draws)
    return [round(found.estimate, 4), round(found.low, 4), round(found.high, 4)]


def _columns(scores: Sequence[Scored]) -> dict[str, np.ndarray]:
    return {
        "saved": np.array([s.chars_saved for s in scores], dtype=float),
        "exact": np.array([s.exact for s in scores], dtype=float),
        "suggested": np.array([s.suggested for s in scores], dtype=float),
        "empty": np.array([s.empty for s in scores], dtype=float),
    }


def _metric(columns: Mapping[str, np.ndarray], name: str, rows: np.ndarray) -> np.ndarray:
    """``name`` over each resample in ``rows`` (shape rounds x n): one value per round."""
    if name == "chars_saved_per_completion":
        return columns["saved"][rows].mean(axis=-1)
    if name == "exact_line_acceptance":
        return columns["exact"][rows].mean(axis=-1)
    if name == "mean_suggestion_chars":
        return columns["suggested"][rows].mean(axis=-1)
    if name == "empty_rate":
        return columns["empty"][rows].mean(axis=-1)
    if name == "survival_weighted_acceptance":
        suggested = columns["suggested"][rows].sum(axis=-1)
        return np.divide(
            columns["saved"][rows].sum(axis=-1),
            suggested,
            out=np.zeros_like(suggested),
            where=suggested > 0,
        )
    raise ValueError(f"unknown metric {name!r}")


def summary(
    scores: Sequence[Scored], seed: int = 0, groups: Sequence[int] | None = None
) -> dict[str, Any]:
    """The figures of one pass (DESIGN.md's M) with 95 % bootstrap intervals (stratified by
    ``groups`` when given)."""
    n = len(scores)
    latencies = [s.latency_ms for s in scores if s.latency_ms is not None]
    result: dict[str, Any] = {
        "completions": n,
        "served": sum(s.latency_ms is not None for s in scores),
        "latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "latency_ms_p95": round(percentile(latencies, 0.95), 1) if latencies else None,
    }
    if not n:
        return {**result, **dict.fromkeys(METRICS, 0.0), "intervals": {}}
    columns = _columns(scores)
    everything = np.arange(n)[None, :]
    rows = resample(n, np.random.default_rng(seed), groups)
    intervals = {}
    for name in METRICS:
        point = float(_metric(columns, name, everything)[0])
        result[name] = round(point, 4)
        intervals[name] = _rounded(point, _metric(columns, name, rows))
    result["intervals"] = intervals
    return result


def _paired_columns(
    before: Sequence[Scored], after: Sequence[Scored]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The columns of two passes over the same positions, in the same order."""
    if len(before) != len(after):
        raise ValueError(f"paired figures need the same positions: {len(before)} vs {len(after)}")
    return _columns(before), _columns(after)


def paired_lift(
    before: Sequence[Scored],
    after: Sequence[Scored],
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> dict[str, list[float]]:
    """After minus before over the same positions: [estimate, low, high] per metric, plus
    the headline's relative lift (after / before - 1). ``groups``: which replay each
    position came from (``feedback.bootstrap.resample``)."""
    a, b = _paired_columns(before, after)
    n = len(before)
    if not n:
        return {}
    everything = np.arange(n)[None, :]
    rows = resample(n, np.random.default_rng(seed), groups)
    lifts: dict[str, list[float]] = {}
    for name in METRICS:
        point = float(_metric(b, name, everything)[0] - _metric(a, name, everything)[0])
        lifts[name] = _rounded(point, _metric(b, name, rows) - _metric(a, name, rows))
    base = float(a["saved"].mean())
    if base > 0:
        resampled_base = _metric(a, "chars_saved_per_completion", rows)
        ratio = np.divide(
            _metric(b, "chars_saved_per_completion", rows),
            resampled_base,
            out=np.full_like(resampled_base, np.nan),
            where=resampled_base > 0,
        )
        point = float(b["saved"].mean()) / base - 1
        lifts["chars_saved_relative"] = _rounded(point, ratio[~np.isnan(ratio)] - 1)
    return lifts


def kept_length(
    before: Sequence[Scored],
    after: Sequence[Scored],
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """Suggestion length where the suggestion saved typing in both passes, paired.

    The guard against a model that learns to stop early: over all positions the mean length
    also falls when wrong suggestions (rejected before and after) get shorter, which costs
    nothing; here only suggestions the developer kept both times count, so a fall means
    useful suggestions were cut short. None when no position was kept in both passes.
    ``groups``: the kept positions are resampled within their replay."""
    a, b = _paired_columns(before, after)
    kept = np.flatnonzero((a["saved"] > 0) & (b["saved"] > 0))
    if not len(kept):
        return None
    old, new = a["suggested"][kept], b["suggested"][kept]
    kept_groups = None if groups is None else [groups[int(i)] for i in kept]
    rows = resample(len(kept), np.random.default_rng(seed), kept_groups)
    ratio = new[rows].mean(axis=-1) / old[rows].mean(axis=-1) - 1
    return {
        "positions": len(kept),
        "before": round(float(old.mean()), 2),
        "after": round(float(new.mean()), 2),
        "relative": _rounded(float(new.mean() / old.mean() - 1), ratio),
    }


def compare(
    positions: Sequence[Position],
    before: Sequence[Scored],
    after: Sequence[Scored] | None,
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> dict[str, Any]:
    """before, after and paired lift, overall and split into line starts and mid-line.
    ``groups``: which replay each position came from, when several are pooled."""
    report: dict[str, Any] = {
        "before": summary(before, seed, groups),
        "after": None,
        "paired_lift": None,
        "kept_length": None,
    }
    if after is not None:
        report["after"] = summary(after, seed, groups)
        report["paired_lift"] = paired_lift(before, after, seed, groups)
        report["kept_length"] = kept_length(before, after, seed, groups)
    by_kind = {}
    for kind in ("line_start", "mid_line"):
        chosen = [i for i, p in enumerate(positions) if p.kind == kind]
        part_groups = [groups[i] for i in chosen] if groups is not None else None
        part_before = [before[i] for i in chosen]
        part = {
            "before": summary(part_before, seed, part_groups),
            "after": None,
            "paired_lift": None,
        }
        if after is not None:
            part_after = [after[i] for i in chosen]
            part["after"] = summary(part_after, seed, part_groups)
            part["paired_lift"] = paired_lift(part_before, part_after, seed, part_groups)
        by_kind[kind] = part
    report["by_kind"] = by_kind
    return report


def pooled(
    parts: Sequence[tuple[Sequence[Position], Sequence[Scored], Sequence[Scored]]], seed: int = 0
) -> dict[str, Any]:
    """Several replays' held-out positions as one sample (other splits of a repository,
    other repositories): their figures and lifts as ``compare`` gives them, the bootstrap
    resampling each replay's positions within it. One replay's lift is one draw; this is
    how a recipe's lift is told from one split's luck."""
    if len(parts) < 2:
        raise ValueError("pooling needs at least two replays")
    positions = [p for part in parts for p in part[0]]
    before = [s for part in parts for s in part[1]]
    after = [s for part in parts for s in part[2]]
    groups = [index for index, part in enumerate(parts) for _ in part[0]]
    return compare(positions, before, after, seed, groups)
