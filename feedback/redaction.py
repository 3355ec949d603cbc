"""Secrets out of stored code: stored prompts and suggestions are private data.

Each rule replaces what it finds with ``<redacted:KIND>``; the caller stores the count.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "private_key",
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)",
            re.S,
        ),
    ),
    ("aws_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_\w{60,})\b")),
    ("gitlab_token", re.compile(r"\bglpat-[A-Za-z0-9_\-]{20,}\b")),
    ("slack_token", re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}\b")),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b")),
    ("openai_key", re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_\-]{20,}\b")),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\b")),
    ("url_password", re.compile(r"(?<=://)[^\s:/@]+:[^\s@/]+(?=@)")),
)
# password = "...", API_TOKEN: '...', secret_key="..." (the value only is replaced). The name
# is matched as a whole run of name characters (possessively, from its first one) and the
# rest looked ahead at: the secret words are checked in the name afterwards. One pattern
# with the words inside it backtracked over every position of a long run, quadratic to
# cubic in the run (8,000 characters took seconds on the event loop).
_ASSIGNMENT = re.compile(
    r"""(?x)
    (?<![\w.-])(?P<name>[\w.-]++)
    (?=(?P<sep>\s*[:=]\s*)(?P<quote>["'])(?P<value>[^"'\n]{4,})(?P=quote))
    """
)
_SECRET_NAME = re.compile(r"password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth", re.I)
_CANDIDATE = re.compile(r"[A-Za-z0-9+/=_\-]{32,}")
ENTROPY_BITS_PER_CHAR = 4.0
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def shannon_entropy(text: str) -> float:
    """Bits per character; random keys score high, words and identifiers low."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _looks_random(token: str) -> bool:
    has_digit = any(c.isdigit() for c in token)
    has_letter = any(c.isalpha() for c in token)
    return has_digit and has_letter and shannon_entropy(token) >= ENTROPY_BITS_PER_CHAR


@dataclass(frozen=True)
class Redacted:
    """Text fit to store, and how many secrets were taken out of it."""

    text: str
    count: int


def _redact_assignments(text: str, mark: Callable[[str], str]) -> str:
    """``text`` with the value of each secret-looking assignment replaced by a marker
    (already redacted values stay as they are); matches do not overlap, as with re.sub."""
    pieces: list[str] = []
    copied = resume = 0
    for found in _ASSIGNMENT.finditer(text):
        if found.start() < resume or not _SECRET_NAME.search(found["name"]):
            continue
        start, end = found.span("value")
        resume = end + 1  # after the closing quote, where re.sub would go on
        if not found["value"].startswith("<redacted:"):
            pieces += [text[copied:start], mark("assignment")]
            copied = end
    return "".join(pieces) + text[copied:]


def redact(text: str) -> Redacted:
    """``text`` with private keys, cloud and VCS tokens, password assignments and
    high-entropy strings replaced by markers, and lone UTF-16 surrogates (which no UTF-8
    database column can hold) by U+FFFD."""
    text = _LONE_SURROGATE.sub("\ufffd", text)
    count = 0

    def mark(kind: str) -> str:
        nonlocal count
        count += 1
        return f"<redacted:{kind}>"

    for kind, pattern in _RULES:
        text = pattern.sub(lambda _m, k=kind: mark(k), text)  # type: ignore[misc]
    text = _redact_assignments(text, mark)
    text = _CANDIDATE.sub(lambda m: mark("high_entropy") if _looks_random(m[0]) else m[0], text)
    return Redacted(text, count)
