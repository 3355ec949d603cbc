"""How much of a suggestion survives: regions followed through edits, checked later.

After an accept, the inserted region is followed through every edit, and at each window
(30 s, 2 min, 10 min by default) the share of it that still stands is measured by edit
distance, as Copilot's "still in code". Text typed at the region's edges is not part of it
(it saved nothing), so at the window nearest two minutes the line as it was written there
is recorded too (``written``): the suggestion's start to the end of its last line, what
the developer finished where a suggestion stopped short. After a rejection, what the user
typed at that spot instead is captured once. Everything here is plain functions on text
and offsets.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from feedback.metrics import nearer_kept_window, survival_ratio


def changed_span(old: str, new: str) -> tuple[int, int, int]:
    """(start, old end, new length) of the one span where ``old`` and ``new`` differ.

    Works for incremental and full-document changes alike; slicing compares in C.
    """
    limit = min(len(old), len(new))
    low, high = 0, limit
    while low < high:  # longest common prefix, by bisection
        middle = (low + high + 1) // 2
        if old[:middle] == new[:middle]:
            low = middle
        else:
            high = middle - 1
    prefix = low
    low, high = 0, limit - prefix
    while low < high:  # longest common suffix not overlapping the prefix
        middle = (low + high + 1) // 2
        if old[len(old) - middle :] == new[len(new) - middle :]:
            low = middle
        else:
            high = middle - 1
    suffix = low
    return prefix, len(old) - suffix, len(new) - suffix - prefix


@dataclass
class Region:
    """A span of a document that belongs to one completion, in current offsets."""

    completion_id: str
    start: int
    end: int

    def apply(self, start: int, old_end: int, new_length: int) -> None:
        """Follow one edit that replaced ``[start, old_end)`` by ``new_length`` characters."""
        delta = new_length - (old_end - start)
        # Text inserted at the edge of an accepted region is not part of it; text inserted
        # at an empty region (a rejected suggestion's spot) is what the user typed there.
        empty = self.start == self.end
        if old_end < self.start or (old_end == self.start and not (empty and start == old_end)):
            self.start += delta
            self.end += delta
        elif start > self.end or (start == self.end and not empty):
            return
        else:  # the edit touches the region: it now spans whatever replaced its text
            self.end = self.end + delta if old_end <= self.end else start + new_length
            self.start = min(self.start, start)
            self.end = max(self.end, self.start)


def typed_instead(text: str, start: int, multiline: bool, max_lines: int = 8) -> str:
    """What stands at ``start`` now: to the end of the line, or of the block."""
    line_end = text.find("\n", start)
    if not multiline or line_end < 0:
        return text[start : len(text) if line_end < 0 else line_end]
    line_start = text.rfind("\n", 0, start) + 1
    indent = len(text[line_start:start]) - len(text[line_start:start].lstrip())
    lines = [text[start:line_end]]
    for line in text[line_end + 1 :].split("\n")[: max_lines - 1]:
        if not line.strip() or len(line) - len(line.lstrip()) <= indent:
            break
        lines.append(line)
    return "\n".join(lines)


def written(text: str, start: int, end: int) -> str:
    """What stands from ``start`` to the end of the line ``end`` is on: an accepted region
    with what was typed after it on its last line. A region that ends a line is itself."""
    if end > start and text[end - 1] == "\n":
        return text[start:end]
    return text[start:end] + typed_instead(text, end, multiline=False)


Schedule = Callable[[float, Callable[[], None]], object]
# record(completion_id, kind, window_s=, survival_ratio=, text=, final=): final says the
# check was made when the session or document ended, at whatever time it had reached
Record = Callable[..., None]


@dataclass
class _Tracked:
    uri: str
    region: Region
    multiline: bool
    inserted: str = ""
    accepted_at: float | None = None  # clock time of the accept
    rejected_at: float | None = None  # clock time of the reject or dismissal


class SurvivalTracker:
    """Follows each served suggestion's spot through edits until its fate is measured.

    A served suggestion is an empty region at the cursor; the client's insertion of an
    accepted one fills it (whichever of the insertion and the accept arrives first).
    """

    def __init__(
        self,
        windows_s: tuple[float, ...],
        schedule: Schedule,
        record: Record,
        capacity: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.windows_s = windows_s
        self._schedule = schedule
        self._record = record
        self._clock = clock
        self._capacity = capacity
        self._texts: dict[str, str] = {}
        # the one window whose check also records the line as written (labels use it)
        self._written_window: float | None = None
        for window in windows_s:
            if nearer_kept_window(window, self._written_window):
                self._written_window = window
        self._tracked: OrderedDict[str, _Tracked] = OrderedDict()

    def served(self, uri: str, completion_id: str, text: str, offset: int, multiline: bool) -> None:
        """Track a suggestion made for ``text`` (the document when it was asked for)."""
        region = Region(completion_id, offset, offset)
        current = self._texts.setdefault(uri, text)
        if current != text:  # the document moved on while the suggestion was generated
            region.apply(*changed_span(text, current))
        self._tracked[completion_id] = _Tracked(uri, region, multiline)
        while len(self._tracked) > self._capacity:
            self._forget(next(iter(self._tracked)))

    def changed(self, uri: str, text: str) -> None:
        old = self._texts.get(uri)
        if old is None or old == text:
            return
        span = changed_span(old, text)
        for tracked in self._tracked.values():
            if tracked.uri == uri:
                tracked.region.apply(*span)
        self._texts[uri] = text

    def closed(self, uri: str) -> None:
        """The document closed: its suggestions are measured once more (``final``)."""
        self.final(uri)

    def final(self, uri: str | None = None) -> None:
        """The session ends (or ``uri`` closes) before every window has come: each accepted
        suggestion's survival, and what was typed where one was rejected, is measured
        once more from the last text there is, recorded at the time it reached
        (``window_s``: seconds since the accept or reject), and its later checks dropped.
        Without this the last minutes of every session never reached the store."""
        now = self._clock()
        for completion_id, tracked in list(self._tracked.items()):
            if uri is not None and tracked.uri != uri:
                continue
            if tracked.accepted_at is not None:
                window = round(max(0.0, now - tracked.accepted_at), 1)
                self._measure_survival(completion_id, tracked, window, with_line=True, final=True)
            elif tracked.rejected_at is not None:
                window = round(max(0.0, now - tracked.rejected_at), 1)
                self._measure_typed(completion_id, tracked, window, final=True)
            self._forget(completion_id)

    def accepted(self, completion_id: str, inserted: str) -> None:
        tracked = self._tracked.get(completion_id)
        if tracked is None:
            return
        tracked.inserted = inserted
        tracked.accepted_at = self._clock()
        for window in self.windows_s:
            self._schedule(window, functools.partial(self._check_survival, completion_id, window))

    def rejected(self, completion_id: str) -> None:
        tracked = self._tracked.get(completion_id)
        if tracked is not None:
            tracked.rejected_at = self._clock()
            first = self.windows_s[0]
            self._schedule(first, functools.partial(self._check_typed, completion_id, first))

    def _region_text(self, tracked: _Tracked) -> str:
        return self._texts.get(tracked.uri, "")[tracked.region.start : tracked.region.end]

    def _check_survival(self, completion_id: str, window_s: float) -> None:
        tracked = self._tracked.get(completion_id)
        if tracked is None:
            return
        with_line = window_s == self._written_window
        self._measure_survival(completion_id, tracked, window_s, with_line=with_line, final=False)
        if window_s == self.windows_s[-1]:
            self._forget(completion_id)

    def _measure_survival(
        self,
        completion_id: str,
        tracked: _Tracked,
        window_s: float,
        *,
        with_line: bool,
        final: bool,
    ) -> None:
        """Record what of the accepted text stands now (and ``with_line``, the line as
        written there, which the labels read beside the check nearest two minutes)."""
        now = self._region_text(tracked)
        if with_line:
            region = tracked.region
            line = written(self._texts.get(tracked.uri, ""), region.start, region.end)
            self._record(completion_id, "written", window_s=window_s, text=line, final=final)
        self._record(
            completion_id,
            "survival",
            window_s=window_s,
            survival_ratio=round(survival_ratio(tracked.inserted, now), 4),
            text=now,
            final=final,
        )

    def _check_typed(self, completion_id: str, window_s: float) -> None:
        tracked = self._tracked.get(completion_id)
        if tracked is None:
            return
        self._measure_typed(completion_id, tracked, window_s, final=False)
        self._forget(completion_id)

    def _measure_typed(
        self, completion_id: str, tracked: _Tracked, window_s: float, *, final: bool
    ) -> None:
        text = self._texts.get(tracked.uri, "")
        typed = typed_instead(text, tracked.region.start, tracked.multiline)
        self._record(completion_id, "typed_instead", window_s=window_s, text=typed, final=final)

    def _forget(self, completion_id: str) -> None:
        tracked = self._tracked.pop(completion_id, None)
        if tracked is not None and not any(t.uri == tracked.uri for t in self._tracked.values()):
            self._texts.pop(tracked.uri, None)
