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
from tests.conftest import POSTGRES_ADMIN_URL
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
