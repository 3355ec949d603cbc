"""A dead database and a killed server lose nothing, and nothing lands twice."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from lsprotocol import types
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.schema import Completion, FeedbackEvent
from tests.conftest import POSTGRES_ADMIN_URL, PrivateCluster
from tests.e2e.conftest import StartServer
from tests.e2e.test_recording import ask

STREAMED = 6


async def test_dead_database_then_killed_server_lose_no_event(
    start_server: StartServer, postgres_url: str, isolated_data_dir: Path
):
    name = f"ghostloop_fault_{uuid.uuid4().hex[:8]}"
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"  # does not exist yet: the database is down
    env = {"GHOSTLOOP_DATABASE_URL": url}
    client = await start_server(env=env)
    ids = []
    for index in range(STREAMED):  # every completion is served although nothing can be stored
        item = await ask(client, f"file{index}.py")
        ids.append(item.command.arguments[0])
        if index % 2:
            await client.workspace_execute_command_async(
                types.ExecuteCommandParams(command="ghostloop.accept", arguments=[ids[-1]])
            )
        else:
            client.protocol.notify("ghostloop/feedback", {"completionId": ids[-1], "kind": "shown"})
    journal = isolated_data_dir / "journal.jsonl"
    expected_lines = STREAMED * 2
    for _ in range(400):  # the writer journals what it cannot store
        if journal.exists() and len(journal.read_text().splitlines()) >= expected_lines:
            break
        await asyncio.sleep(0.05)
    assert len(journal.read_text().splitlines()) == expected_lines

    client._server.kill()  # no shutdown, no flush: as a crash would leave it
    await client._server.wait()

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))  # the database is back
    try:
        again = await start_server(env=env)  # replays the journal on start
        await again.shutdown_session()
        engine = open_engine(url)
        with Session(engine) as session:
            stored = set(session.scalars(select(Completion.id)))
            kinds = dict(
                session.execute(
                    select(FeedbackEvent.kind, func.count()).group_by(FeedbackEvent.kind)
                ).all()
            )
        engine.dispose()
        assert stored == set(ids)
        assert kinds == {"accepted": STREAMED // 2, "shown": STREAMED - STREAMED // 2}
        assert not journal.exists()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


async def stream(client, names: list[str], ids: list[str]) -> None:
    """Ask for a completion in each file; accept every second one, show the others."""
    for name in names:
        item = await ask(client, name)  # served whatever the database is doing
        ids.append(item.command.arguments[0])
        if len(ids) % 2:
            await client.workspace_execute_command_async(
                types.ExecuteCommandParams(command="ghostloop.accept", arguments=[ids[-1]])
            )
        else:
            client.protocol.notify("ghostloop/feedback", {"completionId": ids[-1], "kind": "shown"})


def stored(url: str) -> tuple[set[str], int]:
    engine = open_engine(url)
    try:
        with Session(engine) as session:
            completions = set(session.scalars(select(Completion.id)))
            events = session.scalar(select(func.count()).select_from(FeedbackEvent)) or 0
    except Exception:  # the database is still down or not migrated yet
        return set(), 0
    finally:
        engine.dispose()
    return completions, events


async def wait_stored(url: str, count: int, timeout_s: float = 60) -> tuple[set[str], int]:
    for _ in range(int(timeout_s / 0.1)):
        completions, events = stored(url)
        if len(completions) >= count and events >= count:
            break
        await asyncio.sleep(0.1)
    return completions, events


async def test_postgres_stopped_mid_stream_every_event_lands_once_after_it_is_back(
    start_server: StartServer, private_postgres: PrivateCluster, isolated_data_dir: Path
):
    url = private_postgres.url
    client = await start_server(env={"GHOSTLOOP_DATABASE_URL": url})
    ids: list[str] = []
    await stream(client, [f"before{index}.py" for index in range(STREAMED)], ids)
    assert len((await wait_stored(url, STREAMED))[0]) == STREAMED

    private_postgres.stop()
    await stream(client, [f"during{index}.py" for index in range(STREAMED)], ids)
    journal = isolated_data_dir / "journal.jsonl"
    for _ in range(400):  # the writer journals what it cannot store
        if journal.exists() and len(journal.read_text().splitlines()) >= 2 * STREAMED:
            break
        await asyncio.sleep(0.05)
    status = await client.protocol.send_request_async("ghostloop/status", None)
    assert status.recorder.database_up is False

    private_postgres.start()
    completions, _ = await wait_stored(url, 2 * STREAMED)
    await client.shutdown_session()
    assert completions == set(ids)
    # each event once (ids are unique keys): a decision per completion, and at the session's
    # end a survival check and the line as written for each accepted one (every second)
    assert stored(url) == (set(ids), 2 * STREAMED + 2 * STREAMED)
    assert not journal.exists()
