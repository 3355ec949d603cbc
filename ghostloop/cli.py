"""The ``ghostloop`` command: global options, settings and logging; each subcommand is a
module of ``ghostloop.commands`` that registers its arguments beside its handler."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ghostloop import __version__
from ghostloop.commands import (
    adapters,
    admin,
    config,
    db,
    replay,
    replays,
    serve,
    train,
    users,
    views,
)
from ghostloop.settings import Settings, SettingsError, load_settings


def _setup_logging(settings: Settings) -> None:
    # stdout is the LSP channel: logs go to stderr (serve on stdio hands them to the editor
    # as window/logMessage once a session is initialized: lsp_server.client_log).
    logging.basicConfig(
        stream=sys.stderr,
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if settings.log_level != "DEBUG":
        # pygls logs every message it sends at INFO; that is debugging detail.
        logging.getLogger("pygls").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)


# in the order ``ghostloop --help`` lists them
COMMANDS = (
    serve,
    replay,
    db,
    users,
    train,
    adapters,
    views,
    replays,
    admin,
    config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghostloop", description="Self-hosted code completion that learns from its users."
    )
    parser.add_argument("--version", action="version", version=f"ghostloop {__version__}")
    parser.add_argument("--model", help="model to use (overrides GHOSTLOOP_MODEL)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
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
    try:
        code = int(args.run(args, settings))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`ghostloop logs --json | head`): stop quietly, as Python's
        # docs advise, with stdout pointed at devnull so the flush at exit cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code
