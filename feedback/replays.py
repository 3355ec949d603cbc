"""The replays' stored reports as the admin views read them: ``<data dir>/replays/NAME/``
holds ``report.json`` and its chart ``report.png`` (written by ``evaluation.replay``).

Here: finding and reading them (a corrupt or foreign file is an error that names it, never
a traceback in a view), and the words and tables the terminal and the dashboard show them
in. The figures themselves are computed by the replay (``evaluation.statistics``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_FILE = "report.json"
CHART_FILE = "report.png"
# a replay's directory name under <data dir>/replays: no path separators, not "." or ".."
REPLAY_NAME = re.compile(r"^(?!\.+$)[\w.:-]+$")
METRICS = (
    "chars_saved_per_completion",
    "exact_line_acceptance",
    "survival_weighted_acceptance",
    "mean_suggestion_chars",
    "empty_rate",
)


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
        block = _block(title, method_rows(report["before"], result))
        if result.get("also_on"):
            block += "\n" + format_also_on(result["also_on"], report.get("backend") or "served")
        blocks.append(block)
    if report.get("context"):
        blocks.append(format_context(report["context"]))
    if report.get("reach"):
        blocks.append(format_reach(report["reach"]))
    return "\n\n".join(blocks)


def format_context(context: Mapping[str, Any]) -> str:
    """Repository context in words: each pass with and without it, and the paired lifts."""
    name = "chars_saved_per_completion"

    def saved(m: Mapping[str, Any] | None) -> str:
        return _cell(m, name, "{:.2f}")

    def lift(key: str, where: Mapping[str, Any] = context) -> str:
        return format_lift((where.get(key) or {}).get("chars_saved_relative"))

    hits = context.get("snippet_hits") or {}
    lines = [
        f"repository context ({context['tokens']} tokens), chars saved / completion:",
        f"  base model without {saved(context['before_without'])}; with it, paired: "
        f"{lift('paired_lift_context')}",
    ]
    if context.get("after_without"):
        lines.append(
            f"  night without {saved(context['after_without'])}; with it, paired: "
            f"{lift('paired_lift_night_context')}"
        )
        lines.append(
            f"  the night with context against the base model without: "
            f"{lift('paired_lift_product')}"
        )
    if hits:
        lines.append(
            f"  snippets held the true line at {hits['positions']} positions "
            f"({hits['share']:.1%}); there: {saved(hits.get('without'))} without, "
            f"{saved(hits.get('with'))} with, paired: {lift('paired_lift', hits)}"
        )
    long = hits.get("long_lines")
    if long:
        lines.append(
            f"  of them lines of {long['min_chars']} characters or more: "
            f"{long['positions']}; there: "
            f"{saved(long.get('without'))} without, {saved(long.get('with'))} with, "
            f"paired: {lift('paired_lift', long)}"
        )
    return "\n".join(lines)


def format_also_on(also: Mapping[str, Any], served: str) -> str:
    """The same adapter walked again on another backend, and the served one against it."""
    other = also["backend"]
    saved = _cell(also.get("after"), "chars_saved_per_completion", "{:.2f}")
    lift = format_lift((also.get("paired_lift") or {}).get("chars_saved_relative"))
    return (
        f"the same adapter on {other}: {saved} chars saved / completion; "
        f"{served} against {other}, paired: {lift}"
    )


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


def replays_dir(data_dir: Path) -> Path:
    return data_dir / "replays"


def stored_names(data_dir: Path, limit: int | None = None) -> list[str]:
    """The replays run with this data dir (``<data dir>/replays/NAME/report.json``), newest
    report first."""
    found = []
    for path in replays_dir(data_dir).glob(f"*/{REPORT_FILE}"):
        try:
            found.append((path.stat().st_mtime, path.parent.name))
        except OSError:
            continue  # removed while we looked
    found.sort(reverse=True)
    return [name for _, name in found[:limit]]


def stored_chart(data_dir: Path, name: str) -> Path | None:
    """The chart of replay ``name`` (``report.png`` beside its report), if it has one."""
    path = replays_dir(data_dir) / name / CHART_FILE
    return path if REPLAY_NAME.match(name) and path.is_file() else None


def stored_report(data_dir: Path, name: str) -> dict[str, Any]:
    """The stored report of replay ``name``; StoredReplayError when there is no such replay
    or its report is not one (a corrupt or foreign file)."""
    path = replays_dir(data_dir) / name / REPORT_FILE
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
