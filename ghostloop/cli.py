"""The ``ghostloop`` command. Each subcommand imports its role package only when run."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ghostloop import __version__
from ghostloop.settings import (
    REPLAY_BACKENDS,
    Settings,
    SettingsError,
    backend_name,
    load_settings,
    settings_reference,
)

# The demo's training half: 160 positions, not the held-out half's 400. The night's time
# grows with its examples and was most of the demo's time on a 2-core CPU; a night on more
# training positions saved no more typing held out (docs/results.md, "Why not +20 %").
DEMO_TRAIN_POSITIONS = 160


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


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from lsp_server.server import create_server, serve_stdio

    if args.tcp and args.stdio:
        print("ghostloop serve: choose --tcp or --stdio, not both", file=sys.stderr)
        return 2
    if args.tcp:
        from lsp_server.team import serve_team

        return serve_team(settings, args.host, args.port)
    if args.host != "127.0.0.1" or args.port != 2087:
        print("ghostloop serve: --host and --port go with --tcp", file=sys.stderr)
        return 2
    return serve_stdio(create_server(settings))


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    from pathlib import Path

    from lsp_server.replay import ReplayOptions, run_replay

    for flag, value in (
        ("--positions", args.positions),
        ("--train-positions", args.train_positions),
    ):
        if value is not None and value < 1:
            print(f"ghostloop replay: {flag} must be at least 1", file=sys.stderr)
            return 2
    try:
        windows = [float(part) for part in args.windows.split(",")]
    except ValueError:
        windows = []
    if not windows or windows[0] <= 0 or windows != sorted(set(windows)):
        print(
            f"ghostloop replay: --windows takes increasing positive seconds such as 1,2,3; "
            f"got {args.windows!r}",
            file=sys.stderr,
        )
        return 2
    methods = [m for m in (args.methods or "").split(",") if m]
    unknown = sorted(set(methods) - {"sft", "dpo", "rrhf"})
    if unknown or len(set(methods)) != len(methods):
        print(
            f"ghostloop replay: --methods takes distinct names among sft, dpo, rrhf; "
            f"got {args.methods!r}",
            file=sys.stderr,
        )
        return 2
    if args.backend is not None:
        if args.backend not in REPLAY_BACKENDS:
            print(
                f"ghostloop replay: --backend takes one of {', '.join(REPLAY_BACKENDS)}; "
                f"got {args.backend!r}",
                file=sys.stderr,
            )
            return 2
        backend, _, int8 = args.backend.partition("-")
        settings = dataclasses.replace(settings, backend=backend, onnx_int8=int8 == "int8")
    options = ReplayOptions(
        root=Path(args.path),
        positions=args.positions,
        train_positions=args.train_positions,
        seed=args.seed,
        methods=tuple(methods),
        ungated=args.ungated,
        windows_s=args.windows,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        database_url=args.database_url or "",
        progress=not args.no_progress,
    )
    return asyncio.run(run_replay(settings, options, as_json=args.json))


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from ghostloop.corpus import stdlib_dir

    args.path = str(stdlib_dir() / "email")
    args.ungated = True  # the demo shows what a night did; the gate's verdict is reported
    if args.backend is None:
        args.backend = _demo_backend(settings)
    return _replay(args, settings)


def _demo_backend(settings: Settings) -> str:
    """The demo serves with onnxruntime in fp32 on a CPU: the same suggestions as torch
    token for token (the same base-model figures on the demo's positions), its walks about
    twice as fast on a 2-core machine. Not the int8 copy, faster still: serving an adapter
    in int8 lost most of its lift on the demo's positions (docs/results.md). On a
    GPU, or without onnxruntime installed, what the settings say."""
    import importlib.util

    from ghostloop.models import wants_cuda

    if importlib.util.find_spec("onnxruntime") is not None and not wants_cuda(settings):
        return "onnxruntime"
    return backend_name(settings)


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.database import (
        StoreError,
        current_revision,
        head_revision,
        open_store,
        upgrade,
    )

    try:
        engine = open_store(settings)
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


def _users(args: argparse.Namespace, settings: Settings) -> int:
    """Access tokens for the team server: add prints the token once, list never does."""
    from feedback.database import StoreError, open_store, upgrade
    from feedback.tokens import TokenError, add_token, list_tokens, revoke

    try:
        engine = open_store(settings)
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


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.database import StoreError
    from ghostloop.models import ModelNotFoundError

    try:
        from trainer.nightly import run_nightly
    except ImportError as error:
        print(
            f"ghostloop train: {error.name or error} is not installed — install the training "
            "extra: pip install 'ghostloop[train]'",
            file=sys.stderr,
        )
        return 1

    try:
        # progress bars and the trainer's loss lines go to stderr; stdout is the one-line result
        with contextlib.redirect_stdout(sys.stderr):
            result = run_nightly(settings, args.method, from_scratch=args.from_scratch)
    except (StoreError, ModelNotFoundError) as error:
        print(f"ghostloop train: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ghostloop train: interrupted; nothing was published", file=sys.stderr)
        return 130
    print(result.message)
    return result.exit_code


def _inspect(args: argparse.Namespace, settings: Settings) -> int:
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
        engine = open_store(settings)
        upgrade(engine)
        return show(engine, args)
    except admin_cli.AdminInputError as error:
        print(f"ghostloop {args.command}: {error}", file=sys.stderr)
        return 2
    except (StoreError, UnknownCompletionError) as error:
        print(f"ghostloop {args.command}: {error}", file=sys.stderr)
        return 1


def _replays(args: argparse.Namespace, settings: Settings) -> int:
    """The stored replay reports under the data dir: no database needed."""
    from feedback import admin_cli, replay_report

    try:
        return admin_cli.show_replays(settings.data_dir, args)
    except (admin_cli.AdminInputError, replay_report.UnknownReplayError) as error:
        print(f"ghostloop replays: {error}", file=sys.stderr)
        return 2
    except replay_report.StoredReplayError as error:
        print(f"ghostloop replays: {error}", file=sys.stderr)
        return 1


def _admin(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.admin_web.app import serve
    from feedback.database import StoreError

    try:
        return serve(settings, host=args.host, port=args.port)
    except StoreError as error:
        print(f"ghostloop admin: {error}", file=sys.stderr)
        return 1


def _adapters(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.orm import Session

    from feedback import adapters
    from feedback.database import StoreError, open_store, upgrade

    try:
        engine = open_store(settings)
        upgrade(engine)
        if args.adapters_command == "check":
            with Session(engine) as session:
                return _check_canary(session, settings)
        with Session(engine) as session, session.begin():
            if args.adapters_command == "list":
                rows = adapters.versions(session)
                if args.json:
                    for row in rows:
                        print(json.dumps(adapters.record(row), default=str))
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
                row = adapters.promote(session, args.version)
                print(f"{row.version} is active")
            elif args.adapters_command == "canary":
                if not args.version:
                    print("ghostloop adapters canary: name a VERSION", file=sys.stderr)
                    return 2
                share = args.share if args.share is not None else settings.canary_share or 0.2
                row = adapters.start_canary(session, args.version, share)
                print(f"{row.version} is a canary for {share:.0%} of users")
            else:
                rolled, now = adapters.rollback(session)
                print(f"{rolled.version} rolled back; {now or 'the base model'} serves")
    except (StoreError, adapters.AdapterStateError) as error:
        print(f"ghostloop adapters: {error}", file=sys.stderr)
        return 1
    return 0


def _check_canary(session: Any, settings: Settings) -> int:
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
            f"canary {verdict.version}: waiting for {settings.canary_min_completions} settled "
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
    serve.add_argument(
        "--stdio", action="store_true", help="stdin/stdout (the default; for clients that pass it)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="TCP address (default: loopback)")
    serve.add_argument("--port", type=int, default=2087, help="TCP port (default: 2087)")
    serve.set_defaults(run=_serve)

    for name, text in (
        ("replay", "a simulated developer over a repository: does a night of training help?"),
        ("demo", "the replay on the standard library's email package (the README's main job)"),
    ):
        replay = commands.add_parser(name, help=text)
        if name == "replay":
            replay.add_argument("path", help="a repository (its Python files are replayed)")
        replay.add_argument("--positions", type=int, default=400, help="held-out positions")
        replay.add_argument(
            "--train-positions",
            type=int,
            default=DEMO_TRAIN_POSITIONS if name == "demo" else None,
            help="positions walked in the training half, the night's data (default: "
            + (f"{DEMO_TRAIN_POSITIONS})" if name == "demo" else "as many as --positions)"),
        )
        replay.add_argument("--seed", type=int, default=0, help="file split and positions")
        replay.add_argument(
            "--methods",
            help="training methods side by side on the same positions, e.g. sft,dpo,rrhf "
            "(default: the configured nightly method)",
        )
        replay.add_argument(
            "--ungated",
            action="store_true",
            help="replay the candidate adapter even if the gate refuses to publish it",
        )
        replay.add_argument(
            "--windows", default="1,2,3", help="survival windows in seconds (shortened)"
        )
        replay.add_argument(
            "--work-dir", help="data directory of the replay (default: <data dir>/replays/<time>)"
        )
        replay.add_argument(
            "--backend",
            help="what the servers generate with: torch, onnxruntime or onnxruntime-int8 "
            + (
                "(default: onnxruntime on a CPU, else the configured backend)"
                if name == "demo"
                else "(default: the configured backend)"
            ),
        )
        replay.add_argument("--database-url", help="store (default: SQLite in the work dir)")
        replay.add_argument("--json", action="store_true", help="print the report as JSON")
        replay.add_argument("--no-progress", action="store_true", help="no progress bars")
        replay.set_defaults(run=_replay if name == "replay" else _demo)

    db = commands.add_parser("db", help="upkeep of the feedback database")
    db.add_argument(
        "db_command",
        choices=["upgrade", "current", "purge"],
        help="apply migrations, show the revision, or delete old records",
    )
    db.add_argument("--older-than", help="with purge: an age such as 30d, 12h")
    db.set_defaults(run=_db)

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
    users.set_defaults(run=_users)

    train = commands.add_parser(
        "train", help="the nightly job: train on recorded feedback, gate, publish an adapter"
    )
    train.add_argument(
        "--method",
        choices=["sft", "dpo", "rrhf"],
        help="training method (default: GHOSTLOOP_TRAIN_METHOD, sft)",
    )
    train.add_argument(
        "--from-scratch",
        action="store_true",
        help="train on everything logged, from the base model (not since the last run, not "
        "on top of the active adapter)",
    )
    train.set_defaults(run=_train)

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
    adapters.set_defaults(run=_adapters)

    _add_inspection(commands)
    admin = commands.add_parser("admin", help="the admin web dashboard")
    admin.add_argument("admin_command", choices=["serve"], help="serve the dashboard")
    admin.add_argument("--host", default="127.0.0.1", help="address (default: loopback only)")
    admin.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    admin.set_defaults(run=_admin)

    config = commands.add_parser("config", help="print the effective settings")
    config.set_defaults(run=_config)
    return parser


def _add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="only this user's completions")
    parser.add_argument("--language", help="only this language (an LSP language id)")
    parser.add_argument("--adapter", help="only this adapter version ('base': no adapter)")
    parser.add_argument("--outcome", help="pending, shown, accepted, partial, rejected, dismissed")
    parser.add_argument("--since", help="from this time: an age (2d, 12h) or a date (2026-11-20)")
    parser.add_argument("--until", help="before this time: an age or a date")


def _add_inspection(commands: Any) -> None:
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
        parser.set_defaults(run=_inspect)
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
    replays.add_argument("--limit", type=int, default=30, help="newest N replays (default 30)")
    replays.add_argument("--json", action="store_true", help="JSON lines for scripts")
    replays.set_defaults(run=_replays)


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
