"""The replay's report: before and after on the same held-out positions, from stored rows.

Every figure is computed from what the server stored (completion rows and their feedback
events, the same rules as labels and the canary) plus the one thing the store cannot know,
the code that really followed each cursor (for exact-line acceptance). A position where the
server suggested nothing has no row: it counts as an empty suggestion that saved nothing.

The headline is characters saved per completion; lifts are PAIRED over the same positions
(each position's after minus its before, resampled together), which is what makes a
20 % lift visible with a few hundred positions (FIELD-NOTES, lab run).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.canary import chars_saved
from feedback.schema import Completion
from feedback.store import events_by_completion

ROUNDS = 4000
METRICS = (
    "chars_saved_per_completion",
    "exact_line_acceptance",
    "survival_weighted_acceptance",
    "mean_suggestion_chars",
    "empty_rate",
)


@dataclass(frozen=True)
class Position:
    """A cursor of the replay and the code that really follows it (never stored)."""

    key: str  # "relative/path.py:line:character"
    path: str
    line: int
    character: int
    kind: str  # "line_start" | "mid_line"
    truth: str  # the true rest of the line


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


def _interval(point: float, rounds: np.ndarray) -> list[float]:
    low, high = np.percentile(rounds, [2.5, 97.5])
    return [round(point, 4), round(float(low), 4), round(float(high), 4)]


def summary(scores: Sequence[Scored], seed: int = 0) -> dict[str, Any]:
    """The figures of one pass (DESIGN.md's M) with 95 % bootstrap intervals."""
    n = len(scores)
    latencies = [s.latency_ms for s in scores if s.latency_ms is not None]
    result: dict[str, Any] = {
        "completions": n,
        "served": sum(s.latency_ms is not None for s in scores),
        "latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
    }
    if not n:
        return {**result, **dict.fromkeys(METRICS, 0.0), "intervals": {}}
    columns = _columns(scores)
    everything = np.arange(n)[None, :]
    rows = np.random.default_rng(seed).integers(0, n, size=(ROUNDS, n))
    intervals = {}
    for name in METRICS:
        point = float(_metric(columns, name, everything)[0])
        result[name] = round(point, 4)
        intervals[name] = _interval(point, _metric(columns, name, rows))
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
    before: Sequence[Scored], after: Sequence[Scored], seed: int = 0
) -> dict[str, list[float]]:
    """After minus before over the same positions: [estimate, low, high] per metric, plus
    the headline's relative lift (after / before - 1)."""
    a, b = _paired_columns(before, after)
    n = len(before)
    if not n:
        return {}
    everything = np.arange(n)[None, :]
    rows = np.random.default_rng(seed).integers(0, n, size=(ROUNDS, n))
    lifts: dict[str, list[float]] = {}
    for name in METRICS:
        point = float(_metric(b, name, everything)[0] - _metric(a, name, everything)[0])
        lifts[name] = _interval(point, _metric(b, name, rows) - _metric(a, name, rows))
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
        lifts["chars_saved_relative"] = _interval(point, ratio[~np.isnan(ratio)] - 1)
    return lifts


def kept_length(
    before: Sequence[Scored], after: Sequence[Scored], seed: int = 0
) -> dict[str, Any] | None:
    """Suggestion length where the suggestion saved typing in both passes, paired.

    The guard against a model that learns to stop early: over all positions the mean length
    also falls when wrong suggestions (rejected before and after) get shorter, which costs
    nothing; here only suggestions the developer kept both times count, so a fall means
    useful suggestions were cut short. None when no position was kept in both passes."""
    a, b = _paired_columns(before, after)
    kept = np.flatnonzero((a["saved"] > 0) & (b["saved"] > 0))
    if not len(kept):
        return None
    old, new = a["suggested"][kept], b["suggested"][kept]
    rows = np.random.default_rng(seed).integers(0, len(kept), size=(ROUNDS, len(kept)))
    ratio = new[rows].mean(axis=-1) / old[rows].mean(axis=-1) - 1
    return {
        "positions": len(kept),
        "before": round(float(old.mean()), 2),
        "after": round(float(new.mean()), 2),
        "relative": _interval(float(new.mean() / old.mean() - 1), ratio),
    }


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
    model learns from one night's few hundred lines only weakly (README, "Does it help?").
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


def compare(
    positions: Sequence[Position],
    before: Sequence[Scored],
    after: Sequence[Scored] | None,
    seed: int = 0,
) -> dict[str, Any]:
    """before, after and paired lift, overall and split into line starts and mid-line."""
    report: dict[str, Any] = {
        "before": summary(before, seed),
        "after": None,
        "paired_lift": None,
        "kept_length": None,
    }
    if after is not None:
        report["after"] = summary(after, seed)
        report["paired_lift"] = paired_lift(before, after, seed)
        report["kept_length"] = kept_length(before, after, seed)
    by_kind = {}
    for kind in ("line_start", "mid_line"):
        chosen = [i for i, p in enumerate(positions) if p.kind == kind]
        part_before = [before[i] for i in chosen]
        part = {"before": summary(part_before, seed), "after": None, "paired_lift": None}
        if after is not None:
            part_after = [after[i] for i in chosen]
            part["after"] = summary(part_after, seed)
            part["paired_lift"] = paired_lift(part_before, part_after, seed)
        by_kind[kind] = part
    report["by_kind"] = by_kind
    return report


