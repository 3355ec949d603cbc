"""``ghostloop logs|stats|pairs|runs|replays``: the log in a terminal, as rich tables (paged when
they outgrow the screen) or as JSON for scripts. Queries live in feedback.logs and
feedback.stats; this module only prints what they return."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from feedback import logs, replays, stats
from feedback.logs import LogFilter
from feedback.schema import PreferencePair, TrainingRun


class AdminInputError(ValueError):
    """A bad option value; the message says which and what is accepted."""


def log_filter(args: argparse.Namespace) -> LogFilter:
    try:
        return LogFilter(
            user=args.user,
            language=args.language,
            adapter=args.adapter,
            outcome=args.outcome,
            since=logs.parse_time(args.since) if args.since else None,
            until=logs.parse_time(args.until) if args.until else None,
        )
    except ValueError as error:
        raise AdminInputError(str(error)) from None


def _console() -> Console:
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # piped into a file or a pager: room for whole rows
    return console


@contextmanager
def _paged(console: Console, lines: int) -> Iterator[None]:
    """Page output longer than the screen when a person is reading it."""
    if console.is_terminal and lines > console.size.height - 2:
        with console.pager(styles=True):
            yield
    else:
        yield


def _emit(renderable: RenderableType, lines: int) -> None:
    console = _console()
    with _paged(console, lines):
        console.print(renderable)


def _json_lines(items: list[dict[str, Any]]) -> None:
    for item in items:
        sys.stdout.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")


def _one_line(text: str | None, width: int = 48) -> Text:
    flat = (text or "").replace("\n", "⏎")
    return Text(flat if len(flat) <= width else flat[: width - 1] + "…")


def _figure(value: float | None, template: str) -> str:
    return "-" if value is None else template.format(value)


def show_logs(engine: Engine, args: argparse.Namespace) -> int:
    where = log_filter(args)
    with Session(engine) as session:
        if args.action == "show":
            return _show_completion(session, args)
        rows = logs.records(session=session, where=where, limit=args.limit)
        total = logs.count(session=session, where=where)
    if args.json:
        _json_lines(rows)
        return 0
    if not rows:
        print("no completions match; 'ghostloop logs' without filters shows the newest")
        return 0
    table = Table(title=f"{len(rows)} newest of {total} completions", title_justify="left")
    for name in ("id", "time (UTC)", "user", "lang", "adapter", "outcome", "kept", "suggestion"):
        table.add_column(name, no_wrap=name != "suggestion", overflow="ellipsis")
    for row in rows:
        survival = row["survival"]
        kept = "" if not survival else f"{list(survival.values())[-1]:.0%}"
        table.add_row(
            row["id"],
            row["time"][:19].replace("T", " "),
            row["user"],
            row["language"],
            row["adapter"] or logs.BASE_ADAPTER,
            row["outcome"] + (f" {row['accepted_length']}" if row["accepted_length"] else ""),
            kept,
            _one_line(row["suggestion"]),
        )
    _emit(table, len(rows) + 6)
    return 0


def _show_completion(session: Session, args: argparse.Namespace) -> int:
    if not args.id:
        raise AdminInputError("name a completion: ghostloop logs show ID")
    found = logs.detail(session=session, completion_id=args.id)
    completion = found.completion
    events: list[dict[str, Any]] = [
        {
            "time": logs.aware(e.created_at).isoformat(),
            "kind": e.kind,
            "accepted_length": e.accepted_length,
            "window_s": e.window_s,
            "survival_ratio": e.survival_ratio,
            "text": e.text,
        }
        for e in found.events
    ]
    if args.json:
        record = logs.log_record(completion, found.events)
        record.update(
            prompt_prefix=completion.prompt_prefix,
            prompt_suffix=completion.prompt_suffix,
            final_text=found.final_text,
            events=events,
        )
        _json_lines([record])
        return 0
    facts = Table.grid(padding=(0, 2))
    for name, value in (
        ("completion", completion.id),
        ("time", logs.aware(completion.created_at).isoformat(timespec="seconds")),
        ("user", completion.user),
        ("file", f"{completion.path} ({completion.language})"),
        ("model", f"{completion.base_model} + {completion.adapter_version or 'no adapter'}"),
        ("outcome", completion.outcome),
        ("chars saved", _figure(completion.chars_saved, "{}")),
        ("latency", f"{completion.latency_ms:.0f} ms, {completion.generated_tokens} tokens"),
    ):
        facts.add_row(Text(name, style="bold"), Text(str(value)))
    timeline = Table("time", "event", "detail", title="events", title_justify="left")
    for event in events:
        detail = []
        if event["accepted_length"] is not None:
            detail.append(f"{event['accepted_length']} chars")
        if event["window_s"] is not None:
            detail.append(f"after {event['window_s']:g} s: {event['survival_ratio'] or 0:.0%} kept")
        if event["text"] is not None:
            detail.append(repr(event["text"]))
        timeline.add_row(event["time"][11:19], event["kind"], Text(", ".join(detail)))
    console = _console()
    prompt_tail = "\n".join(completion.prompt_prefix.splitlines()[-8:])
    with _paged(console, 30 + len(events)):
        console.print(facts)
        console.print(Text("\nprompt (last lines)", style="bold"))
        console.print(Text(prompt_tail))
        console.print(Text("\nsuggestion", style="bold"))
        console.print(Text(completion.suggestion))
        console.print(Text(f"\nin the code now ({found.final_from or 'not measured yet'})", "bold"))
        console.print(Text(found.final_text if found.final_text is not None else "-"))
        console.print(timeline)
    return 0


def show_stats(engine: Engine, args: argparse.Namespace) -> int:
    by = [part for part in args.by.split(",") if part]
    unknown = [name for name in by if name not in stats.GROUPS]
    if unknown or len(set(by)) != len(by):
        raise AdminInputError(
            f"--by takes distinct names among {', '.join(stats.GROUPS)}; got {args.by!r}"
        )
    where = log_filter(args)
    with Session(engine) as session:
        rows = stats.stats(session=session, by=by, where=where)
    if args.json:
        _json_lines([row.as_dict(by) for row in rows])
        return 0
    if not rows:
        print("no completions match")
        return 0
    table = Table(title=f"completions by {', '.join(by) or 'everything'}", title_justify="left")
    for name in by:
        table.add_column(name)
    for name in ("completions", "accepted", "chars saved/completion", "kept/suggested"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("p50/p95 ms", justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            *row.key,
            str(row.completions),
            f"{row.accepted} ({_figure(row.acceptance, '{:.0%}')})",
            _figure(row.chars_saved_per_completion, "{:.2f}") + f" ({row.settled} settled)",
            _figure(row.survival_weighted_acceptance, "{:.0%}"),
            f"{_figure(row.latency_ms_p50, '{:.0f}')} / {_figure(row.latency_ms_p95, '{:.0f}')}",
        )
    _emit(table, len(rows) + 6)
    return 0


def pair_records(session: Session, run: int | None, limit: int) -> list[dict[str, Any]]:
    query = select(PreferencePair).order_by(PreferencePair.id.desc()).limit(limit)
    if run is not None:
        query = query.where(PreferencePair.run_id == run)
    return [
        {
            "id": pair.id,
            "run": pair.run_id,
            "completion_id": pair.completion_id,
            "user": pair.user,
            "split": pair.split,
            "chosen": pair.chosen,
            "rejected": pair.rejected,
            "chosen_chars_saved": pair.chosen_chars_saved,
            "rejected_chars_saved": pair.rejected_chars_saved,
            "ranking": pair.ranking,
        }
        for pair in session.scalars(query)
    ]


def show_pairs(engine: Engine, args: argparse.Namespace) -> int:
    with Session(engine) as session:
        rows = pair_records(session, args.run_id, args.limit)
    if args.json:
        _json_lines(rows)
        return 0
    if not rows:
        if args.run_id is not None:
            print(f"no preference pairs from run {args.run_id}: 'ghostloop runs' lists the runs")
        else:
            print("no preference pairs yet: 'ghostloop train' makes them from the log")
        return 0
    table = Table(title=f"{len(rows)} newest preference pairs", title_justify="left")
    for name in ("id", "run", "split", "user", "chosen", "saved", "rejected", "saved "):
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(
            str(row["id"]),
            str(row["run"] or "-"),
            row["split"],
            row["user"],
            _one_line(row["chosen"], 36),
            str(row["chosen_chars_saved"]),
            _one_line(row["rejected"], 36),
            str(row["rejected_chars_saved"]),
        )
    _emit(table, len(rows) + 6)
    return 0


def run_record(run: TrainingRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "started_at": logs.aware(run.started_at).isoformat(),
        "finished_at": logs.aware(run.finished_at).isoformat() if run.finished_at else None,
        "method": run.method,
        "base_model": run.base_model,
        "status": run.status,
        "decision": run.decision,
        "reason": run.reason,
        "data_counts": run.data_counts,
        "parameters": run.parameters,
        "losses": run.losses,
        "evaluation": run.evaluation,
    }


def show_runs(engine: Engine, args: argparse.Namespace) -> int:
    with Session(engine) as session:
        if args.action == "show":
            if args.id is None:
                raise AdminInputError("name a run: ghostloop runs show ID")
            run = session.get(TrainingRun, args.id)
            if run is None:
                raise AdminInputError(f"no training run has id {args.id} — 'ghostloop runs'")
            record = run_record(run)
            if args.json:
                _json_lines([record])
            else:
                _console().print_json(json.dumps(record, default=str))
            return 0
        query = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(args.limit)
        rows = [run_record(run) for run in session.scalars(query)]
    if args.json:
        _json_lines(rows)
        return 0
    if not rows:
        print("no training runs yet: 'ghostloop train' is the nightly job")
        return 0
    table = Table(title=f"{len(rows)} newest training runs", title_justify="left")
    for name in ("id", "started (UTC)", "method", "status", "decision", "train / eval", "reason"):
        table.add_column(name, no_wrap=name != "reason", overflow="fold")
    for row in rows:
        counts = row["data_counts"] or {}
        table.add_row(
            str(row["id"]),
            row["started_at"][:16].replace("T", " "),
            row["method"],
            row["status"],
            row["decision"] or "-",
            f"{counts.get('train', '-')} / {counts.get('eval', '-')}",
            Text(row["reason"] or ""),
        )
    _emit(table, 3 * len(rows) + 6)
    return 0


def show_replays(data_dir: Path, args: argparse.Namespace) -> int:
    """The replays stored under the data dir (``ghostloop replay``), or one in full: the same
    report it printed when it ran. StoredReplayError for an unknown or unreadable one."""
    if args.action == "show":
        if len(args.names) != 1:
            raise AdminInputError("name one replay: ghostloop replays show NAME")
        (name,) = args.names
        report = replays.stored_report(data_dir, name)
        if args.json:
            sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
            return 0
        chart = replays.stored_chart(data_dir, name)
        print(f"replay {name}: {replays.describe(report)}\n")
        print(replays.format_table(report))
        if chart is not None:
            print(f"\nchart {chart}")
        return 0
    if args.limit < 1:
        raise AdminInputError(f"--limit must be at least 1, got {args.limit}")
    rows: list[dict[str, Any]] = []
    for name in replays.stored_names(data_dir, args.limit):
        try:
            report = replays.stored_report(data_dir, name)
        except replays.StoredReplayError as error:
            rows.append({"name": name, "problem": str(error)})
            continue
        rows.append(replays.overview_row(name, report))
    if args.json:
        _json_lines(rows)
        return 0
    if not rows:
        print(
            f"no replays under {data_dir / 'replays'} yet: 'ghostloop replay PATH' measures "
            "whether a night of training saves typing on your repository"
        )
        return 0
    table = Table(
        title=f"{len(rows)} newest replays: held-out chars saved per completion, paired lift",
        title_justify="left",
    )
    for name in ("replay", "model", "repository", "held out", "base model", "after a night"):
        table.add_column(name, no_wrap=name != "after a night", overflow="fold")
    for row in rows:
        if "problem" in row:
            table.add_row(row["name"], Text(row["problem"], style="red"), "", "", "", "")
            continue
        nights = "\n".join(
            f"{m['method']} ({m['adapter'] or 'nothing published'}): "
            f"{_figure(m['after'], '{:.2f}')} {replays.format_lift(m['lift'])}"
            for m in row["methods"]
        )
        table.add_row(
            row["name"],
            str(row["model"] or "-"),
            str(row["root"] or "-"),
            str(row["positions"]),
            _figure(row["before"], "{:.2f}"),
            nights,
        )
    _emit(table, 3 * len(rows) + 6)
    return 0
