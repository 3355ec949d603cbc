"""Getting records into the store without ever holding up a completion.

Every submitted record is first appended to a write-ahead log segment (one ``write`` to the
OS, no fsync on the request path; the writer thread fsyncs once per batch), so a killed
process loses nothing that was submitted: the next start stores what the dead process left
in its segments. Then it goes through a bounded in-process queue to one writer thread. What
cannot be written (the database is down, slow, or the queue is full) is appended to a
journal on disk and replayed in order once the database answers again, or on the next
start. A segment is emptied once each of its records is in the database or the journal.
Every record carries the id it was born with, so a replay that repeats a line still stores
it once.

Each live process holds an advisory lock (``flock``) on its segments, so two servers that
share a data directory never recover each other's live segments.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from feedback.database import StoreError, upgrade
from feedback.metrics import nearer_kept_window, settled_chars_saved
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
HOLD_POLL_S = 0.005
WAL_SEGMENT_RECORDS = 4096  # a full segment is sealed; a new one takes the next records


@dataclass(frozen=True)
class StoreWrite:
    """One row to store, as plain JSON-able values (times as ISO 8601 strings)."""

    table: Literal["completion", "event"]
    values: dict[str, Any]
    attempts: int = 0  # times the database refused it because its completion was missing
    segment: int = field(default=-1, compare=False)  # write-ahead segment holding it; not stored

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
    recovered: int = 0  # records a killed process left in its write-ahead segments
    held: int = 0  # batches whose writing waited for a completion to finish generating
    database_up: bool = True


@dataclass
class _Segment:
    """One write-ahead log file of this process, locked while it exists."""

    path: Path
    file: TextIO
    appended: int = 0
    done: int = 0  # records now in the database or the journal
    sealed: bool = False


def _open_locked(path: Path, mode: Literal["a", "r"]) -> TextIO | None:
    """Open ``path`` holding an exclusive flock; None when another process holds it."""
    handle = path.open(mode, encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


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
    """Carry new events onto their completions: the outcome (the strongest signal wins),
    the survival check nearest two minutes, and what the completion saved."""
    relevant = [e for e in events if e.kind in OUTCOME_RANK or e.kind == "survival"]
    if not relevant:
        return
    ids = {e.completion_id for e in relevant}
    completions = {
        c.id: c for c in session.scalars(select(Completion).where(Completion.id.in_(ids)))
    }
    for event in relevant:
        completion = completions.get(event.completion_id)
        if completion is None:
            continue
        if event.kind == "survival":
            if event.window_s is not None and nearer_kept_window(
                event.window_s, completion.survival_window_s
            ):
                completion.survival_window_s = event.window_s
                completion.survival_ratio = event.survival_ratio
        elif OUTCOME_RANK[event.kind] > OUTCOME_RANK.get(completion.outcome, 0):
            completion.outcome = event.kind
            if event.kind in ("accepted", "partial"):
                completion.accepted_length = event.accepted_length
    for completion in completions.values():
        completion.chars_saved = settled_chars_saved(
            completion.outcome, completion.accepted_length, completion.survival_ratio
        )


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
    # True while the process does latency-critical work (a completion is generating): the
    # writer waits, up to max_hold_s per batch, so that its database work (CPU and the GIL
    # on a small machine) does not slow the completion down.
    hold: Callable[[], bool] | None = None
    max_hold_s: float = 1.0
    stats: RecorderStats = field(default_factory=RecorderStats)

    def __post_init__(self) -> None:
        self._queue: queue.Queue[StoreWrite | None] = queue.Queue(self.capacity)
        self._journal_lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0
        self._schema_ready = False
        self._submitted: OrderedDict[str, None] = OrderedDict()  # completion ids seen here
        self._wal_lock = threading.Lock()
        self._wal_dir = self.journal_path.with_suffix(".wal")
        self._segments: dict[int, _Segment] = {}
        self._segment_count = 0
        self._wal_name = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._journal_unsynced = False
        self._thread = threading.Thread(target=self._run, name="ghostloop-recorder", daemon=True)

    # -- producer side: called on the request path, never blocks on the database
    def submit(self, write: StoreWrite) -> None:
        with self._idle:
            self._pending += 1
            if write.table == "completion":
                self._submitted[str(write.values["id"])] = None
                if len(self._submitted) > SUBMITTED_MEMORY:
                    self._submitted.popitem(last=False)
        write = self._log_ahead(write)
        try:
            self._queue.put_nowait(write)
        except queue.Full:
            # the record is in its segment already; the journal needs no fsync of its own
            # until that segment is emptied (see _release)
            self._journal([write], sync=False)
            self._done([write])

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
        if not self._thread.is_alive():
            with self._wal_lock:
                self._release(everything_done=self._pending == 0, closing=self._pending == 0)

    # -- write-ahead log
    def _log_ahead(self, write: StoreWrite) -> StoreWrite:
        """Append ``write`` to this process's open segment; survives a kill of the process."""
        with self._wal_lock:
            current = self._segments.get(self._segment_count - 1)
            if current is None or current.sealed:
                self._wal_dir.mkdir(parents=True, exist_ok=True)
                path = self._wal_dir / f"{self._wal_name}-{self._segment_count:06d}.jsonl"
                handle = _open_locked(path, "a")
                if handle is None:  # cannot happen for a fresh name; refuse to share a file
                    raise StoreError(f"write-ahead segment {path} is locked by another process")
                current = _Segment(path, handle)
                self._segments[self._segment_count] = current
                self._segment_count += 1
            current.file.write(write.to_json() + "\n")
            current.file.flush()
            current.appended += 1
            current.sealed = current.appended >= WAL_SEGMENT_RECORDS
            return replace(write, segment=self._segment_count - 1)

    def _sync_wal(self) -> None:
        # duplicated descriptors: the fsync runs outside the lock that submit() takes
        with self._wal_lock:
            descriptors = [os.dup(segment.file.fileno()) for segment in self._segments.values()]
        for descriptor in descriptors:
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def _release(self, everything_done: bool, closing: bool = False) -> None:
        """Drop segments whose records are all stored or journaled; called under _wal_lock.

        A sealed segment is deleted. When nothing is pending (``everything_done``) the open
        segment is emptied in place, so the next submit needs no new file; ``closing``
        deletes it too.
        """
        finished = [
            number
            for number, segment in self._segments.items()
            if segment.done >= segment.appended
            and (closing or (segment.appended > 0 and (segment.sealed or everything_done)))
        ]
        if not finished:
            return
        if self._journal_unsynced and self.journal_path.exists():
            with self.journal_path.open("a", encoding="utf-8") as journal:
                os.fsync(journal.fileno())
        self._journal_unsynced = False
        for number in finished:
            segment = self._segments[number]
            if segment.sealed or closing:
                del self._segments[number]
                segment.path.unlink(missing_ok=True)  # unlinked before unlocked: not recovered
                segment.file.close()
            else:
                segment.file.truncate(0)  # append mode: the next write starts the file again
                segment.appended = segment.done = 0

    def _recover(self) -> None:
        """Store (or journal) what killed processes left in their segments, then delete them."""
        if not self._wal_dir.is_dir():
            return
        for path in sorted(self._wal_dir.glob("*.jsonl")):
            handle = _open_locked(path, "r")
            if handle is None:  # a live process (or this one) owns it
                continue
            with handle:
                writes = []
                for line in handle.read().splitlines():
                    try:
                        writes.append(StoreWrite.from_json(line))
                    except (ValueError, json.JSONDecodeError):  # cut short by the kill
                        self.stats.corrupt_journal_lines += 1
                for start in range(0, len(writes), BATCH):
                    batch = writes[start : start + BATCH]
                    if not self._write(batch):
                        self._journal(batch)
                self.stats.recovered += len(writes)
                path.unlink()
            if writes:
                log.info("recovered %d records from %s", len(writes), path.name)

    # -- writer side
    def _done(self, writes: list[StoreWrite]) -> None:
        with self._idle:
            self._pending -= len(writes)
            everything_done = self._pending == 0
            self._idle.notify_all()
        with self._wal_lock:
            for write in writes:
                segment = self._segments.get(write.segment)
                if segment is not None:
                    segment.done += 1
            self._release(everything_done)

    def _run(self) -> None:
        self._write([])  # migrate at start, off the caller's thread
        self._recover()
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
            self._hold_back()
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
            self._sync_wal()  # one fsync per batch, off the request path
            if (self.journal_path.exists() and not self._replay()) or not self._write(batch):
                self._journal(batch)
            self._done(batch)

    def _hold_back(self) -> None:
        deadline = time.monotonic() + self.max_hold_s
        if self.hold is not None and self.hold():
            self.stats.held += 1
        while self.hold is not None and self.hold() and time.monotonic() < deadline:
            time.sleep(HOLD_POLL_S)

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

    def _journal(self, writes: list[StoreWrite], sync: bool = True) -> None:
        with self._journal_lock:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            with self.journal_path.open("a", encoding="utf-8") as journal:
                for write in writes:
                    journal.write(write.to_json() + "\n")
                journal.flush()
                if sync:
                    os.fsync(journal.fileno())
                else:
                    self._journal_unsynced = True
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