def position_rows(positions: Sequence[Position]) -> list[dict[str, Any]]:
    return [asdict(p) for p in positions]


def chart(passes: Sequence[tuple[str, Mapping[str, Any]]], path: Path) -> Path:
    """A PNG of characters saved per completion per adapter, with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = [label for label, _ in passes]
    values = [float(m["chars_saved_per_completion"]) for _, m in passes]
    intervals = [
        m["intervals"].get("chars_saved_per_completion", [value] * 3)
        for value, (_, m) in zip(values, passes, strict=True)
    ]
    errors = [[v - i[1] for v, i in zip(values, intervals, strict=True)]]
    errors.append([i[2] - v for v, i in zip(values, intervals, strict=True)])
    figure, axes = pyplot.subplots(figsize=(6, 3.6), dpi=100)
    axes.bar(labels, values, yerr=errors, capsize=6, color=["#8a8f98", "#2f7ed8"][: len(labels)])
    axes.set_ylabel("characters saved per completion")
    axes.set_title("held-out positions, 95 % intervals")
    for index, value in enumerate(values):
        axes.annotate(f"{value:.2f}", (index, value), ha="center", va="bottom", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")
    pyplot.close(figure)
    return path


def format_table(report: Mapping[str, Any]) -> str:
    """The printed report: before, after and the paired lift on the held-out half, one block
    per method, the headline split into line starts and mid-line."""
    methods = report.get("methods") or {
        report.get("method", "adapter"): {
            "adapter": report.get("adapter"),
            "after": report.get("after"),
            "paired_lift": report.get("paired_lift"),
            "by_kind": report.get("by_kind", {}),
            "kept_length": report.get("kept_length"),
        }
    }
    blocks = []
    for name, result in methods.items():
        title = f"{name}: {result.get('adapter') or 'nothing published'}"
        blocks.append(_block(title, report["before"], result.get("after"), result))
    if report.get("reach"):
        blocks.append(format_reach(report["reach"]))
    return "\n\n".join(blocks)


def format_reach(reach: Mapping[str, Any]) -> str:
    """``reach`` in words: the ceiling recall puts on the headline's lift."""
    untyped = reach["untyped"]

    def part(name: str) -> str:
        found = reach[name]
        share = found["share_of_saved"]
        ceiling = f"at most {share:+.1%} by recall" if share is not None else "nothing saved"
        return f"{found['chars']:.0f} chars at {found['positions']} positions ({ceiling})"

    return (
        f"reach: the base model left {untyped['chars']:.0f} characters untyped at "
        f"{untyped['positions']} held-out positions; word for word, the night's data holds "
        f"{part('in_night_data')}, the training half's files {part('in_training_files')}"
    )


def _block(
    title: str, before: Mapping[str, Any], after: Mapping[str, Any] | None, result: Mapping
) -> str:
    lift = result.get("paired_lift") or {}
    rows = [
        ("chars saved / completion", "chars_saved_per_completion", "{:.2f}"),
        ("exact-line acceptance", "exact_line_acceptance", "{:.3f}"),
        ("retained / suggested", "survival_weighted_acceptance", "{:.3f}"),
        ("mean suggestion chars", "mean_suggestion_chars", "{:.1f}"),
        ("empty suggestions", "empty_rate", "{:.3f}"),
    ]
    lines = [
        f"{'held-out, ' + title:50}",
        f"{'':26} {'before':>24} {'after':>24} {'paired lift':>26}",
    ]

    def cell(m: Mapping[str, Any] | None, name: str, pattern: str) -> str:
        if not m:
            return "-"
        low, high = m["intervals"].get(name, [0, 0, 0])[1:]
        return f"{pattern.format(m[name])} [{pattern.format(low)}, {pattern.format(high)}]"

    def change(values: list[float] | None, pattern: str = "{:+.3f}") -> str:
        if values is None:
            return "-"
        return f"{pattern.format(values[0])} [{pattern.format(values[1])}, " + (
            f"{pattern.format(values[2])}]"
        )

    for label, name, pattern in rows:
        lines.append(
            f"{label:26} {cell(before, name, pattern):>24} {cell(after, name, pattern):>24} "
            f"{change(lift.get(name)):>26}"
        )
    lines.append(
        f"{'  relative (headline)':26} {'':>24} {'':>24} "
        f"{change(lift.get('chars_saved_relative'), '{:+.1%}'):>26}"
    )
    kept = result.get("kept_length")
    if kept:
        lines.append(
            f"{'  kept both times (' + str(kept['positions']) + ')':26} "
            f"{kept['before']:>24.1f} {kept['after']:>24.1f} "
            f"{change(kept['relative'], '{:+.1%}'):>26}"
        )
    for kind, part in (result.get("by_kind") or {}).items():
        name, pattern = "chars_saved_per_completion", "{:.2f}"
        label = f"  {kind.replace('_', ' ')} ({part['before']['completions']})"
        shown = (cell(part["before"], name, pattern), cell(part.get("after"), name, pattern))
        lines.append(
            f"{label:26} {shown[0]:>24} {shown[1]:>24} "
            f"{change((part.get('paired_lift') or {}).get(name)):>26}"
        )
    p50 = [m.get("latency_ms_p50") if m else None for m in (before, after)]
    lines.append(
        f"{'latency p50 (ms)':26} {p50[0] if p50[0] is not None else '-':>24} "
        f"{p50[1] if p50[1] is not None else '-':>24}"
    )
    return "\n".join(lines)
