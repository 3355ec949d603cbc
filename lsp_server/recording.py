"""The server's side of the feedback store: what it records about each suggestion.

Records go to the Recorder (queue, writer thread, journal), never straight to the
database, so a slow or dead database cannot delay a completion. Stored text is redacted
and capped; with telemetry off nothing about the user's code is recorded.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from feedback.database import open_store
from feedback.prometheus import ServerMetrics
from feedback.recorder import Recorder, StoreWrite
from feedback.redaction import redact
from ghostloop.settings import Settings
from lsp_server.engine import CompletionResult
from lsp_server.survival import Schedule, SurvivalTracker

log = logging.getLogger(__name__)

FEEDBACK_KINDS = ("shown", "rejected", "dismissed")
FINAL_FATES = ("accepted", "partial", "rejected", "dismissed")
TRACKED = 4096


def document_path(uri: str, root_uri: str | None) -> str:
    """The document's path relative to the workspace root when it lies inside it."""
    path = Path(unquote(urlparse(uri).path))
    if root_uri:
        root = Path(unquote(urlparse(root_uri).path))
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(path)


def open_recorder(settings: Settings, busy: Callable[[], bool] | None = None) -> Recorder:
    """The started recorder for the configured store, journaling in the data dir; while
    ``busy()`` (a completion is generating) it holds its writes back."""
    journal = settings.store.data_dir / "journal.jsonl"
    recorder = Recorder(engine=open_store(settings.store), journal_path=journal, hold=busy)
    recorder.start()
    return recorder


def stored_suffix(prompt_suffix: str, document: str, offset: int) -> str:
    """The text after the cursor stored with a completion: the prompt's suffix (a FIM
    model's), else the document's through the next line that holds code.

    The night's labels need what followed the cursor: the rest of its line (not to be
    learned again, ``trainer.labels.without_rest_of_line``) and the next line's start (its
    indentation is tokenized with the newline that ends the target, ``trainer.data``). A
    prefix-only model's prompt has no suffix; storing that empty one made every target end
    in a bare newline token, which teaches the model to end lines early
    (``trainer.data.encode_target``). The document is searched in place: only the stored
    piece is copied, not the rest of a long file on every completion.
    """
    if prompt_suffix:
        return prompt_suffix
    start = document.find("\n", offset) + 1
    while start:
        end = document.find("\n", start)
        if end < 0:
            break
        if document[start:end].strip():
            return document[offset:end]
        start = end + 1
    return document[offset:]


class FateBook:
    """The latest fate of each recent completion (bounded). A team server's connections
    share one, so a suggestion is taken once whichever of its user's editors says so."""

    def __init__(self, capacity: int = TRACKED) -> None:
        self._fates: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, completion_id: str) -> str | None:
        with self._lock:
            return self._fates.get(completion_id)

    def served(self, completion_id: str) -> None:
        with self._lock:
            self._fates[completion_id] = "pending"
            while len(self._fates) > self._capacity:
                self._fates.popitem(last=False)

    def update(self, completion_id: str, kind: str) -> None:
        with self._lock:
            if completion_id in self._fates:
                self._fates[completion_id] = kind


