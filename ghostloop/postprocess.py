"""What a generated continuation becomes before a user sees it.

One line for mid-line completions; a block after a block opener or on an empty line,
ending where the code dedents past the cursor's block. Never the text that already
follows the cursor, never whitespace alone.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_OPENERS = (":", "{", "(", "[", "=>", " do", " then")


def indent_width(line: str, tab_size: int = 4) -> int:
    """Columns of leading whitespace, tabs counted as ``tab_size``."""
    width = 0
    for char in line:
        if char == " ":
            width += 1
        elif char == "\t":
            width += tab_size
        else:
            break
    return width


@dataclass(frozen=True)
class CursorContext:
    """The document around the cursor, split where the completion will be inserted."""

    prefix: str
    suffix: str
    repository: str = ""  # snippets of other files for the prompt (prompts.fit_repository)

    @property
    def line_prefix(self) -> str:
        return self.prefix[self.prefix.rfind("\n") + 1 :]

    @property
    def line_suffix(self) -> str:
        end = self.suffix.find("\n")
        return self.suffix if end < 0 else self.suffix[:end]


@dataclass(frozen=True)
class CompletionMode:
    """Whether a block may be suggested, and the indentation its body lines must keep.

    On an empty line the suggestion is that line, plus a body only if the line opens a
    block (``for ...:``); right after a block opener it is the block's body.
    """

    multiline: bool
    block_indent: int
    max_lines: int
    body_needs_opener: bool = False

    def line_ends_block(self, line: str) -> bool:
        """True for a non-blank line that is no longer inside the block being completed."""
        return bool(line.strip()) and indent_width(line) < self.block_indent


def completion_mode(context: CursorContext, max_lines: int) -> CompletionMode:
    """Single line mid-line; a block on an empty line or right after a block opener.

    With ``max_lines`` 1 every mode is a single line: what the user typed instead of a
    rejected suggestion is then read to the end of the line, not of the block.
    """
    line_prefix, line_suffix = context.line_prefix, context.line_suffix
    if line_suffix.strip() or max_lines <= 1:
        return CompletionMode(False, 0, 1)
    body_indent = indent_width(line_prefix) + 1
    if not line_prefix.strip():
        return CompletionMode(True, body_indent, max_lines, body_needs_opener=True)
    if line_prefix.rstrip().endswith(BLOCK_OPENERS):
        return CompletionMode(True, body_indent, max_lines)
    return CompletionMode(False, 0, 1)


def cut_block(text: str, mode: CompletionMode) -> tuple[str, bool]:
    """The part of ``text`` the mode allows, and whether generation can stop now."""
    lines = text.split("\n")
    if not mode.multiline or (
        mode.body_needs_opener and len(lines) > 1 and not lines[0].rstrip().endswith(BLOCK_OPENERS)
    ):
        return lines[0], len(lines) > 1
    kept: list[str] = [lines[0]]
    blank_run = 0
    for index, line in enumerate(lines[1:], start=1):
        complete = index < len(lines) - 1
        if mode.line_ends_block(line) or len(kept) >= mode.max_lines:
            return "\n".join(kept), True
        blank_run = blank_run + 1 if not line.strip() and complete else 0
        if blank_run >= 2:
            return "\n".join(kept), True
        kept.append(line)
    return "\n".join(kept), False


def drop_suffix_overlap(text: str, context: CursorContext) -> str:
    """``text`` without what already follows the cursor (closing brackets, next lines)."""
    line_rest = context.line_suffix.strip()
    if line_rest and "\n" not in text and text.rstrip().endswith(line_rest):
        return text.rstrip()[: -len(line_rest)]
    following = [line.strip() for line in context.suffix.split("\n")[1:] if line.strip()]
    if following and "\n" in text:
        lines = text.split("\n")
        for index in range(1, len(lines)):
            if lines[index].strip() and lines[index].strip() == following[0]:
                return "\n".join(lines[:index])
    return text


def finish_suggestion(text: str, context: CursorContext, mode: CompletionMode) -> str:
    """The suggestion as shown: cut to the mode, overlap dropped, trailing blanks removed."""
    block, _ = cut_block(text, mode)
    block = drop_suffix_overlap(block, context)
    lines = [line.rstrip() for line in block.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    suggestion = "\n".join(lines)
    return suggestion if suggestion.strip() else ""
