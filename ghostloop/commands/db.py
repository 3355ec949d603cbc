"""``ghostloop db``: upkeep of the feedback database (migrations, revision, purge)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ghostloop.commands import Subcommands
from ghostloop.settings import Settings


def register(commands: Subcommands) -> None:
    db = commands.add_parser("db", help="upkeep of the feedback database")
    db.add_argument(
        "db_command",
        choices=["upgrade", "current", "purge"],
        help="apply migrations, show the revision, or delete old records",
    )
    db.add_argument("--older-than", help="with purge: an age such as 30d, 12h")
    db.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.database import (
        StoreError,
        current_revision,
        head_revision,
        open_store,
        upgrade,
    )

    try:
        engine = open_store(settings.store)
        if args.db_command == "purge":
            return purge(engine, args.older_than)
        if args.db_command == "upgrade":
            revision = upgrade(engine)
            print(f"database at revision {revision} (head): {engine.url.render_as_string()}")
        else:
            current = current_revision(engine)
            state = "up to date" if current == head_revision() else "run 'ghostloop db upgrade'"
            print(f"database at revision {current or 'none'}, head {head_revision()}: {state}")
    except StoreError as error:
        print(f"ghostloop db: {error}", file=sys.stderr)
        return 1
    return 0


def purge(engine: Any, older_than: str | None) -> int:
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    from feedback.database import upgrade
    from feedback.store import parse_age, purge_older_than

    if older_than is None:
        print("ghostloop db purge: say how old, e.g. --older-than 30d", file=sys.stderr)
        return 2
    try:
        cutoff = datetime.now(UTC) - parse_age(older_than)
    except ValueError as error:
        print(f"ghostloop db purge: {error}", file=sys.stderr)
        return 2
    upgrade(engine)
    with Session(engine) as session, session.begin():
        completions, events = purge_older_than(session=session, cutoff=cutoff)
    print(f"deleted {completions} completions and {events} events older than {older_than}")
    return 0
