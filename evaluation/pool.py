"""``ghostloop replays pool NAME NAME ...``: several stored replays' held-out positions
pooled, the lift of a recipe over other splits of a repository (``ghostloop replay
--seed``) or over other repositories, not one split's luck."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from evaluation.scoring import COMPARISONS, stored_scores
from evaluation.statistics import pooled
from feedback.replays import format_table, methods_of, stored_report


class PoolInputError(ValueError):
    """The command line does not name two or more replays."""


def show_pooled(
    data_dir: Path,
    names: Sequence[str],
    method: str | None,
    as_json: bool,
    compare: str = "night",
) -> int:
    """Print the pooled figures (a table, or one JSON line) of the two walks ``compare``
    pairs (``evaluation.scoring.COMPARISONS``). StoredReplayError for a replay that is
    unknown or cannot be read back."""
    if compare not in COMPARISONS:
        raise PoolInputError(
            f"--compare {compare!r} is not one of {', '.join(COMPARISONS)}: pick which two "
            "walks of each replay to pair"
        )
    names = list(dict.fromkeys(names))
    if len(names) < 2:
        raise PoolInputError("name two or more replays: ghostloop replays pool NAME NAME ...")
    parts, methods = [], set()
    for name in names:
        report = stored_report(data_dir, name)
        parts.append(stored_scores(name, report, method, compare))
        methods.add(method or next(iter(methods_of(report))))
    result = pooled(parts)
    if as_json:
        summary = {"replays": names, "methods": sorted(methods), "compare": compare}
        sys.stdout.write(json.dumps({**summary, **result}) + "\n")
        return 0
    count = sum(len(part[0]) for part in parts)
    first, second = COMPARISONS[compare]
    print(
        f"pooled: {len(names)} replays, {count} held-out positions: {', '.join(names)}; "
        f"{first.replace('_', ' ')} against {second.replace('_', ' ')}\n"
    )
    chosen = " / ".join(sorted(methods))
    print(format_table({**result, "method": chosen, "adapter": "a night each"}))
    return 0
