"""LSP positions to string offsets, strictly: bad positions are errors, not guesses."""

from __future__ import annotations


class PositionError(ValueError):
    """A position that does not name a place in the document; the message says why."""


def code_units(text: str, encoding: str) -> int:
    """Length of ``text`` as a client counts it in ``encoding`` (utf-16, utf-8 or utf-32)."""
    if encoding == "utf-16":
        return len(text) + sum(ord(char) > 0xFFFF for char in text)
    if encoding == "utf-8":
        return len(text.encode("utf-8", "surrogatepass"))
    return len(text)


def offset_at(text: str, line: int, character: int, encoding: str = "utf-16") -> int:
    """Offset in ``text`` of an LSP position counted in ``encoding`` code units.

    A line past the end and an offset inside one character (half a surrogate pair) are
    errors; a character past the end of its line means the line end, as the spec says.
    """
    if line < 0 or character < 0:
        raise PositionError(f"position {line}:{character} is negative")
    start = 0
    for seen in range(line):
        newline = text.find("\n", start)
        if newline < 0:
            raise PositionError(
                f"line {line} is past the end of the document, which has {seen + 1} lines"
            )
        start = newline + 1
    end = text.find("\n", start)
    end = len(text) if end < 0 else end
    if end > start and text[end - 1] == "\r":
        end -= 1
    units = 0
    for index in range(start, end):
        if units >= character:
            return index
        width = code_units(text[index], encoding)
        units += width
        if units > character:
            raise PositionError(
                f"character {character} on line {line} falls inside the character "
                f"{text[index]!r} ({encoding} code units {units - width}..{units}); "
                "send a position at a character boundary"
            )
    return end
