"""``ghostloop serve``: the language server on stdio, or the team server on TCP."""

from __future__ import annotations

import argparse

from ghostloop.commands import Subcommands, fail
from ghostloop.settings import Settings


def register(commands: Subcommands) -> None:
    serve = commands.add_parser("serve", help="run the language server (stdio by default)")
    serve.add_argument("--tcp", action="store_true", help="listen on TCP instead of stdio")
    serve.add_argument(
        "--stdio", action="store_true", help="stdin/stdout (the default; for clients that pass it)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="TCP address (default: loopback)")
    serve.add_argument("--port", type=int, default=2087, help="TCP port (default: 2087)")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from lsp_server.server import create_server, serve_stdio

    if args.tcp and args.stdio:
        return fail("serve", "choose --tcp or --stdio, not both")
    if args.tcp:
        from lsp_server.team import serve_team

        return serve_team(settings, args.host, args.port)
    if args.host != "127.0.0.1" or args.port != 2087:
        return fail("serve", "--host and --port go with --tcp")
    return serve_stdio(create_server(settings))
