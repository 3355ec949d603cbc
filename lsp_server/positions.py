"""LSP positions to string offsets, strictly: bad positions are errors, not guesses.

Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r``, as the LSP says, and at nothing else:
Python's ``str.splitlines`` also splits at form feeds, ``\\x1c``-``\\x1e``, NEL, U+2028 and
U+2029, which put an edit meant for one line into another. Columns are counted in the
negotiated encoding's code units. Everything here is linear in the text and runs its
per-character work in C, so a 2 MB line costs milliseconds.
"""

from __future__ import annotations

import re

from lsprotocol import types

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CODECS = {"utf-16": ("utf-16-le", 2), "utf-8": ("utf-8", 1), "utf-32": ("utf-32-le", 4)}
_SURROGATE = re.compile("[\ud800-\udfff]")


class PositionError(ValueError):
    """A position that does not name a place in the document; the message says why."""


def code_units(text: str, encoding: str) -> int:
    """Length of ``text`` as a client counts it in ``encoding`` (utf-16, utf-8 or utf-32)."""
    if text.isascii():
        return len(text)
    if encoding == "utf-16":
        return len(text.encode("utf-16-le", "surrogatepass")) // 2
    if encoding == "utf-8":
        return len(text.encode("utf-8", "surrogatepass"))
    return len(text)


def line_bounds(text: str, line: int) -> tuple[int, int]:
    """(start, end) offsets of line ``line``'s text, its line break excluded."""
    if line < 0:
        raise PositionError(f"line {line} is negative")
    start = 0
    if line:
        seen = 0
        for seen, found in enumerate(_LINE_BREAK.finditer(text), start=1):
            if seen == line:
                start = found.end()
                break
        else:
            raise PositionError(
                f"line {line} is past the end of the document, which has {seen + 1} lines"
            )
    end = _LINE_BREAK.search(text, start)
    return start, end.start() if end else len(text)


def offset_at(text: str, line: int, character: int, encoding: str = "utf-16") -> int:
    """Offset in ``text`` of an LSP position counted in ``encoding`` code units.

    A line past the end and an offset inside one character (half a surrogate pair) are
    errors; a character past the end of its line means the line end, as the spec says.
    """
    if line < 0 or character < 0:
        raise PositionError(f"position {line}:{character} is negative")
    start, end = line_bounds(text, line)
    line_text = text[start:end]
    if encoding == "utf-32" or line_text.isascii():
        return min(start + character, end)
    codec, width = _CODECS.get(encoding, _CODECS["utf-16"])
    encoded = line_text.encode(codec, "surrogatepass")
    if character * width >= len(encoded):
        return end
    try:
        before = encoded[: character * width].decode(codec, "surrogatepass")
    except UnicodeDecodeError:
        before = None
    if before is None or not text.startswith(before, start):
        where = start + len(before or "")
        char = text[where] if where < end else ""
        raise PositionError(
            f"character {character} on line {line} falls inside the character {char!r} "
            f"({encoding} code units); send a position at a character boundary"
        )
    return start + len(before)


def apply_change(
    text: str, change: types.TextDocumentContentChangeEvent, encoding: str = "utf-16"
) -> str:
    """``text`` after one ``didChange`` content change (a range edit or the whole text);
    raises PositionError for a range that is not in ``text``."""
    if not isinstance(change, types.TextDocumentContentChangePartial):
        return change.text
    first, last = change.range.start, change.range.end
    start = offset_at(text, first.line, first.character, encoding)
    end = offset_at(text, last.line, last.character, encoding)
    if end < start:
        raise PositionError(
            f"range {first.line}:{first.character}-{last.line}:{last.character} ends "
            "before it starts"
        )
    return text[:start] + change.text + text[end:]


def lone_surrogate_line(text: str) -> int | None:
    """The line (0-based) of the first lone UTF-16 surrogate in ``text``, if any: text
    that no tokenizer, database or UTF-8 file can hold."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return len(_LINE_BREAK.findall(text, 0, found.start()))
