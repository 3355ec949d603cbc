"""Getting records into the store without ever holding up a completion.

Writes go through a bounded in-process queue to one writer thread. What cannot be written
(the database is down, slow, or the queue is full) is appended to a journal on disk,
fsync'd line by line, and replayed in order once the database answers again, or on the
next start. Every record carries the id it was born with, so a replay that repeats a line
still stores it once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from feedback.database import StoreError, upgrade
from feedback.schema import Completion, FeedbackEvent
from feedback.store import add_new

log = logging.getLogger(__name__)

OUTCOME_RANK = {
    "pending": 0,
    "shown": 1,
    "dismissed": 2,
    "rejected": 2,
    "partial": 3,
    "accepted": 4,
}
BATCH = 256
SUBMITTED_MEMORY = 100_000
FINAL_REPLAY_ROUNDS = 10


@dataclass(frozen=True)
class StoreWrite:
    """One row to store, as plain JSON-able values (times as ISO 8601 strings)."""

    table: Literal["completion", "event"]
    values: dict[str, Any]
    attempts: int = 0  # times the database refused it because its completion was missing

    def to_json(self) -> str:
        record = {"table": self.table, "values": self.values, "attempts": self.attempts}
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> StoreWrite:
        data = json.loads(line)
        if data.get("table") not in ("completion", "event") or not isinstance(
            data.get("values"), dict
        ):
            raise ValueError(f"not a journal record: {line[:80]!r}")
        return cls(data["table"], data["values"], int(data.get("attempts", 0)))


@dataclass
class RecorderStats:
    written: int = 0
    journaled: int = 0
    replayed: int = 0
    skipped: int = 0  # rows the database refuses for good (e.g. an event for no completion)
    corrupt_journal_lines: int = 0
    database_up: bool = True


def _row(write: StoreWrite) -> Completion | FeedbackEvent:
    values = dict(write.values)
    if isinstance(values.get("created_at"), str):
        values["created_at"] = datetime.fromisoformat(values["created_at"])
    return Completion(**values) if write.table == "completion" else FeedbackEvent(**values)


def _apply(session: Session, write: StoreWrite) -> bool:
    return _apply_batch(session, [write]) == 1


def _apply_batch(session: Session, batch: list[StoreWrite]) -> int:
    """Store the rows of ``batch`` not stored yet; returns how many were new.

    Two id look-ups and two bulk inserts per batch; completions are flushed before events
    so an event may follow its completion in the same batch.
    """
    rows = [_row(write) for write in batch]
    completions = [r for r in rows if isinstance(r, Completion)]
    events = [r for r in rows if isinstance(r, FeedbackEvent)]
    new_completions = add_new(session=session, rows=completions)
    session.flush()
    new_events = add_new(session=session, rows=events)
    session.flush()  # an event for an unknown completion fails here
    _update_outcomes(session, new_events)
    return len(new_completions) + len(new_events)


def _update_outcomes(session: Session, events: list[FeedbackEvent]) -> None:
    ranked = [e for e in events if e.kind in OUTCOME_RANK]
    if not ranked:
        return
    ids = {e.completion_id for e in ranked}
    completions = {
        c.id: c for c in session.scalars(select(Completion).where(Completion.id.in_(ids)))
    }
    for event in ranked:
        completion = completions.get(event.completion_id)
        if completion is not None and OUTCOME_RANK[event.kind] > OUTCOME_RANK.get(
            completion.outcome, 0
        ):
            completion.outcome = event.kind
            if event.kind in ("accepted", "partial"):
                completion.accepted_length = event.accepted_length


@dataclass
class Recorder:
    """Queue, writer thread and journal for one store."""

    engine: Engine
    journal_path: Path
    capacity: int = 10_000
    retry_s: float = 2.0
    migrate: bool = True  # bring the schema up to date before the first write
    # An event can overtake its completion (a full queue sends newer records to the
    # journal); refused for that, it is journaled and retried this many times.
    event_retries: int = 3
    stats: RecorderStats = field(default_factory=RecorderStats)

    def __post_init__(self) -> None:
        self._queue: queue.Queue[StoreWrite | None] = queue.Queue(self.capacity)
        self._journal_lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0
        self._schema_ready = False
        self._submitted: OrderedDict[str, None] = OrderedDict()  # completion ids seen here
        self._thread = threading.Thread(target=self._run, name="ghostloop-recorder", daemon=True)

    # -- producer side: called on the request path, never blocks on the database
    def submit(self, write: StoreWrite) -> None:
        with self._idle:
            self._pending += 1
            if write.table == "completion":
                self._submitted[str(write.values["id"])] = None
                if len(self._submitted) > SUBMITTED_MEMORY:
                    self._submitted.popitem(last=False)
        try:
            self._queue.put_nowait(write)
        except queue.Full:
            self._journal([write])
            self._done(1)

    def start(self) -> None:
        self._thread.start()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted is in the database or the journal."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)

    # -- writer side
    def _done(self, count: int) -> None:
        with self._idle:
            self._pending -= count
            self._idle.notify_all()

    def _run(self) -> None:
        self._write([])  # migrate at start, off the caller's thread
        self._replay()
        while True:
            try:
                first = self._queue.get(timeout=self.retry_s)
            except queue.Empty:
                self._replay()
                continue
            if first is None:
                # a clean shutdown leaves no journal behind while the database answers
                for _ in range(FINAL_REPLAY_ROUNDS):
                    if self._replay() or not self.stats.database_up:
                        break
                return
            batch = [first]
            while len(batch) < BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            if (self.journal_path.exists() and not self._replay()) or not self._write(batch):
                self._journal(batch)
            self._done(len(batch))

    def _write(self, batch: list[StoreWrite]) -> bool:
        """Store ``batch`` in one transaction; False when the database is unreachable."""
        try:
            if self.migrate and not self._schema_ready:
                upgrade(self.engine)
                self._schema_ready = True
            with Session(self.engine) as session, session.begin():
                written = _apply_batch(session, batch)
        except IntegrityError:
            written = self._write_one_by_one(batch)
        except (SQLAlchemyError, StoreError) as error:
            if self.stats.database_up:
                log.error("database unavailable, journaling events: %s", error)
            self.stats.database_up = False
            return False
        self.stats.written += written
        if not self.stats.database_up:
            log.info("database available again")
        self.stats.database_up = True
        return True

    def _write_one_by_one(self, batch: list[StoreWrite]) -> int:
        written = 0
        deferred = []
        for write in batch:
            try:
                with Session(self.engine) as session, session.begin():
                    written += _apply(session, write)
            except IntegrityError as error:
                if write.table == "event" and self._awaits_completion(write):
                    deferred.append(write)
                elif write.table == "event" and write.attempts < self.event_retries:
                    deferred.append(replace(write, attempts=write.attempts + 1))
                else:
                    self.stats.skipped += 1
                    log.warning("skipped a %s the database refuses: %s", write.table, error.orig)
        if deferred:
            self._journal(deferred)
        return written

    def _awaits_completion(self, write: StoreWrite) -> bool:
        """An event whose completion was submitted here is waiting, not orphaned."""
        with self._idle:
            return str(write.values.get("completion_id")) in self._submitted

    def _journal(self, writes: list[StoreWrite]) -> None:
        with self._journal_lock:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            with self.journal_path.open("a", encoding="utf-8") as journal:
                for write in writes:
                    journal.write(write.to_json() + "\n")
                journal.flush()
                os.fsync(journal.fileno())
        self.stats.journaled += len(writes)

    def _replay(self) -> bool:
        """Move the journal into the database; True when nothing is left in it."""
        with self._journal_lock:
            if not self.journal_path.exists():
                return True
            lines = self.journal_path.read_text(encoding="utf-8").splitlines()
        writes = []
        for line in lines:
            try:
                writes.append(StoreWrite.from_json(line))
            except (ValueError, json.JSONDecodeError):  # a line cut short by a crash
                self.stats.corrupt_journal_lines += 1
        for start in range(0, len(writes), BATCH):
            if not self._write(writes[start : start + BATCH]):
                return False
        with self._journal_lock:
            # lines journaled while we replayed stay for the next round
            current = self.journal_path.read_text(encoding="utf-8").splitlines()
            rest = current[len(lines) :]
            if rest:
                staging = self.journal_path.with_suffix(".tmp")
                with staging.open("w", encoding="utf-8") as journal:
                    journal.write("\n".join(rest) + "\n")
                    journal.flush()
                    os.fsync(journal.fileno())
                os.replace(staging, self.journal_path)
            else:
                self.journal_path.unlink()
        self.stats.replayed += len(writes)
        log.info("replayed %d journaled records", len(writes))
        return not rest
