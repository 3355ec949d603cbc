"""``ghostloop train``: the nightly job (``trainer.nightly``)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from ghostloop.commands import Subcommands
from ghostloop.settings import Settings


def register(commands: Subcommands) -> None:
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
    train.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
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
