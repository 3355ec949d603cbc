"""``ghostloop config``: the effective settings."""

from __future__ import annotations

import argparse

from ghostloop.commands import Subcommands
from ghostloop.settings import Settings, settings_reference


def register(commands: Subcommands) -> None:
    config = commands.add_parser("config", help="print the effective settings")
    config.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    for env_name, default, help_text in settings_reference():
        name = env_name.removeprefix("GHOSTLOOP_").lower()
        value = settings.value(name)
        print(f"{name:20} = {value!s:40} # {help_text} (default {default})")
    return 0
