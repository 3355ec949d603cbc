"""The replay's report: before and after on the same held-out positions, from stored rows.

Every figure is computed from what the server stored (completion rows and their feedback
events, the same rules as labels and the canary) plus the one thing the store cannot know,
the code that really followed each cursor (for exact-line acceptance). A position where the
server suggested nothing has no row: it counts as an empty suggestion that saved nothing.

The headline is characters saved per completion; lifts are PAIRED over the same positions
(each position's after minus its before, resampled together), which is what makes a
20 % lift visible with a few hundred positions (docs/architecture.md, the lab run).
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from feedback.canary import chars_saved
from feedback.database import StoreError, open_engine
from feedback.schema import Completion
from feedback.store import events_by_completion

ROUNDS = 4000
# a replay's directory name under <data dir>/replays: no path separators, not "." or ".."
REPLAY_NAME = re.compile(r"^(?!\.+$)[\w.:-]+$")
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


def _resample(n: int, seed: int, groups: Sequence[int] | None = None) -> np.ndarray:
    """ROUNDS bootstrap resamples of n positions (shape ROUNDS x n). With ``groups`` (one
    label per position: which replay it came from) each group is resampled within itself,
    a stratified bootstrap: pooled replays keep their sizes in every round."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.integers(0, n, size=(ROUNDS, n))
    if len(groups) != n:
        raise ValueError(f"one group per position: {len(groups)} groups, {n} positions")
    labels = np.asarray(groups)
    parts = []
    for label in dict.fromkeys(groups):  # in order of first appearance
        members = np.flatnonzero(labels == label)
        parts.append(members[rng.integers(0, len(members), size=(ROUNDS, len(members)))])
    return np.concatenate(parts, axis=1)


def _interval(point: float, rounds: np.ndarray) -> list[float]:
    low, high = np.percentile(rounds, [2.5, 97.5])
    return [round(point, 4), round(float(low), 4), round(float(high), 4)]


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
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
    }
    if not n:
        return {**result, **dict.fromkeys(METRICS, 0.0), "intervals": {}}
    columns = _columns(scores)
    everything = np.arange(n)[None, :]
    rows = _resample(n, seed, groups)
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
    before: Sequence[Scored],
    after: Sequence[Scored],
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> dict[str, list[float]]:
    """After minus before over the same positions: [estimate, low, high] per metric, plus
    the headline's relative lift (after / before - 1). ``groups``: see ``_resample``."""
    a, b = _paired_columns(before, after)
    n = len(before)
    if not n:
        return {}
    everything = np.arange(n)[None, :]
    rows = _resample(n, seed, groups)
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
    ``groups``: see ``_resample`` (the kept positions resampled within their replay)."""
    a, b = _paired_columns(before, after)
    kept = np.flatnonzero((a["saved"] > 0) & (b["saved"] > 0))
    if not len(kept):
        return None
    old, new = a["suggested"][kept], b["suggested"][kept]
    rows = _resample(len(kept), seed, None if groups is None else [groups[int(i)] for i in kept])
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
    # each value above its interval's cap, not across the error bar
    caps = [max(v, i[2]) for v, i in zip(values, intervals, strict=True)]
    for index, (value, cap) in enumerate(zip(values, caps, strict=True)):
        axes.annotate(
            f"{value:.2f}",
            (index, cap),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    axes.set_ylim(0, max([*caps, 0.0]) * 1.15 or 1.0)
    figure.tight_layout()
    figure.savefig(path, format="png")
    pyplot.close(figure)
    return path


def methods_of(report: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Each method's result; a report of one method without ``methods`` is read as one."""
    return dict(report.get("methods") or {}) or {
        report.get("method", "adapter"): {
            "adapter": report.get("adapter"),
            "after": report.get("after"),
            "paired_lift": report.get("paired_lift"),
            "by_kind": report.get("by_kind", {}),
            "kept_length": report.get("kept_length"),
        }
    }


def format_table(report: Mapping[str, Any]) -> str:
    """The printed report: before, after and the paired lift on the held-out half, one block
    per method, the headline split into line starts and mid-line."""
    blocks = []
    for name, result in methods_of(report).items():
        title = f"{name}: {result.get('adapter') or 'nothing published'}"
        blocks.append(_block(title, method_rows(report["before"], result)))
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


@dataclass(frozen=True)
class ReportRow:
    """One line of a method's block, as the terminal and the dashboard both show it."""

    label: str
    before: str
    after: str
    lift: str
    part: bool = False  # a breakdown of the line above it (relative, kept, by kind)


