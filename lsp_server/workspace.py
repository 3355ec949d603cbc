"""The developer's repository as snippets a prompt can hold.

Sources: the workspace's files on disk under the root the client sent at ``initialize``
(``.gitignore`` respected, binary, unreadable and out-of-root files skipped, capped in
files, bytes per file and bytes in all), and the open documents, whose editor text
replaces their file's. Each is cut into chunks of ``context_chunk_lines`` lines (every
half chunk a new one starts, so a passage is whole in one of them) and kept in a lexical
index: SQLite's FTS5 with its bm25 ranking, from the standard library, in memory.

The disk is read by a background thread, and the open documents' changes are indexed
there too, at most every ``REINDEX_S``: nothing here runs on a completion's path but the
query. A completion asks with the lines before the cursor line (RepoCoder's sliding
window): the query, and with it the snippets, stay the same while the developer types on
one line, so the query runs once per line (a large index's takes a good part of a
keystroke's budget) and the prompt's start, with its KV cache, stays the same. The
current document is never searched: its nearby text is the prompt's own, and what
follows the cursor must not reach the prompt from the index (the replay's rule: the rest
of the line is nowhere the retrieval can see).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pathspec

from ghostloop.prompts import Snippet
from ghostloop.settings import ContextSettings

log = logging.getLogger(__name__)

REINDEX_S = 1.0  # an open document's edits reach the index at most this late
QUERY_LINES = 10  # lines before the cursor line that make the query
MAX_ANSWERS = 256  # documents whose last snippets are kept for the next keystroke
MAX_TERMS = 24  # words of the query, the rarest-looking (longest) first
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
_BINARY_PROBE = 8192  # a NUL byte in the first bytes: a binary file


def path_of(uri: str) -> Path | None:
    """The local path of a ``file:`` URI, None for any other."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.path))


