"""The ``ghostloop`` subcommands, one module each: its arguments registered next to its
handler. A handler imports its role package only when it runs, so ``ghostloop serve``
never loads the trainer and ``ghostloop --help`` loads no role at all."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ghostloop.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]
# what argparse's add_subparsers returns; its class is private
Subcommands = Any


def fail(command: str, message: str, code: int = 2) -> int:
    """Say what went wrong on stderr, as ``ghostloop COMMAND: message``; return ``code``."""
    import sys

    print(f"ghostloop {command}: {message}", file=sys.stderr)
    return code
