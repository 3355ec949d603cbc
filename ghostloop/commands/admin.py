"""``ghostloop admin serve``: the admin web dashboard."""

from __future__ import annotations

import argparse
import sys

from ghostloop.commands import Subcommands
from ghostloop.settings import Settings


def register(commands: Subcommands) -> None:
    admin = commands.add_parser("admin", help="the admin web dashboard")
    admin.add_argument("admin_command", choices=["serve"], help="serve the dashboard")
    admin.add_argument("--host", default="127.0.0.1", help="address (default: loopback only)")
    admin.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    admin.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.admin_web.app import serve
    from feedback.database import StoreError

    try:
        return serve(settings, host=args.host, port=args.port)
    except StoreError as error:
        print(f"ghostloop admin: {error}", file=sys.stderr)
        return 1