class ChunkIndex:
    """Chunks of text per source, searchable by bm25; thread-safe."""

    def __init__(self, chunk_lines: int) -> None:
        self.chunk_lines = chunk_lines
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        # identifiers stay whole words: "_" is part of a token, not a separator
        self._db.execute(
            "CREATE VIRTUAL TABLE chunks USING fts5("
            "source UNINDEXED, line UNINDEXED, body, tokenize=\"unicode61 tokenchars '_'\")"
        )
        self._lock = threading.Lock()
        # source -> (its chunks' first and last rowid, characters indexed): a source's
        # chunks are deleted by rowid range (by source, FTS5 would scan every row)
        self._sources: dict[str, tuple[int, int, int]] = {}
        self._next_rowid = 1

    def put(self, source: str, text: str) -> None:
        """``source``'s chunks, replacing what it had."""
        lines = text.splitlines()
        step = max(1, self.chunk_lines // 2)
        chunks = [
            (start, "\n".join(lines[start : start + self.chunk_lines]))
            for start in range(0, max(1, len(lines) - step), step)
        ]
        chunks = [(start, body) for start, body in chunks if body.strip()]
        with self._lock:
            self._delete(source)
            first = self._next_rowid
            self._db.executemany(
                "INSERT INTO chunks(rowid, source, line, body) VALUES (?, ?, ?, ?)",
                [(first + i, source, start, body) for i, (start, body) in enumerate(chunks)],
            )
            self._next_rowid = first + len(chunks)
            self._sources[source] = (first, self._next_rowid - 1, len(text))

    def drop(self, source: str) -> None:
        with self._lock:
            self._delete(source)

    def _delete(self, source: str) -> None:
        held = self._sources.pop(source, None)
        if held is not None and held[1] >= held[0]:
            self._db.execute("DELETE FROM chunks WHERE rowid BETWEEN ? AND ?", held[:2])

    def __contains__(self, source: str) -> bool:
        return source in self._sources

    @property
    def sources(self) -> int:
        return len(self._sources)

    @property
    def characters(self) -> int:
        return sum(characters for _, _, characters in self._sources.values())

    def search(self, query: str, *, limit: int, exclude: str | None = None) -> list[Snippet]:
        """The chunks that best match the words of ``query`` (bm25), best first, none of
        ``exclude``'s."""
        words = sorted(set(_WORD.findall(query)), key=lambda w: (-len(w), w))[:MAX_TERMS]
        if not words or limit < 1:
            return []
        match = " OR ".join(f'"{word}"' for word in words)
        with self._lock:
            rows = self._db.execute(
                "SELECT source, line, body FROM chunks WHERE chunks MATCH ? AND source != ? "
                "ORDER BY rank LIMIT ?",
                (match, exclude or "", limit),
            ).fetchall()
        return [Snippet(str(source), int(line), str(body)) for source, line, body in rows]


@dataclass
class _Limits:
    files: int
    file_bytes: int
    total_bytes: int


class Workspace:
    """One client's repository: its files on disk and its open documents, indexed."""

    def __init__(
        self,
        settings: ContextSettings,
        root: Path | None,
        *,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        """``busy`` says a completion is running: the background work waits for it."""
        self.settings = settings
        self.root = root
        self.index = ChunkIndex(settings.context_chunk_lines)
        self._busy = busy
        self._limits = _Limits(
            settings.context_max_files,
            settings.context_max_file_kb * 1024,
            settings.context_max_total_mb * 2**20,
        )
        self._open: dict[str, str] = {}  # uri -> its text, to index
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self.skipped: dict[str, int] = {}  # why -> how many files
        # uri -> the last query, its limit and its snippets
        self._answers: dict[str, tuple[str, int, list[Snippet]]] = {}
        self.crawled = False
        self._thread = threading.Thread(target=self._run, name="ghostloop-workspace", daemon=True)

    # -- life
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    # -- the editor's documents
    def opened(self, uri: str, text: str) -> None:
        with self._lock:
            self._open[uri] = text
            self._dirty.add(uri)

    def changed(self, uri: str, text: str) -> None:
        self.opened(uri, text)

    def closed(self, uri: str) -> None:
        """The document's file on disk (if indexed) stands for it again."""
        with self._lock:
            self._open.pop(uri, None)
            self._dirty.add(uri)
            self._answers.pop(uri, None)

    # -- queries
    def snippets(self, uri: str, prefix: str, *, limit: int) -> list[Snippet]:
        """Chunks for a completion at the end of ``prefix`` in document ``uri``, queried
        with the lines before the cursor line; none of the document's own."""
        lines = prefix.split("\n")[:-1][-QUERY_LINES:]  # the cursor line's typing aside
        query = "\n".join(lines)
        with self._lock:
            known = self._answers.get(uri)
        if known is not None and known[:2] == (query, limit):
            return known[2]
        try:
            found = self.index.search(query, limit=limit, exclude=self.source_of(uri))
        except sqlite3.Error as error:  # a query FTS5 cannot parse must not fail a completion
            log.warning("repository search failed: %s", error)
            return []
        with self._lock:
            if len(self._answers) >= MAX_ANSWERS and uri not in self._answers:
                self._answers.pop(next(iter(self._answers)))
            self._answers[uri] = (query, limit, found)
        return found

    def source_of(self, uri: str) -> str:
        """What the index calls ``uri``: its path under the root, else the URI."""
        path = path_of(uri)
        if path is not None and self.root is not None:
            try:
                return path.resolve().relative_to(self.root).as_posix()
            except (ValueError, OSError):
                pass
        return uri

    def describe(self) -> dict[str, object]:
        return {
            "root": str(self.root) if self.root else None,
            "files": self.index.sources,
            "characters": self.index.characters,
            "crawled": self.crawled,
            "skipped": [{"reason": why, "files": count} for why, count in self.skipped.items()],
        }

    # -- the background thread
    def _run(self) -> None:
        try:
            self._crawl()
        except Exception:  # the repository is optional: completions go on without it
            log.exception("indexing the workspace failed")
        self.crawled = True
        while not self._stopped.is_set():
            self._reindex_open()
            self._wake.wait(REINDEX_S)
            self._wake.clear()

    def _reindex_open(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            texts = {uri: self._open.get(uri) for uri in dirty}
        for uri, text in texts.items():
            source = self.source_of(uri)
            if text is not None:
                self.index.put(source, text)
                continue
            path = path_of(uri)  # closed: back to its file on disk, if it is one of ours
            if path is not None and source != uri and (found := self._read(path)) is not None:
                self.index.put(source, found)
            else:
                self.index.drop(source)

    def _skip(self, why: str, path: Path | str) -> None:
        count = self.skipped.get(why, 0)
        self.skipped[why] = count + 1
        if count == 0:
            log.info("repository context: skipping %s (%s; said once)", path, why)

    def _crawl(self) -> None:
        root = self.root
        if root is None:
            return
        if not root.is_dir():
            self._skip("no such directory", root)
            return
        total = 0
        for path in self._files(root):
            if self._stopped.is_set():
                return
            while self._busy() and not self._stopped.is_set():  # completions first
                time.sleep(0.05)
            if self.index.sources >= self._limits.files:
                self._skip(f"more than {self._limits.files} files", path)
                return
            source = path.relative_to(root).as_posix()
            with self._lock:
                if any(self.source_of(uri) == source for uri in self._open):
                    continue  # the editor's text stands for it
            text = self._read(path)
            if text is None:
                continue
            if total + len(text) > self._limits.total_bytes:
                self._skip(f"more than {self._limits.total_bytes // 2**20} MB in all", path)
                return
            total += len(text)
            self.index.put(source, text)

    def _files(self, root: Path) -> Iterator[Path]:
        """Files under ``root`` that no .gitignore on the way excludes; symlinks are not
        followed (no loops, nothing outside the root)."""
        ignores: list[tuple[Path, pathspec.GitIgnoreSpec]] = []

        def on_error(error: OSError) -> None:
            self._skip("unreadable directory", error.filename or "?")

        for directory, subdirs, files in os.walk(root, onerror=on_error):
            here = Path(directory)
            ignore_file = here / ".gitignore"
            if ignore_file.is_file():
                try:
                    spec = pathspec.GitIgnoreSpec.from_lines(
                        ignore_file.read_text(errors="replace").splitlines()
                    )
                    ignores.append((here, spec))
                except (OSError, ValueError) as error:
                    self._skip(f"unreadable .gitignore ({error})", ignore_file)

            def ignored(path: Path, is_dir: bool) -> bool:
                for base, spec in ignores:
                    if base == path or base not in path.parents:
                        continue
                    relative = path.relative_to(base).as_posix() + ("/" if is_dir else "")
                    if spec.match_file(relative):
                        return True
                return False

            subdirs[:] = sorted(
                name
                for name in subdirs
                if name not in SKIPPED_DIRS
                and not (here / name).is_symlink()
                and not ignored(here / name, True)
            )
            for name in sorted(files):
                path = here / name
                if path.is_symlink():
                    self._skip("symbolic link", path)
                elif not ignored(path, False):
                    yield path

    def _read(self, path: Path) -> str | None:
        """The text of ``path``, or None (skipped, said once per reason)."""
        try:
            found = path.stat()
            if not stat.S_ISREG(found.st_mode):  # a FIFO or a device would block or never end
                self._skip("not a regular file", path)
                return None
            size = found.st_size
            if size > self._limits.file_bytes:
                self._skip(f"larger than {self._limits.file_bytes // 1024} KB", path)
                return None
            data = path.read_bytes()
        except OSError as error:  # deleted meanwhile, no permission
            self._skip(type(error).__name__, path)
            return None
        if b"\0" in data[:_BINARY_PROBE]:
            self._skip("binary", path)
            return None
        return data.decode("utf-8", errors="replace")
