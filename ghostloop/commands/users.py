"""``ghostloop users``: access tokens for the team server (``serve --tcp``)."""

from __future__ import annotations

import argparse
import json
import sys

from ghostloop.commands import Subcommands
from ghostloop.settings import Settings


def register(commands: Subcommands) -> None:
    users = commands.add_parser(
        "users", help="access tokens for the team server (serve --tcp): add, list, revoke"
    )
    user_commands = users.add_subparsers(dest="users_command", required=True)
    add = user_commands.add_parser("add", help="a new token for a user; printed once")
    add.add_argument("name", help="the user every completion over this token is stored as")
    add.add_argument("--note", help="what the token is for, e.g. a laptop's name")
    add.add_argument("--json", action="store_true", help="print {id, user, token} as JSON")
    listing = user_commands.add_parser("list", help="the tokens (never the tokens themselves)")
    listing.add_argument("--all", action="store_true", help="revoked ones too")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = user_commands.add_parser("revoke", help="revoke a token by id, or a user's all")
    revoke.add_argument("name", help="a token id (from list) or a user name")
    users.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Access tokens for the team server: add prints the token once, list never does."""
    from feedback.database import StoreError, open_store, upgrade
    from feedback.tokens import TokenError, add_token, list_tokens, revoke

    try:
        engine = open_store(settings.store)
        upgrade(engine)
        if args.users_command == "add":
            info, token = add_token(engine, args.name, note=args.note or "")
            if args.json:
                print(json.dumps({"id": info.id, "user": info.user, "token": token}))
            else:
                print(token)
                print(
                    f"token {info.id} for {info.user}: give it to them; it is not shown "
                    "again (the database keeps only its digest)",
                    file=sys.stderr,
                )
        elif args.users_command == "list":
            tokens = list_tokens(engine, include_revoked=args.all)
            if not tokens and not args.json:
                print("no access tokens; make one with `ghostloop users add NAME`")
            for t in tokens:
                created = t.created_at.isoformat()
                revoked = t.revoked_at.isoformat() if t.revoked_at else None
                if args.json:
                    print(
                        json.dumps(
                            {
                                "id": t.id,
                                "user": t.user,
                                "created_at": created,
                                "revoked_at": revoked,
                                "note": t.note,
                            }
                        )
                    )
                else:
                    state = f"revoked {revoked[:19]}" if revoked else "active"
                    print(f"{t.id}  {t.user:24} created {created[:19]}  {state}  {t.note}".rstrip())
        else:
            for t in revoke(engine, args.name):
                print(f"revoked token {t.id} of {t.user}")
    except (StoreError, TokenError) as error:
        print(f"ghostloop users: {error}", file=sys.stderr)
        return 1
    return 0
