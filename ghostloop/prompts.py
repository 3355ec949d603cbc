"""Prompts as the model sees them: FIM templates, the context budget and token healing.

The server and the trainer build prompts with these functions so that training sees
exactly what serving sends (docs/architecture.md, "Token healing": a prompt cut
differently broke every fine-tune).
"""

from __future__ import annotations

import bisect
import functools
import math
import re
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Protocol


class TextTokenizer(Protocol):
    """The two things prompt building needs from a tokenizer."""

    def encode_text(self, text: str) -> list[int]: ...

    def decode_ids(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class PromptTemplate:
    """How one model family lays out prefix and suffix, and which tokens end its answer."""

    name: str
    prefix_marker: str = ""
    suffix_marker: str = ""
    middle_marker: str = ""
    stop_tokens: tuple[str, ...] = ()

    @property
    def fim(self) -> bool:
        return bool(self.middle_marker)

    def render(self, prefix: str, suffix: str) -> str:
        """The prompt as text, for logs and records (token ids are built piecewise)."""
        if not self.fim:
            return prefix
        return f"{self.prefix_marker}{prefix}{self.suffix_marker}{suffix}{self.middle_marker}"


TEMPLATES: dict[str, PromptTemplate] = {
    "qwen2.5-coder": PromptTemplate(
        "qwen2.5-coder",
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|im_end|>"),
    ),
    "starcoder2": PromptTemplate(
        "starcoder2",
        "<fim_prefix>",
        "<fim_suffix>",
        "<fim_middle>",
        ("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_pad>"),
    ),
    "deepseek-coder": PromptTemplate(
        "deepseek-coder",
        "<｜fim▁begin｜>",
        "<｜fim▁hole｜>",
        "<｜fim▁end｜>",
        ("<|EOT|>", "<｜end▁of▁sentence｜>"),
    ),
    # CodeLlama's markers carry spaces around them, as in Meta's reference code.
    "codellama": PromptTemplate("codellama", "<PRE> ", " <SUF>", " <MID>", ("<EOT>", "</s>")),
    "prefix-only": PromptTemplate("prefix-only", stop_tokens=("<|endoftext|>", "<|im_end|>")),
}


def detect_template(vocabulary: Container[str]) -> PromptTemplate:
    """The FIM template whose special tokens the tokenizer has; prefix-only otherwise."""
    for template in TEMPLATES.values():
        markers = (template.prefix_marker, template.suffix_marker, template.middle_marker)
        if template.fim and all(m.strip() in vocabulary for m in markers):
            return template
    return TEMPLATES["prefix-only"]


class TokenPrefixIndex:
    """Finds every token whose text starts with a given string (token healing's constraint)."""

    def __init__(self, token_texts: Sequence[str], excluded: Container[int]) -> None:
        pairs = sorted(
            (text, token_id)
            for token_id, text in enumerate(token_texts)
            if text and token_id not in excluded
        )
        self._texts = [text for text, _ in pairs]
        self._ids = [token_id for _, token_id in pairs]
        self._exact: dict[str, list[int]] = {}
        for text, token_id in pairs:
            self._exact.setdefault(text, []).append(token_id)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one index per loaded model, lives as long
    def starting_with(self, head: str) -> tuple[int, ...]:
        low = bisect.bisect_left(self._texts, head)
        high = bisect.bisect_left(self._texts, head + "\U0010ffff")
        return tuple(self._ids[low:high])

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - as above
    def healing(self, rest: str) -> tuple[int, ...]:
        """The tokens that can come next while ``rest`` of the healed text is still to be
        written: those that cover it and go on, and those that are a part of its start."""
        parts = [i for end in range(1, len(rest)) for i in self._exact.get(rest[:end], ())]
        return tuple(parts) + self.starting_with(rest)

    def while_healing(self, healed: str, written: str) -> tuple[int, ...] | None:
        """The tokens that may come next when ``written`` has been generated of the healed
        text ``healed``; None once it is all written (or left behind): any token then."""
        if len(written) >= len(healed) or not healed.startswith(written):
            return None
        return self.healing(healed[len(written) :])


@dataclass(frozen=True)
class Snippet:
    """A few lines of the developer's repository: where they are and what they say."""

    path: str  # relative to the workspace root (or the document's URI)
    line: int  # its first line, from 0
    text: str


# Comment markers by LSP language id; any other language gets "//".
_HASH_COMMENTS = frozenset(
    [
        "python",
        "shellscript",
        "ruby",
        "perl",
        "r",
        "yaml",
        "toml",
        "dockerfile",
        "makefile",
        "elixir",
        "julia",
        "nim",
        "coffeescript",
        "powershell",
        "cmake",
        "properties",
    ]
)
_DASH_COMMENTS = frozenset(["lua", "sql", "haskell", "ada", "elm"])


def comment_marker(language: str) -> str:
    if language in _HASH_COMMENTS:
        return "#"
    if language in _DASH_COMMENTS:
        return "--"
    return "//"


def render_snippets(snippets: Sequence[Snippet], language: str) -> list[str]:
    """Each snippet as comment lines under its path (Tabby's and Continue's layout, which
    any model reads as code it has seen): ``# Path: pkg/file.py`` then the code
    commented out, one block per snippet, each ending with a newline."""
    marker = comment_marker(language)
    blocks = []
    for snippet in snippets:
        lines = [f"{marker} Path: {snippet.path}"]
        lines += [f"{marker} {line}".rstrip() for line in snippet.text.split("\n")]
        blocks.append("\n".join(lines) + "\n")
    return blocks


def fit_repository(tokenizer: TextTokenizer, blocks: Sequence[str], budget: int) -> str:
    """The repository part of a prompt: the first of ``blocks`` (best first) that fit
    ``budget`` tokens together, the best last, nearest the file's own text."""
    if budget <= 0:
        return ""
    kept: list[str] = []
    used = 0
    for block in blocks:
        cost = len(tokenizer.encode_text(block))
        if used + cost > budget:
            continue
        kept.append(block)
        used += cost
    return "".join(reversed(kept))


def repository_part(
    tokenizer: TextTokenizer, snippets: Sequence[Snippet], language: str, budget: int
) -> str:
    """``snippets`` (best first) as the prompt's repository part, as the server sends it:
    in ``language``'s comments, fitted to ``budget`` tokens."""
    return fit_repository(tokenizer, render_snippets(snippets, language), budget)


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the model, and the pieces of the document it was made from."""

    input_ids: tuple[int, ...]
    prefix: str
    suffix: str
    healed: str
    template: str
    repository: str = ""  # the snippets of the repository before the prefix, as sent

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


_INDENT_AT_END = re.compile(r"\n[ \t]+\Z")
# A partial identifier at the end (with the one space this tokenizer family puts in its
# first token): healing backs off to its start, so the model writes the whole name in its
# own tokenization and can copy one it reads in the context (docs/architecture.md, "Token
# healing"). ASCII only: a token of a multi-byte character decodes to a part of it.
_PARTIAL_NAME = re.compile(r" ?[A-Za-z0-9_]+\Z")
MAX_HEALED_CHARS = 40  # a longer name is backed off by one token, as any other text
_COLUMN_ZERO_PROBE = "x"  # any first character of a line: only the boundary before it counts


def trim_prefix(tokenizer: TextTokenizer, prefix: str, budget: int) -> str:
    """The nearest part of ``prefix`` that fits ``budget`` tokens, starting at a line start.

    The start is the first line start after a multiple of ``budget`` characters, the
    smallest multiple that fits: while the user types at the end, the start stays where it
    was (and with it the KV cache the server keeps for the document) until the text no
    longer fits, then moves on by about a quarter of the window at once, instead of by a
    line every few keystrokes.

    Candidates are tried from a guess (the tokens per character of the longest window)
    and walked back to the first that fits: two or three tokenizations of a window instead
    of one per candidate (about 10 ms of every completion on SmolLM2's 512 tokens). Same
    result, as long as a later start never needs more tokens than an earlier one.
    """
    if budget <= 0:
        return ""
    step = max(32, budget)  # characters; a token is about 3-4 characters of code
    first = max(0, len(prefix) - budget * 8)
    first -= first % step

    def window(index: int) -> str:
        start = first + index * step
        if start <= 0:
            return prefix
        newline = prefix.find("\n", start - 1)
        return prefix[newline + 1 if newline >= 0 else start :]

    widest = window(0)
    count = len(tokenizer.encode_text(widest)) if widest else 0
    if count <= budget:
        return widest
    fitting = {0: False}

    def fits(index: int) -> bool:
        if index not in fitting:
            text = window(index)
            fitting[index] = not text or len(tokenizer.encode_text(text)) <= budget
        return fitting[index]

    target = len(prefix) - len(widest) * budget / count  # the start the density suggests
    index = max(1, math.ceil((target - first) / step))
    while not fits(index):
        index += 1
    while index > 1 and fits(index - 1):
        index -= 1
    return window(index)


def trim_suffix(tokenizer: TextTokenizer, suffix: str, budget: int) -> str:
    """The nearest part of ``suffix`` that fits ``budget`` tokens, ending at a line end."""
    if budget <= 0:
        return ""
    window = suffix[: budget * 8]
    while window and len(tokenizer.encode_text(window)) > budget:
        keep = len(window) - (len(window) // 4 or 1)
        cut = window.rfind("\n", 0, keep)
        window = window[: cut + 1] if cut >= 0 else window[:keep]
    return window


def heal_prefix(tokenizer: TextTokenizer, prefix: str) -> tuple[list[int], str]:
    """Token ids for ``prefix`` minus its last partial token (or the partial name it ends
    in), and the text taken off.

    The model then generates from a token boundary it saw in training, and what it
    generates must first write the removed text again. After indentation the removed text
    is one space: this tokenizer family merges a newline with the indentation that follows
    and gives the next word its own leading space (docs/architecture.md, "Token healing").
    """
    if _INDENT_AT_END.search(prefix):
        return tokenizer.encode_text(prefix[:-1]), prefix[-1]
    if prefix.endswith("\n"):
        # At column 0 the tokens a document has before the line's first character: this
        # family splits "\n\ndef" into "\n", "\n", "def", while "\n\n" at the end of
        # a text is one token that documents only follow with another newline; healing
        # with it made the model write a blank line and suggest nothing at every
        # top-level line start after a blank line.
        probe = tokenizer.encode_text(prefix + _COLUMN_ZERO_PROBE)
        for count in range(len(probe) - 1, max(len(probe) - 4, 0), -1):
            if tokenizer.decode_ids(probe[:count]) == prefix:
                return probe[:count], ""
    ids = tokenizer.encode_text(prefix)
    if not ids:
        return ids, ""
    head = tokenizer.decode_ids(ids[:-1])
    if not prefix.startswith(head) or head == prefix:
        return ids, ""
    name = _PARTIAL_NAME.search(prefix)
    if name is not None and name.start() < len(head) and len(name.group()) <= MAX_HEALED_CHARS:
        return tokenizer.encode_text(prefix[: name.start()]), name.group()
    return ids[:-1], prefix[len(head) :]


def build_prompt(
    tokenizer: TextTokenizer,
    template: PromptTemplate,
    prefix: str,
    suffix: str,
    *,
    context_tokens: int,
    suffix_share: float,
    marker_ids: dict[str, list[int]],
    repository: str = "",
) -> Prompt:
    """Token ids for the model: the nearest prefix and suffix within the budget, healed,
    after ``repository`` (snippets of other files, already fitted to their own budget)."""
    suffix_budget = int(context_tokens * suffix_share) if template.fim else 0
    kept_suffix = trim_suffix(tokenizer, suffix, suffix_budget) if template.fim else ""
    used_suffix = len(tokenizer.encode_text(kept_suffix)) if kept_suffix else 0
    kept_prefix = trim_prefix(tokenizer, prefix, context_tokens - used_suffix)
    prefix_ids, healed = heal_prefix(tokenizer, kept_prefix)
    # encoded on its own: the file's tokens are the same with and without it
    repository_ids = tokenizer.encode_text(repository) if repository else []
    if not template.fim:
        ids = repository_ids + prefix_ids
    else:
        ids = (
            marker_ids[template.prefix_marker]
            + repository_ids
            + prefix_ids
            + marker_ids[template.suffix_marker]
            + tokenizer.encode_text(kept_suffix)
            + marker_ids[template.middle_marker]
        )
    return Prompt(tuple(ids), kept_prefix, kept_suffix, healed, template.name, repository)
