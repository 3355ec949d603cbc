"""``ghostloop adapters``: list, promote, canary, check or roll back published adapters."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ghostloop.commands import Subcommands
from ghostloop.settings import Settings


def register(commands: Subcommands) -> None:
    adapters = commands.add_parser(
        "adapters", help="list, promote, canary, check or roll back adapters"
    )
    adapters.add_argument(
        "adapters_command",
        choices=["list", "promote", "canary", "check", "rollback"],
        help="rollback ends a running canary first, else the active adapter",
    )
    adapters.add_argument(
        "version", nargs="?", help="with promote: the version to activate; with canary: to try"
    )
    adapters.add_argument(
        "--share", type=float, help="with canary: share of users served the canary (0-1)"
    )
    adapters.add_argument("--json", action="store_true", help="with list: JSON lines")
    adapters.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.orm import Session

    from feedback import adapter_rows
    from feedback.database import StoreError, open_store, upgrade

    try:
        engine = open_store(settings.store)
        upgrade(engine)
        if args.adapters_command == "check":
            with Session(engine) as session:
                return check_canary(session, settings)
        with Session(engine) as session, session.begin():
            if args.adapters_command == "list":
                rows = adapter_rows.versions(session)
                if args.json:
                    for row in rows:
                        print(json.dumps(adapter_rows.record(row), default=str))
                    return 0
                if not rows:
                    print("no adapters published yet; the base model serves")
                for row in rows:
                    gate = (row.evidence or {}).get("gate", {})
                    lift = gate.get("paired_lift", {}).get("chars_saved_per_completion")
                    shown = f"lift {lift[0]:+.2f} [{lift[1]:+.2f}, {lift[2]:+.2f}]" if lift else ""
                    print(
                        f"{row.version:40} {row.status:12} run {row.run_id!s:5} "
                        f"{row.created_at:%Y-%m-%d %H:%M} {shown}"
                    )
            elif args.adapters_command == "promote":
                if not args.version:
                    print("ghostloop adapters promote: name a VERSION", file=sys.stderr)
                    return 2
                row = adapter_rows.promote(session, args.version)
                print(f"{row.version} is active")
            elif args.adapters_command == "canary":
                if not args.version:
                    print("ghostloop adapters canary: name a VERSION", file=sys.stderr)
                    return 2
                share = args.share if args.share is not None else settings.canary.share or 0.2
                row = adapter_rows.start_canary(session, args.version, share)
                print(f"{row.version} is a canary for {share:.0%} of users")
            else:
                rolled, now = adapter_rows.rollback(session)
                print(f"{rolled.version} rolled back; {now or 'the base model'} serves")
    except (StoreError, adapter_rows.AdapterStateError) as error:
        print(f"ghostloop adapters: {error}", file=sys.stderr)
        return 1
    return 0


def check_canary(session: Any, settings: Settings) -> int:
    from feedback import canary

    verdict = canary.check(session, None, **settings.canary_plan)
    if verdict is None:
        print("no canary is running")
        return 0
    arms = ", ".join(
        f"{arm}: {f.chars_saved_per_completion:.2f} chars saved per completion over "
        f"{f.completions} completions of {f.users} users"
        for arm, f in verdict.arms.items()
    )
    if verdict.decision == "wait":
        print(
            f"canary {verdict.version}: waiting for {settings.canary.min_completions} settled "
            f"completions per arm since the last test ({arms})"
        )
        return 0
    low_high = verdict.difference
    print(
        f"canary {verdict.version}: {verdict.decision} at test {verdict.look}/{verdict.looks}; "
        f"canary - active {low_high[0]:+.2f} [{low_high[1]:+.2f}, {low_high[2]:+.2f}] "
        f"({verdict.level:.2%} interval); {arms}"
    )
    return 0
