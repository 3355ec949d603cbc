from __future__ import annotations

import time
import uuid
from pathlib import Path

from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.recorder import Recorder, StoreWrite
from feedback.schema import Completion, FeedbackEvent
from tests.conftest import POSTGRES_ADMIN_URL


def completion_write(completion_id: str) -> StoreWrite:
    return StoreWrite(
        "completion",
        {
            "id": completion_id,
            "created_at": "2026-11-25T12:00:00+00:00",
            "user": "alice",
            "base_model": "tiny",
            "suggestion": "return total",
            "latency_ms": 10.0,
        },
    )


def event_write(completion_id: str, kind: str, length: int | None = None) -> StoreWrite:
    values = {"id": uuid.uuid4().hex, "completion_id": completion_id, "kind": kind}
    if length is not None:
        values["accepted_length"] = length
    return StoreWrite("event", values)


def counts(engine: Engine) -> tuple[int, int]:
    with Session(engine) as session:
        return (
            session.scalar(select(func.count()).select_from(Completion)) or 0,
            session.scalar(select(func.count()).select_from(FeedbackEvent)) or 0,
        )


def test_records_and_outcomes_reach_the_store(engine: Engine, tmp_path: Path):
    recorder = Recorder(engine=engine, journal_path=tmp_path / "journal.jsonl", event_retries=0)
    recorder.start()
    recorder.submit(completion_write("a" * 32))
    recorder.submit(event_write("a" * 32, "shown"))
    recorder.submit(event_write("a" * 32, "partial", 4))
    recorder.submit(completion_write("b" * 32))
    recorder.submit(event_write("b" * 32, "rejected"))
    recorder.submit(event_write("missing", "accepted", 3))  # refused: no such completion
    assert recorder.flush()
    recorder.close()
    assert counts(engine) == (2, 3)
    assert recorder.stats.skipped == 1 and not (tmp_path / "journal.jsonl").exists()
    with Session(engine) as session:
        first = session.get(Completion, "a" * 32)
        assert first is not None and (first.outcome, first.accepted_length) == ("partial", 4)
        second = session.get(Completion, "b" * 32)
        assert second is not None and second.outcome == "rejected"


def test_a_dead_database_loses_nothing_and_each_record_lands_once(
    postgres_url: str, tmp_path: Path
):
    """The database does not exist while records arrive; once it does, they all land once."""
    name = f"ghostloop_down_{uuid.uuid4().hex[:8]}"
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    engine = open_engine(url)
    journal = tmp_path / "journal.jsonl"
    recorder = Recorder(engine=engine, journal_path=journal, retry_s=0.1)
    recorder.start()
    for index in range(50):
        completion_id = f"{index:032d}"
        recorder.submit(completion_write(completion_id))
        recorder.submit(event_write(completion_id, "accepted", 5))
    assert recorder.flush()
    assert not recorder.stats.database_up and recorder.stats.journaled == 100
    assert len(journal.read_text().splitlines()) == 100

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        for _ in range(400):  # the writer thread retries every 0.1 s on its own
            if not journal.exists():
                break
            time.sleep(0.05)
        recorder.close()
        assert not journal.exists()
        assert counts(engine) == (50, 50)
        assert recorder.stats.replayed == 100
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_journal_left_by_a_crash_is_replayed_once_on_start(engine: Engine, tmp_path: Path):
    journal = tmp_path / "journal.jsonl"
    first = Recorder(engine=engine, journal_path=journal)
    first.start()
    first.submit(completion_write("c" * 32))
    first.flush()
    first.close()
    # what a crashed process left: one record already stored, two not, a torn last line
    lines = [
        completion_write("c" * 32).to_json(),
        completion_write("d" * 32).to_json(),
        event_write("d" * 32, "dismissed").to_json(),
        '{"table": "event", "val',
    ]
    journal.write_text("\n".join(lines) + "\n")
    second = Recorder(engine=engine, journal_path=journal)
    second.start()
    second.flush()
    second.close()
    assert counts(engine) == (2, 1)
    assert second.stats.corrupt_journal_lines == 1 and not journal.exists()


def test_an_event_that_overtakes_its_completion_still_lands(engine: Engine, tmp_path: Path):
    journal = tmp_path / "journal.jsonl"
    recorder = Recorder(engine=engine, journal_path=journal, retry_s=0.05)
    recorder.start()
    recorder.submit(event_write("g" * 32, "accepted", 3))  # its completion comes later
    recorder.flush()
    recorder.submit(completion_write("g" * 32))
    recorder.flush()
    for _ in range(200):  # the deferred event is retried from the journal
        if not journal.exists():
            break
        time.sleep(0.05)
    recorder.close()
    assert counts(engine) == (1, 1) and recorder.stats.skipped == 0
