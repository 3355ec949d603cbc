"""ghostloop logs / stats / pairs / runs / adapters over a log a real LSP session wrote,
in SQLite and in PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import StartServer
from tests.e2e.sessions import TYPED_INSTEAD, record_session


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, isolated_data_dir: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    return request.getfixturevalue("empty_postgres_url")


def ghostloop(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GHOSTLOOP_DATABASE_URL": database_url, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "ghostloop", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_logs_and_stats_show_what_the_session_did(
    start_server: StartServer, database_url: str
):
    alice = await record_session(start_server, user="alice", database_url=database_url)
    bob = await record_session(start_server, user="bob", database_url=database_url)

    rows = json_lines(ghostloop(database_url, "logs", "--json"))
    assert len(rows) == 6
    by_id = {row["id"]: row for row in rows}
    kept = by_id[alice.kept]
    assert (kept["user"], kept["outcome"], kept["adapter"]) == ("alice", "accepted", None)
    assert kept["accepted_length"] == len(alice.kept_text)
    assert kept["survival"] == {"0.2s": 1.0, "0.6s": 1.0}
    assert kept["chars_saved"] == len(alice.kept_text)
    assert by_id[alice.thrown]["outcome"] == "rejected"
    assert by_id[alice.thrown]["chars_saved"] == 0
    assert by_id[alice.dismissed]["outcome"] == "dismissed"
    assert {"time", "language", "accepted_length"} <= set(kept)

    mine = json_lines(ghostloop(database_url, "logs", "--json", "--user", "bob"))
    assert {row["id"] for row in mine} == {bob.kept, bob.thrown, bob.dismissed}
    taken = json_lines(ghostloop(database_url, "logs", "--json", "--outcome", "accepted"))
    assert {row["id"] for row in taken} == {alice.kept, bob.kept}
    assert json_lines(ghostloop(database_url, "logs", "--json", "--since", "2030-01-01")) == []

    shown = json_lines(ghostloop(database_url, "logs", "show", alice.thrown, "--json"))[0]
    assert [e["kind"] for e in shown["events"]] == ["rejected", "typed_instead"]
    assert shown["final_text"] == TYPED_INSTEAD and shown["prompt_prefix"]

    printed = ghostloop(database_url, "logs", "show", alice.kept)
    assert printed.returncode == 0, printed.stderr
    assert alice.kept_text in printed.stdout and "survival check after 0.6 s" in printed.stdout

    stats = json_lines(ghostloop(database_url, "stats", "--by", "user", "--json"))
    assert [row["user"] for row in stats] == ["alice", "bob"]
    for row, session in zip(stats, (alice, bob), strict=True):
        assert (row["completions"], row["seen"], row["accepted"], row["settled"]) == (3, 3, 1, 3)
        assert row["acceptance"] == pytest.approx(1 / 3)
        assert row["chars_saved_per_completion"] == pytest.approx(len(session.kept_text) / 3)
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p95"]
    table = ghostloop(database_url, "stats", "--by", "adapter")
    assert table.returncode == 0 and "base" in table.stdout and "6" in table.stdout


async def test_inspection_commands_refuse_bad_input_and_change_nothing(
    start_server: StartServer, database_url: str
):
    await record_session(start_server, user="alice", database_url=database_url)
    before = ghostloop(database_url, "logs", "--json").stdout
    for args, status, message in (
        (("logs", "show", "0" * 32), 1, "no completion has id"),
        (("logs", "show"), 2, "name a completion"),
        (("logs", "--outcome", "kept"), 2, "outcome 'kept' is not one of"),
        (("logs", "--since", "yesterday"), 2, "neither an age"),
        (("logs", "--since", "1d", "--until", "2d"), 2, "must come before"),
        (("stats", "--by", "week"), 2, "--by takes distinct names"),
        (("runs", "show", "42"), 2, "no training run has id 42"),
    ):
        result = ghostloop(database_url, *args)
        assert result.returncode == status, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert ghostloop(database_url, "logs", "--json").stdout == before
    dead = ghostloop("postgresql://nobody@127.0.0.1:1/none", "stats")
    assert dead.returncode == 1 and "cannot reach the database" in dead.stderr


def test_runs_pairs_and_adapters_on_an_empty_store(database_url: str):
    assert "no training runs yet" in ghostloop(database_url, "runs").stdout
    assert "no preference pairs yet" in ghostloop(database_url, "pairs").stdout
    assert "no preference pairs from run 7" in ghostloop(database_url, "pairs", "--run", "7").stdout
    assert json_lines(ghostloop(database_url, "runs", "--json")) == []
    assert json_lines(ghostloop(database_url, "adapters", "list", "--json")) == []
