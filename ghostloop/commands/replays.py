"""``ghostloop replays``: the stored replay reports under the data dir (no database
needed): the newest, one in full, or several pooled (``evaluation.pool``)."""

from __future__ import annotations

import argparse
import sys

from ghostloop.commands import Subcommands
from ghostloop.settings import Settings


def register(commands: Subcommands) -> None:
    replays = commands.add_parser(
        "replays",
        help="stored replay reports (ghostloop replay); 'replays show NAME', "
        "'replays pool NAME NAME...'",
    )
    replays.add_argument(
        "action",
        nargs="?",
        choices=["show", "pool"],
        help="show one report in full, or pool several replays' held-out positions",
    )
    replays.add_argument("names", nargs="*", help="with show: a replay; with pool: two or more")
    replays.add_argument("--method", help="with pool: whose night (default: each one's first)")
    replays.add_argument(
        "--compare",
        default="night",
        help="with pool: which two walks to pair: night (before against after, the default), "
        "context (the base model without repository context against with it), product "
        "(the base model without context against the night with it), night-context (the "
        "night without context against with it)",
    )
    replays.add_argument("--limit", type=int, default=30, help="newest N replays (default 30)")
    replays.add_argument("--json", action="store_true", help="JSON lines for scripts")
    replays.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from feedback import admin_cli, replays

    try:
        if args.action == "pool":
            from evaluation.pool import PoolInputError, show_pooled

            try:
                return show_pooled(
                    settings.store.data_dir, args.names, args.method, args.json, args.compare
                )
            except PoolInputError as error:
                raise admin_cli.AdminInputError(str(error)) from None
        return admin_cli.show_replays(settings.store.data_dir, args)
    except (admin_cli.AdminInputError, replays.UnknownReplayError) as error:
        print(f"ghostloop replays: {error}", file=sys.stderr)
        return 2
    except replays.StoredReplayError as error:
        print(f"ghostloop replays: {error}", file=sys.stderr)
        return 1
