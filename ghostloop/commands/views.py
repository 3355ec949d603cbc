"""``ghostloop logs|stats|pairs|runs``: read-only views of the store in a terminal
(``feedback.admin_cli``)."""

from __future__ import annotations

import argparse
import sys

from ghostloop.commands import Subcommands
from ghostloop.settings import Settings


def register(commands: Subcommands) -> None:
    logs = commands.add_parser("logs", help="recent completions and their fate; 'logs show ID'")
    logs.add_argument("action", nargs="?", choices=["show"], help="show one completion")
    logs.add_argument("id", nargs="?", help="with show: the completion id")
    _add_filter_options(logs)
    logs.add_argument("--limit", type=int, default=30, help="newest N completions (default 30)")
    stats = commands.add_parser("stats", help="acceptance, characters saved, latency by group")
    stats.add_argument("--by", default="day", help="day, adapter, language, user; comma list")
    _add_filter_options(stats)
    pairs = commands.add_parser("pairs", help="preference pairs the nightly job made")
    pairs.add_argument("--run", dest="run_id", type=int, help="only this run's pairs")
    pairs.add_argument("--limit", type=int, default=30, help="newest N pairs (default 30)")
    runs = commands.add_parser("runs", help="training runs and their gate decisions")
    runs.add_argument("action", nargs="?", choices=["show"], help="show one run in full")
    runs.add_argument("id", nargs="?", type=int, help="with show: the run id")
    runs.add_argument("--limit", type=int, default=30, help="newest N runs (default 30)")
    for parser in (logs, stats, pairs, runs):
        parser.add_argument("--json", action="store_true", help="JSON lines for scripts")
        parser.set_defaults(run=run)


def _add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="only this user's completions")
    parser.add_argument("--language", help="only this language (an LSP language id)")
    parser.add_argument("--adapter", help="only this adapter version ('base': no adapter)")
    parser.add_argument("--outcome", help="pending, shown, accepted, partial, rejected, dismissed")
    parser.add_argument("--since", help="from this time: an age (2d, 12h) or a date (2026-11-20)")
    parser.add_argument("--until", help="before this time: an age or a date")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """logs, stats, pairs and runs: read-only views of the store."""
    from feedback import admin_cli
    from feedback.database import StoreError, open_store, upgrade
    from feedback.logs import UnknownCompletionError

    show = {
        "logs": admin_cli.show_logs,
        "stats": admin_cli.show_stats,
        "pairs": admin_cli.show_pairs,
        "runs": admin_cli.show_runs,
    }[args.command]
    try:
        engine = open_store(settings.store)
        upgrade(engine)
        return show(engine, args)
    except admin_cli.AdminInputError as error:
        print(f"ghostloop {args.command}: {error}", file=sys.stderr)
        return 2
    except (StoreError, UnknownCompletionError) as error:
        print(f"ghostloop {args.command}: {error}", file=sys.stderr)
        return 1
