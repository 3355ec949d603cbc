"""``ghostloop replay PATH`` and ``ghostloop demo``: the simulated developer (the
``evaluation`` package) over a repository, or over the standard library's email package."""

from __future__ import annotations

import argparse

from ghostloop.commands import Subcommands, fail
from ghostloop.settings import REPLAY_BACKENDS, Settings

# The demo's training half: 160 positions, not the held-out half's 400. The night's time
# grows with its examples and was most of the demo's time on a 2-core CPU; a night on more
# training positions saved no more typing held out (docs/results.md, "Why not +20 %").
DEMO_TRAIN_POSITIONS = 160


def register(commands: Subcommands) -> None:
    replay = commands.add_parser(
        "replay", help="a simulated developer over a repository: does a night of training help?"
    )
    replay.add_argument("path", help="a repository (its Python files are replayed)")
    replay.add_argument(
        "--train-positions",
        type=int,
        help="positions walked in the training half, the night's data (default: as many as "
        "--positions)",
    )
    replay.add_argument(
        "--backend",
        help="what the servers generate with: torch, onnxruntime or onnxruntime-int8 "
        "(default: what ghostloop serve uses)",
    )
    _walk_options(replay)
    replay.set_defaults(run=run_replay)

    demo = commands.add_parser(
        "demo", help="the replay on the standard library's email package (the README's main job)"
    )
    demo.add_argument(
        "--train-positions",
        type=int,
        default=DEMO_TRAIN_POSITIONS,
        help=f"positions walked in the training half, the night's data (default: "
        f"{DEMO_TRAIN_POSITIONS})",
    )
    demo.add_argument(
        "--backend",
        help="what the servers generate with: torch, onnxruntime or onnxruntime-int8 "
        "(default: what ghostloop serve uses)",
    )
    _walk_options(demo)
    demo.set_defaults(run=run_demo)


def _walk_options(parser: argparse.ArgumentParser) -> None:
    """The options replay and demo share."""
    parser.add_argument("--positions", type=int, default=400, help="held-out positions")
    parser.add_argument("--seed", type=int, default=0, help="file split and positions")
    parser.add_argument(
        "--methods",
        help="training methods side by side on the same positions, e.g. sft,dpo,rrhf "
        "(default: the configured nightly method)",
    )
    parser.add_argument(
        "--ungated",
        action="store_true",
        help="replay the candidate adapter even if the gate refuses to publish it",
    )
    parser.add_argument(
        "--windows", default="1,2,3", help="survival windows in seconds (shortened)"
    )
    parser.add_argument(
        "--work-dir", help="data directory of the replay (default: <data dir>/replays/<time>)"
    )
    parser.add_argument("--database-url", help="store (default: SQLite in the work dir)")
    parser.add_argument(
        "--also-on",
        metavar="BACKEND",
        help="walk the held-out half after each night again on BACKEND (torch, onnxruntime "
        "or onnxruntime-int8): the paired lift of the served backend against it, e.g. int8 "
        "against fp32 with the same adapter",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_replay(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    from pathlib import Path

    from evaluation.replay import ReplayOptions, run_replay
    from ghostloop.models import with_backend

    for flag, value in (
        ("--positions", args.positions),
        ("--train-positions", args.train_positions),
    ):
        if value is not None and value < 1:
            return fail("replay", f"{flag} must be at least 1")
    try:
        windows = [float(part) for part in args.windows.split(",")]
    except ValueError:
        windows = []
    if not windows or windows[0] <= 0 or windows != sorted(set(windows)):
        return fail(
            "replay",
            f"--windows takes increasing positive seconds such as 1,2,3; got {args.windows!r}",
        )
    methods = [m for m in (args.methods or "").split(",") if m]
    unknown = sorted(set(methods) - {"sft", "dpo", "rrhf"})
    if unknown or len(set(methods)) != len(methods):
        return fail(
            "replay",
            f"--methods takes distinct names among sft, dpo, rrhf; got {args.methods!r}",
        )
    for flag, value in (("--backend", args.backend), ("--also-on", args.also_on)):
        if value is not None and value not in REPLAY_BACKENDS:
            return fail(
                "replay", f"{flag} takes one of {', '.join(REPLAY_BACKENDS)}; got {value!r}"
            )
    if args.backend is not None:
        settings = with_backend(settings, args.backend)
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
        also_on=args.also_on,
    )
    return asyncio.run(run_replay(settings, options, as_json=args.json))


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from ghostloop.corpus import stdlib_dir

    args.path = str(stdlib_dir() / "email")
    args.ungated = True  # the demo shows what a night did; the gate's verdict is reported
    return run_replay(args, settings)
