"""The simulated developer: at each position it asks the real server for an inline
completion over LSP and reacts as someone who knows the code that follows
(``feedback.metrics.judge``): accepts an exact line, accepts a close one and edits it into
the true line, rejects the rest and types the true line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from evaluation.client import GhostloopClient
from evaluation.positions import Position
from feedback.metrics import judge
from lsp_server.positions import offset_at


@dataclass
class Pass:
    """One walk over a set of positions: which completion each position was served."""

    name: str
    served: dict[str, str | None] = field(default_factory=dict)
    reactions: dict[str, str] = field(default_factory=dict)


class Developer:
    """Asks at each position and reacts as someone who knows the code that follows."""

    def __init__(self, client: GhostloopClient, root: Path, edit_threshold: float) -> None:
        self.client = client
        self.base = root if root.is_dir() else root.parent  # a file is a repository of one
        self.edit_threshold = edit_threshold
        self._open: set[str] = set()

    async def work(self, positions: Sequence[Position], walk: Pass, bar: tqdm | None) -> None:
        for position in positions:
            walk.reactions[position.key], walk.served[position.key] = await self.one(position)
            if bar is not None:
                bar.update(1)

    async def one(self, position: Position) -> tuple[str, str | None]:
        path = self.base / position.path
        source = path.read_text(encoding="utf-8")
        uri = path.resolve().as_uri()
        if uri not in self._open:
            self.client.open(uri, source)
            self._open.add(uri)
        offset = offset_at(source, position.line, position.character)
        cut = source[:offset] + source[offset + len(position.truth) :]
        self.client.replace(uri, cut)
        got = await self.client.inline(uri, position.line, position.character)
        suggestion = got.text.split("\n", 1)[0]
        if got.completion_id is None or not suggestion.strip():
            if got.completion_id is not None:  # blank: passed over, the line typed instead
                self.client.feedback(got.completion_id, "rejected")
            self.client.replace(uri, source)
            return "empty", got.completion_id
        outcome = judge(suggestion, position.truth, self.edit_threshold)
        if outcome.reaction in ("accepted", "edited"):
            # the editor inserts the suggestion and runs its accept command; an edit then
            # turns what was inserted into the true line
            self.client.replace(uri, cut[:offset] + got.text + cut[offset:])
            await self.client.accept(got.completion_id)
        else:
            self.client.feedback(got.completion_id, "rejected")
        self.client.replace(uri, source)
        return outcome.reaction, got.completion_id
