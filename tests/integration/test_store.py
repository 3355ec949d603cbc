from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from feedback.database import (
    StoreError,
    current_revision,
    head_revision,
    open_engine,
    upgrade,
)
from feedback.schema import Base, Completion, FeedbackEvent
from feedback.store import events_of, record_completion, record_event


def completion(completion_id: str = "c" * 32) -> Completion:
    return Completion(
        id=completion_id,
        user="alice",
        base_model="SmolLM2-135M-Instruct",
        suggestion="return total",
        latency_ms=12.5,
        prompt_prefix="def f():\n    ",
    )


def test_upgrade_creates_every_table_and_is_idempotent(engine: Engine):
    assert current_revision(engine) is None
    assert upgrade(engine) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"completions", "events", "training_runs", "preference_pairs", "adapters"} <= tables
    assert upgrade(engine) == head_revision()
    assert current_revision(engine) == head_revision()


def test_migrations_match_the_models(engine: Engine):
    upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == [], "schema.py changed without a migration: add an Alembic revision"


def test_events_are_written_once_even_when_replayed(engine: Engine):
    upgrade(engine)
    event = {"id": "e" * 32, "completion_id": "c" * 32, "kind": "accepted", "accepted_length": 6}
    with Session(engine) as session, session.begin():
        assert record_completion(session=session, completion=completion())
        assert record_event(session=session, event=FeedbackEvent(**event))
    with Session(engine) as session, session.begin():
        assert not record_completion(session=session, completion=completion())
        assert not record_event(session=session, event=FeedbackEvent(**event))
    with Session(engine) as session:
        stored = events_of(session=session, completion_id="c" * 32)
        assert [(e.kind, e.accepted_length) for e in stored] == [("accepted", 6)]


def test_an_event_for_an_unknown_completion_is_refused(engine: Engine):
    upgrade(engine)
    orphan = FeedbackEvent(id="f" * 32, completion_id="nope", kind="shown")
    with pytest.raises(IntegrityError, match=r"(?i)foreign key"), Session(engine) as session:  # noqa: SIM117
        with session.begin():
            record_event(session=session, event=orphan)
    with Session(engine) as session:
        assert session.scalar(text("select count(*) from events")) == 0


def test_sqlite_store_uses_wal_and_a_busy_timeout(tmp_path: Path):
    engine = open_engine(f"sqlite:///{tmp_path / 'sub' / 'ghostloop.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 5000
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_unreachable_database_gives_a_clear_error():
    engine = open_engine("postgresql://nobody@127.0.0.1:1/nothing")
    with pytest.raises(StoreError, match=r"cannot reach the database.*GHOSTLOOP_DATABASE_URL"):
        upgrade(engine)


def test_bad_database_url_gives_a_clear_error():
    with pytest.raises(StoreError, match="is not a SQLAlchemy URL"):
        open_engine("not a url")


def run_cli(*args: str, env_data_dir: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "GHOSTLOOP_DATA_DIR": str(env_data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "ghostloop", *args], env=env, capture_output=True, text=True
    )


def test_db_upgrade_command_migrates_the_default_sqlite_store(isolated_data_dir: Path):
    before = run_cli("db", "current", env_data_dir=isolated_data_dir)
    assert "run 'ghostloop db upgrade'" in before.stdout
    done = run_cli("db", "upgrade", env_data_dir=isolated_data_dir)
    assert done.returncode == 0, done.stderr
    assert (isolated_data_dir / "ghostloop.db").is_file()
    after = run_cli("db", "current", env_data_dir=isolated_data_dir)
    assert "up to date" in after.stdout


def test_purge_deletes_old_completions_with_their_events_only(engine: Engine):
    from datetime import UTC, datetime, timedelta

    from feedback.store import purge_older_than

    upgrade(engine)
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        for name, age in (("o", 40), ("n", 1)):
            row = completion(name * 32)
            row.created_at = now - timedelta(days=age)
            record_completion(session=session, completion=row)
            record_event(
                session=session,
                event=FeedbackEvent(id=name.upper() * 32, completion_id=name * 32, kind="shown"),
            )
    with Session(engine) as session, session.begin():
        assert purge_older_than(session=session, cutoff=now - timedelta(days=30)) == (1, 1)
    with Session(engine) as session:
        assert [c.id for c in session.scalars(select(Completion))] == ["n" * 32]
        assert [e.completion_id for e in session.scalars(select(FeedbackEvent))] == ["n" * 32]


def test_db_purge_command_checks_its_age_argument(isolated_data_dir: Path):
    bad = run_cli("db", "purge", "--older-than", "soon", env_data_dir=isolated_data_dir)
    assert bad.returncode == 2 and "positive number with d, h, m or s" in bad.stderr
    good = run_cli("db", "purge", "--older-than", "30d", env_data_dir=isolated_data_dir)
    assert good.returncode == 0 and "deleted 0 completions" in good.stdout


def test_upgrading_a_store_from_before_0002_works_out_each_completions_figures(engine: Engine):
    from alembic import command

    from feedback.database import _alembic_config

    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    now = "2026-11-20 10:00:00"
    rows = [  # id, outcome, accepted_length
        ("kept", "accepted", 10),
        ("half", "partial", 8),
        ("thrown", "rejected", None),
        ("unsettled", "accepted", 6),
        ("pending", "pending", None),
    ]
    events = [  # completion, window, ratio: the check nearest two minutes counts
        ("kept", 30.0, 0.2),
        ("kept", 120.0, 0.9),
        ("kept", 600.0, 0.1),
        ("half", 30.0, 0.5),
    ]
    with engine.begin() as connection:
        for completion_id, outcome, length in rows:
            connection.execute(
                text(
                    'INSERT INTO completions (id, created_at, "user", client_name, '
                    "client_version, language, path, base_model, template, prompt_prefix, "
                    "prompt_suffix, suggestion, multiline, latency_ms, prompt_tokens, "
                    "generated_tokens, stop_reason, redactions, outcome, accepted_length) VALUES "
                    "(:id, :now, 'a', '', '', 'python', '', 'm', '', '', '', 'x', false, 1.0, "
                    "0, 0, '', 0, :outcome, :length)"
                ),
                {"id": completion_id, "now": now, "outcome": outcome, "length": length},
            )
        for index, (completion_id, window, ratio) in enumerate(events):
            connection.execute(
                text(
                    "INSERT INTO events (id, completion_id, created_at, kind, window_s, "
                    "survival_ratio) VALUES (:id, :c, :now, 'survival', :w, :r)"
                ),
                {"id": f"e{index}", "c": completion_id, "now": now, "w": window, "r": ratio},
            )
    assert upgrade(engine) == head_revision()
    with Session(engine) as session:
        found = {
            c.id: (c.survival_window_s, c.survival_ratio, c.chars_saved)
            for c in session.scalars(select(Completion))
        }
    assert found == {
        "kept": (120.0, 0.9, 9),
        "half": (30.0, 0.5, 4),
        "thrown": (None, None, 0),
        "unsettled": (None, None, None),
        "pending": (None, None, None),
    }