ROWS = (
    ("chars saved / completion", "chars_saved_per_completion", "{:.2f}"),
    ("exact-line acceptance", "exact_line_acceptance", "{:.3f}"),
    ("retained / suggested", "survival_weighted_acceptance", "{:.3f}"),
    ("mean suggestion chars", "mean_suggestion_chars", "{:.1f}"),
    ("empty suggestions", "empty_rate", "{:.3f}"),
)


def _cell(m: Mapping[str, Any] | None, name: str, pattern: str) -> str:
    """A figure of one pass with its 95 % interval, '-' for a pass that did not run."""
    if not m:
        return "-"
    low, high = m["intervals"].get(name, [0, 0, 0])[1:]
    return f"{pattern.format(m[name])} [{pattern.format(low)}, {pattern.format(high)}]"


def format_interval(values: Sequence[float] | None, pattern: str = "{:+.3f}") -> str:
    """A change and its interval, (estimate, low, high): '+0.482 [+0.050, +0.920]'."""
    if not values:
        return "-"
    estimate, low, high = (pattern.format(v) for v in values)
    return f"{estimate} [{low}, {high}]"


def _latency(m: Mapping[str, Any] | None) -> str:
    if not m or m.get("latency_ms_p50") is None:
        return "-"
    return f"{m['latency_ms_p50']:.0f} / {m['latency_ms_p95']:.0f}"


def method_rows(before: Mapping[str, Any], result: Mapping[str, Any]) -> list[ReportRow]:
    """A method's figures on the held-out half, line by line: each metric before and after
    with its interval and the paired lift; under the headline its relative lift, the length
    of suggestions kept both times, and the split into line starts and mid-line."""
    after = result.get("after")
    lift = result.get("paired_lift") or {}
    rows = []
    for label, name, pattern in ROWS:
        rows.append(
            ReportRow(
                label,
                _cell(before, name, pattern),
                _cell(after, name, pattern),
                format_interval(lift.get(name)),
            )
        )
        if name != "chars_saved_per_completion":
            continue
        relative = format_lift(lift.get("chars_saved_relative"))
        rows.append(ReportRow("relative (headline)", "", "", relative, part=True))
        kept = result.get("kept_length")
        if kept:
            rows.append(
                ReportRow(
                    f"kept both times ({kept['positions']})",
                    f"{kept['before']:.1f}",
                    f"{kept['after']:.1f}",
                    format_lift(kept["relative"]),
                    part=True,
                )
            )
        for kind, part in (result.get("by_kind") or {}).items():
            rows.append(
                ReportRow(
                    f"{kind.replace('_', ' ')} ({part['before']['completions']})",
                    _cell(part["before"], name, pattern),
                    _cell(part.get("after"), name, pattern),
                    format_interval((part.get("paired_lift") or {}).get(name)),
                    part=True,
                )
            )
    rows.append(ReportRow("latency p50 / p95 (ms)", _latency(before), _latency(after), ""))
    return rows


def _block(title: str, rows: Sequence[ReportRow]) -> str:
    lines = [
        f"held-out, {title}",
        f"{'':26} {'before':>24} {'after':>24} {'paired lift':>26}",
    ]
    for row in rows:
        label = f"  {row.label}" if row.part else row.label
        lines.append(f"{label:26} {row.before:>24} {row.after:>24} {row.lift:>26}".rstrip())
    return "\n".join(lines)


class StoredReplayError(LookupError):
    """A stored replay that is not there or cannot be read."""


class UnknownReplayError(StoredReplayError):
    """No replay of that name under the data dir."""


def _replays_dir(data_dir: Path) -> Path:
    return data_dir / "replays"


def stored_names(data_dir: Path, limit: int | None = None) -> list[str]:
    """The replays run with this data dir (``<data dir>/replays/NAME/report.json``), newest
    report first."""
    found = []
    for path in _replays_dir(data_dir).glob("*/report.json"):
        try:
            found.append((path.stat().st_mtime, path.parent.name))
        except OSError:
            continue  # removed while we looked
    found.sort(reverse=True)
    return [name for _, name in found[:limit]]


def stored_chart(data_dir: Path, name: str) -> Path | None:
    """The chart of replay ``name`` (``report.png`` beside its report), if it has one."""
    path = _replays_dir(data_dir) / name / "report.png"
    return path if REPLAY_NAME.match(name) and path.is_file() else None


