"""Real cursor positions in real code, for the demo, the benchmarks and the replay.

Positions sit where a developer would ask for help: at a line start after the indentation
and mid-line after a token, never inside comments or strings (docstrings included).
"""

from __future__ import annotations

import io
import random
import re
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CursorSample:
    """A place in a file where a completion is asked for, and the code that really follows."""

    path: Path
    line: int
    character: int
    kind: str  # "line_start" | "mid_line"
    offset: int
    true_line_rest: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    spans = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in (tokenize.COMMENT, tokenize.STRING) or token.type == getattr(
                tokenize, "FSTRING_START", -1
            ):
                spans.append((token.start, token.end))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []
    return spans


def _inside(spans: list[tuple[tuple[int, int], tuple[int, int]]], line: int, col: int) -> bool:
    return any(start <= (line, col) < end for start, end in spans)


def sample_positions(
    path: Path, count: int, seed: int, mid_line_share: float = 0.4
) -> list[CursorSample]:
    """Up to ``count`` positions in ``path``, chosen reproducibly from ``seed``."""
    source = path.read_text(encoding="utf-8")
    lines = source.split("\n")
    spans = _excluded_spans(source) if path.suffix == ".py" else []
    starts: list[tuple[int, int, int]] = []
    mids: list[tuple[int, int, int]] = []
    offset = 0
    for number, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped and not stripped.startswith("#") and not _inside(spans, number + 1, indent):
            starts.append((number, indent, offset))
            breaks = [i for i in range(indent + 1, len(line) - 1) if line[i - 1] in " .(=,["]
            breaks = [i for i in breaks if not _inside(spans, number + 1, i)]
            mids.extend((number, i, offset) for i in breaks)
        offset += len(line) + 1
    rng = random.Random(f"{seed}:{path.name}")
    n_mid = min(len(mids), round(count * mid_line_share))
    n_start = min(len(starts), count - n_mid)
    chosen = [(p, "line_start") for p in rng.sample(starts, n_start)]
    chosen += [(p, "mid_line") for p in rng.sample(mids, n_mid)]
    samples = []
    for (number, column, line_offset), kind in chosen:
        samples.append(
            CursorSample(
                path=path,
                line=number,
                character=len(lines[number][:column].encode("utf-16-le")) // 2,
                kind=kind,
                offset=line_offset + column,
                true_line_rest=lines[number][column:],
            )
        )
    return sorted(samples, key=lambda s: s.offset)


def document_at(sample: CursorSample, source: str) -> str:
    """The file as it stands while the developer is about to type the rest of the line."""
    return source[: sample.offset] + source[sample.offset + len(sample.true_line_rest) :]


_WORD_END = re.compile(r"\w+")


def typing_pauses(path: Path, first_line: int, lines: int) -> list[tuple[str, str]]:
    """A developer typing ``lines`` code lines of ``path`` from ``first_line`` (0-based) on,
    word by word: (text before the cursor, text after it) at each pause, i.e. at the line
    start after the indentation and after each word. The rest of the file follows the
    cursor, as when code is written into an existing file. Blank and comment lines are
    typed without a pause."""
    source = path.read_text(encoding="utf-8")
    all_lines = source.splitlines(keepends=True)
    head = "".join(all_lines[:first_line])
    tail = "".join(all_lines[first_line + lines :])
    pauses: list[tuple[str, str]] = []
    typed = ""
    for line in all_lines[first_line : first_line + lines]:
        body = line.rstrip("\n")
        stripped = body.lstrip()
        if stripped and not stripped.startswith("#"):
            indent = len(body) - len(stripped)
            stops = [indent] + [m.end() for m in _WORD_END.finditer(body, indent)]
            for stop in dict.fromkeys(stops):
                pauses.append((head + typed + body[:stop], "\n" + tail))
        typed += line
    return pauses
