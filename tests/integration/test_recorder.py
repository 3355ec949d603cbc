from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session

from feedback.database import open_engine, upgrade
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


def test_survival_checks_settle_what_each_completion_saved(engine: Engine, tmp_path: Path):
    recorder = Recorder(engine=engine, journal_path=tmp_path / "journal.jsonl", event_retries=0)
    recorder.start()

    def survival(completion_id: str, window_s: float, ratio: float) -> StoreWrite:
        values = {"id": uuid.uuid4().hex, "completion_id": completion_id, "kind": "survival"}
        return StoreWrite("event", {**values, "window_s": window_s, "survival_ratio": ratio})

    recorder.submit(completion_write("a" * 32))
    recorder.submit(event_write("a" * 32, "accepted", 12))
    recorder.submit(survival("a" * 32, 30.0, 1.0))
    assert recorder.flush()
    with Session(engine) as session:
        row = session.get(Completion, "a" * 32)
        assert row is not None and (row.survival_window_s, row.chars_saved) == (30.0, 12)
    recorder.submit(survival("a" * 32, 120.0, 0.5))  # nearer two minutes: it decides
    recorder.submit(survival("a" * 32, 600.0, 0.0))
    recorder.submit(completion_write("b" * 32))
    recorder.submit(event_write("b" * 32, "dismissed"))
    recorder.submit(completion_write("c" * 32))
    recorder.submit(event_write("c" * 32, "accepted", 5))  # no survival check yet
    assert recorder.flush()
    recorder.close()
    with Session(engine) as session:
        saved = {
            c.id[0]: (c.survival_ratio, c.chars_saved) for c in session.scalars(select(Completion))
        }
    assert saved == {"a": (0.5, 6), "b": (None, 0), "c": (None, None)}


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


KILLED_PRODUCER = """
import os, signal, sys
from pathlib import Path
from feedback.database import open_engine, upgrade
from feedback.recorder import Recorder
from tests.integration.test_recorder import completion_write, event_write

url, journal, start, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
recorder = Recorder(engine=open_engine(url), journal_path=journal)
if start:
    recorder.start()
for index in range(count):
    recorder.submit(completion_write(f"{index:032x}"))
    recorder.submit(event_write(f"{index:032x}", "accepted", 4))
os.kill(os.getpid(), signal.SIGKILL)  # no flush, no close: records still queued are lost
"""


@pytest.mark.parametrize("writer_running", [False, True], ids=["queued", "mid-write"])
def test_records_queued_when_the_process_is_killed_land_once_on_the_next_start(
    engine: Engine, tmp_path: Path, writer_running: bool
):
    upgrade(engine)
    journal = tmp_path / "journal.jsonl"
    url = engine.url.render_as_string(hide_password=False)
    count = 400
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_PRODUCER,
            url,
            str(journal),
            str(int(writer_running)),
            str(count),
        ],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if not writer_running:  # nothing reached the database: all of it is in the segments
        assert counts(engine) == (0, 0)
    assert list(journal.with_suffix(".wal").glob("*.jsonl"))

    recovering = Recorder(engine=engine, journal_path=journal)
    recovering.start()
    recovering.flush()
    recovering.close()
    assert counts(engine) == (count, count)
    assert recovering.stats.recovered >= (0 if writer_running else 2 * count)
    assert not list(journal.with_suffix(".wal").glob("*.jsonl")) and not journal.exists()


def test_a_live_recorder_keeps_its_segments_from_another_one(engine: Engine, tmp_path: Path):
    """Two servers sharing a data directory: the second does not take the first's records."""
    upgrade(engine)
    journal = tmp_path / "journal.jsonl"
    live = Recorder(engine=engine, journal_path=journal)  # its writer has not started yet
    live.submit(completion_write("e" * 32))
    other = Recorder(engine=engine, journal_path=journal)
    other.start()
    other.flush()
    other.close()
    assert other.stats.recovered == 0 and counts(engine) == (0, 0)
    live.start()
    live.flush()
    live.close()
    assert counts(engine) == (1, 0)
    assert not list(journal.with_suffix(".wal").glob("*.jsonl"))


def test_writes_wait_while_the_process_is_busy(engine: Engine, tmp_path: Path):
    """While a completion generates, the writer holds its database work back."""
    upgrade(engine)
    generating = threading.Event()
    generating.set()
    recorder = Recorder(
        engine=engine,
        journal_path=tmp_path / "journal.jsonl",
        hold=generating.is_set,
        max_hold_s=60.0,
    )
    recorder.start()
    recorder.submit(completion_write("h" * 32))
    deadline = time.monotonic() + 30
    while not recorder.stats.held and time.monotonic() < deadline:  # the writer holds it
        time.sleep(0.01)
    assert recorder.stats.held == 1
    assert counts(engine) == (0, 0)
    generating.clear()
    assert recorder.flush()
    recorder.close()
    assert counts(engine) == (1, 0)