def stored_report(data_dir: Path, name: str) -> dict[str, Any]:
    """The stored report of replay ``name``; StoredReplayError when there is no such replay
    or its report is not one (a corrupt or foreign file)."""
    path = _replays_dir(data_dir) / name / "report.json"
    if not REPLAY_NAME.match(name) or not path.is_file():
        raise UnknownReplayError(f"no replay named {name!r}: 'ghostloop replays' lists them")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        _check_report(report)
        # every view's reading of it, once: a report that passes shows everywhere
        for result in methods_of(report).values():
            method_rows(report["before"], result)
        describe(report)
        overview_row(name, report)
        if report.get("reach"):
            format_reach(report["reach"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        why = f"it has no {error}" if isinstance(error, KeyError) else str(error)
        raise StoredReplayError(
            f"{path} is not a readable replay report ({why}); run the replay again "
            "or delete its directory"
        ) from None
    return report


def _check_report(report: Any) -> None:
    """The parts every view reads, with their types: a ValueError naming what is wrong."""
    if not isinstance(report, dict):
        raise ValueError("not a JSON object")
    before = report.get("before")
    if not isinstance(before, dict) or not isinstance(before.get("intervals"), dict):
        raise ValueError("no 'before' figures")
    for metric in ("completions", *METRICS):
        if not isinstance(before.get(metric), int | float):
            raise ValueError(f"'before' has no number {metric!r}")
    methods = report.get("methods")
    if methods is not None and not isinstance(methods, dict):
        raise ValueError("'methods' is not an object")
    for name, result in methods_of(report).items():
        if not isinstance(result, dict):
            raise ValueError(f"method {name!r} is not an object")
        after = result.get("after")
        if after is not None and (
            not isinstance(after, dict)
            or not all(isinstance(after.get(m), int | float) for m in METRICS)
        ):
            raise ValueError(f"method {name!r} has unreadable 'after' figures")
    if not isinstance(report.get("split", {}), dict):
        raise ValueError("'split' is not an object")


def overview_row(name: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """One line per replay: the base model's headline and each method's, with its lift."""
    before = report["before"]
    methods = []
    for method, result in methods_of(report).items():
        after = result.get("after") or {}
        methods.append(
            {
                "method": method,
                "adapter": result.get("adapter"),
                "after": after.get("chars_saved_per_completion"),
                "lift": (result.get("paired_lift") or {}).get("chars_saved_relative"),
            }
        )
    return {
        "name": name,
        "model": report.get("model"),
        "root": (report.get("split") or {}).get("root"),
        "positions": before.get("completions"),
        "before": before.get("chars_saved_per_completion"),
        "methods": methods,
        "chart": bool(report.get("chart")),
    }


def describe(report: Mapping[str, Any]) -> str:
    """What was replayed, in one sentence: model, repository, the split, the gate, the time."""
    split = report.get("split") or {}
    served = f", served with {report['backend']}" if report.get("backend") else ""
    held = split.get("held_out_positions", report["before"]["completions"])
    parts = [
        f"{report.get('model') or 'an unnamed model'}{served}, over {split.get('root', '?')}: "
        f"{len(split.get('train_files') or [])} files to train on "
        f"({split.get('train_positions', '?')} positions walked, the night's data), "
        f"{len(split.get('held_out_files') or [])} held out ({held} positions)",
        f"seed {split.get('seed', '?')}",
    ]
    if "gated" in report:
        parts.append(
            "gated: an adapter the gate refused is not replayed"
            if report["gated"]
            else "ungated: the adapter is replayed whatever the gate said"
        )
    if isinstance(report.get("seconds"), int | float):
        parts.append(f"{report['seconds'] / 60:.1f} min in all")
    return "; ".join(parts) + "."


def format_lift(lift: Sequence[float] | None) -> str:
    """A relative lift and its interval, as every report, page and doc write it:
    '+8.9 % [+0.9 %, +18.0 %]'."""
    return format_interval(None if not lift else [100 * v for v in lift], "{:+.1f} %")


def stored_scores(
    name: str, report: Mapping[str, Any], method: str | None = None
) -> tuple[list[Position], list[Scored], list[Scored]]:
    """A stored replay's held-out positions and each one's score before and after
    ``method``'s night (default: the report's first method), read back from the replay's
    own store as the report was computed. StoredReplayError when they cannot be."""
    results = methods_of(report)
    chosen = method or next(iter(results))
    if chosen not in results:
        raise StoredReplayError(
            f"replay {name!r} has no method {chosen!r}: it ran {', '.join(results)}"
        )
    served = report.get("served") or {}
    after_ids = results[chosen].get("served")
    if after_ids is None and chosen == report.get("method"):
        after_ids = served.get("after")
    if not after_ids or not report.get("positions") or not served.get("before"):
        raise StoredReplayError(
            f"replay {name!r} has no held-out walk after {chosen}'s night to pool "
            "(nothing was published, or the report predates per-position records)"
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
                before = load_scores(session, positions, served["before"])
                after = load_scores(session, positions, after_ids)
        finally:
            engine.dispose()
    except (StoreError, SQLAlchemyError, UnsettledError, TypeError, AttributeError) as error:
        raise StoredReplayError(f"replay {name!r}'s store cannot be read back: {error}") from None
    return positions, before, after


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
