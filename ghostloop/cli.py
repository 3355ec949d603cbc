"""The ``ghostloop`` command. Each subcommand imports its role package only when run."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ghostloop import __version__
from ghostloop.settings import Settings, SettingsError, load_settings, settings_reference


def _setup_logging(settings: Settings) -> None:
    # stdout is the LSP channel: logs go to stderr only.
    logging.basicConfig(
        stream=sys.stderr,
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if settings.log_level != "DEBUG":
        # pygls logs every message it sends at INFO; that is debugging detail.
        logging.getLogger("pygls").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from lsp_server.server import create_server

    server = create_server(settings)
    if args.tcp:
        server.start_tcp(args.host, args.port)
    else:
        server.start_io()
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from lsp_server.demo import run_demo

    return asyncio.run(run_demo(settings, files=args.files, positions=args.positions))


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.database import (
        StoreError,
        current_revision,
        default_database_url,
        head_revision,
        open_engine,
        upgrade,
    )

    url = settings.database_url or default_database_url(settings.data_dir)
    try:
        engine = open_engine(url)
        if args.db_command == "purge":
            return _purge(engine, args.older_than)
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


def _purge(engine: Any, older_than: str | None) -> int:
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


def _config(args: argparse.Namespace, settings: Settings) -> int:
    for env_name, default, help_text in settings_reference():
        name = env_name.removeprefix("GHOSTLOOP_").lower()
        print(f"{name:20} = {getattr(settings, name)!s:40} # {help_text} (default {default})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghostloop", description="Self-hosted code completion that learns from its users."
    )
    parser.add_argument("--version", action="version", version=f"ghostloop {__version__}")
    parser.add_argument("--model", help="model to use (overrides GHOSTLOOP_MODEL)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the language server (stdio by default)")
    serve.add_argument("--tcp", action="store_true", help="listen on TCP instead of stdio")
    serve.add_argument("--host", default="127.0.0.1", help="TCP address (default: loopback)")
    serve.add_argument("--port", type=int, default=2087, help="TCP port (default: 2087)")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "demo", help="complete real files through the real server and print what it suggests"
    )
    demo.add_argument("files", nargs="*", help="files to complete (default: stdlib modules)")
    demo.add_argument("--positions", type=int, default=12, help="cursor positions in all")
    demo.set_defaults(run=_demo)

    db = commands.add_parser("db", help="upkeep of the feedback database")
    db.add_argument(
        "db_command",
        choices=["upgrade", "current", "purge"],
        help="apply migrations, show the revision, or delete old records",
    )
    db.add_argument("--older-than", help="with purge: an age such as 30d, 12h")
    db.set_defaults(run=_db)

    config = commands.add_parser("config", help="print the effective settings")
    config.set_defaults(run=_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.model is not None:
        overrides["model"] = args.model
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    try:
        settings = load_settings(overrides=overrides)
    except SettingsError as error:
        print(f"ghostloop: {error}", file=sys.stderr)
        return 2
    _setup_logging(settings)
    return int(args.run(args, settings))
