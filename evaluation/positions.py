"""Where the simulated developer types: the repository's files, split into a training half
and a held-out half, and the cursors sampled in them with the code that really follows."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ghostloop.corpus import sample_positions

SKIPPED_DIRS = {".git", ".hg", ".venv", "venv", "node_modules", "__pycache__", "build", "dist"}


class ReplayError(RuntimeError):
    """The replay cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Position:
    """A cursor of the replay and the code that really follows it (never stored)."""

    key: str  # "relative/path.py:line:character"
    path: str
    line: int
    character: int
    kind: str  # "line_start" | "mid_line"
    truth: str  # the true rest of the line


def source_files(root: Path) -> list[Path]:
    """The Python files under ``root`` (a file counts as a repository of one), sorted."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ReplayError(f"{root} is neither a directory nor a file: give a repository path")
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & SKIPPED_DIRS or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            files.append(path)
    return files


def split_files(files: Sequence[Path], root: Path, seed: int) -> tuple[list[Path], list[Path]]:
    """Training half and held-out half, by a seeded hash of each relative path."""
    if len(files) < 2:
        raise ReplayError(
            f"{root} has {len(files)} Python file(s); the replay splits files into a training "
            "and a held-out half, so it needs at least two"
        )

    def rank(path: Path) -> str:
        relative = path.relative_to(root) if path != root else Path(path.name)
        return hashlib.sha256(f"{seed}:{relative.as_posix()}".encode()).hexdigest()

    ordered = sorted(files, key=rank)
    middle = len(ordered) // 2
    return sorted(ordered[:middle]), sorted(ordered[middle:])


def choose_positions(files: Sequence[Path], root: Path, count: int, seed: int) -> list[Position]:
    """``count`` positions over ``files``, at most one per line (a line is typed once)."""
    pool: list[Position] = []
    per_file = max(4, -(-count * 3 // max(1, len(files))))
    rng = random.Random(seed)
    for path in files:
        seen: set[int] = set()
        relative = path.relative_to(root).as_posix() if path != root else path.name
        samples = sample_positions(path, per_file, seed=seed)
        rng.shuffle(samples)  # which of a line's positions stays is left to chance, not order
        for sample in samples:
            if sample.line in seen or not sample.true_line_rest.strip():
                continue
            seen.add(sample.line)
            pool.append(
                Position(
                    key=f"{relative}:{sample.line}:{sample.character}",
                    path=relative,
                    line=sample.line,
                    character=sample.character,
                    kind=sample.kind,
                    truth=sample.true_line_rest,
                )
            )
    chosen = rng.sample(pool, min(count, len(pool)))
    return sorted(chosen, key=lambda p: (p.path, p.line))


def position_rows(positions: Sequence[Position]) -> list[dict[str, Any]]:
    return [asdict(p) for p in positions]