class FeedbackLog:
    """Turns served completions and client signals into store records."""

    def __init__(
        self,
        settings: Settings,
        recorder: Recorder | None,
        schedule: Schedule,
        metrics: ServerMetrics | None = None,
        fates: FateBook | None = None,
    ) -> None:
        self.settings = settings
        self.recorder = recorder
        self.metrics = metrics
        self.survival = SurvivalTracker(settings.store.survival_windows, schedule, self._event)
        self.fates = fates or FateBook()
        self._last_served: dict[str, str] = {}  # document uri -> completion id
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(
        cls,
        settings: Settings,
        schedule: Schedule,
        busy: Callable[[], bool] | None = None,
        metrics: ServerMetrics | None = None,
    ) -> FeedbackLog:
        """``schedule(delay_s, call)`` runs survival checks later (the loop's call_later);
        while ``busy()`` (a completion is generating) the recorder holds its writes back."""
        if not settings.store.telemetry:
            log.info("telemetry off: nothing about this user's code is recorded")
            return cls(settings, None, schedule, metrics)
        return cls(settings, open_recorder(settings, busy), schedule, metrics)

    def close(self) -> None:
        """The session ends: accepted suggestions are measured once more from the last text
        (``SurvivalTracker.final``), then the recorder writes what it holds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.recorder is not None:
            self.survival.final()
            self.recorder.close()

    def status(self) -> dict[str, Any]:
        """The recorder's counters for ghostloop/status; telemetry off reports nothing."""
        if self.recorder is None:
            return {"telemetry": False}
        return {"telemetry": True, **asdict(self.recorder.stats)}

    def fate(self, completion_id: str) -> str | None:
        return self.fates.get(completion_id)

    def superseded(self, uri: str) -> None:
        """A new request for ``uri``: its last suggestion, never taken, was rejected."""
        with self._lock:
            previous = self._last_served.pop(uri, None)
        if previous is not None and self.fate(previous) not in FINAL_FATES:
            self.signal(previous, "rejected")

    def accepted(self, completion_id: str, inserted: str, *, partial: bool) -> None:
        """The user took ``inserted``: the whole suggestion, or its start (``partial``)."""
        kind = "partial" if partial else "accepted"
        self._event(completion_id, kind, accepted_length=len(inserted))
        if self.recorder is not None:
            self.survival.accepted(completion_id, inserted)

    def signal(self, completion_id: str, kind: str) -> None:
        """shown, rejected or dismissed; after the last two, what was typed is captured."""
        self._event(completion_id, kind)
        if kind in ("rejected", "dismissed") and self.recorder is not None:
            self.survival.rejected(completion_id)

    def changed(self, uri: str, text: str) -> None:
        self.survival.changed(uri, text)

    def closed(self, uri: str) -> None:
        self.survival.closed(uri)

    def served(
        self,
        result: CompletionResult,
        *,
        uri: str,
        document: str,
        root_uri: str | None,
        language: str,
        client_name: str,
        client_version: str,
        base_model: str,
    ) -> None:
        with self._lock:
            self._last_served[uri] = result.completion_id
        self.fates.served(result.completion_id)
        if self.recorder is None:
            return
        self.survival.served(
            uri, result.completion_id, document, result.offset, result.mode.multiline
        )
        cap = self.settings.store.max_stored_prompt_chars
        prefix = redact(result.prompt.prefix[-cap:] if cap else "")
        suffix = redact(stored_suffix(result.prompt.suffix, document, result.offset)[:cap])
        # whole (its own budget bounds it), so the night trains on the prompt as sent
        repository = redact(result.prompt.repository if cap else "")
        suggestion = redact(result.text)
        values = {
            "id": result.completion_id,
            "created_at": datetime.now(UTC).isoformat(),
            "user": self.settings.store.stored_user,
            "client_name": client_name,
            "client_version": client_version,
            "language": language,
            "path": document_path(uri, root_uri),
            "base_model": base_model,
            "adapter_version": result.adapter_version,
            "arm": result.arm,
            "template": result.prompt.template,
            "prompt_prefix": prefix.text,
            "prompt_suffix": suffix.text,
            "prompt_repository": repository.text,
            "suggestion": suggestion.text,
            "multiline": result.mode.multiline,
            "latency_ms": round(result.latency_ms, 3),
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated_tokens,
            "stop_reason": result.stop_reason,
            "redactions": prefix.count + suffix.count + repository.count + suggestion.count,
        }
        self.recorder.submit(StoreWrite("completion", values))

    def _event(
        self,
        completion_id: str,
        kind: str,
        *,
        accepted_length: int | None = None,
        window_s: float | None = None,
        survival_ratio: float | None = None,
        text: str | None = None,
        final: bool = False,
    ) -> None:
        if self.metrics is not None:  # a final check's window is any time: not a label
            self.metrics.event(
                kind, window_s=None if final else window_s, survival_ratio=survival_ratio
            )
        if kind not in ("survival", "typed_instead", "written"):
            self.fates.update(completion_id, kind)
        if self.recorder is None:
            return
        values = {
            "id": uuid.uuid4().hex,
            "completion_id": completion_id,
            "created_at": datetime.now(UTC).isoformat(),
            "kind": kind,
            "accepted_length": accepted_length,
            "window_s": window_s,
            "survival_ratio": survival_ratio,
            "text": None if text is None else redact(text).text,
        }
        self.recorder.submit(StoreWrite("event", values))
