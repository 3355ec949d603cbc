"""A real LSP session that leaves every kind of fate in the log, for the admin views."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from lsprotocol import types

from tests.e2e.conftest import StartServer
from tests.e2e.test_recording import ask, insert
from tests.e2e.test_server import MID_LINE, lines_of

WINDOWS_S = "0.2,0.6"  # shortened survival windows; 0.6 s is the one nearest two minutes


@dataclass(frozen=True)
class Session:
    user: str
    kept: str  # accepted, still standing: chars saved = its length
    kept_text: str
    thrown: str  # rejected, then the developer typed TYPED_INSTEAD
    dismissed: str


TYPED_INSTEAD = "s_list = [] <b>&</b>"  # markup on purpose: the dashboard must escape it


async def record_session(start_server: StartServer, *, user: str, database_url: str) -> Session:
    """Accept one suggestion and keep it, reject one and type something else, dismiss one;
    returns once the server has stored everything (shutdown flushes its recorder)."""
    client = await start_server(
        env={
            "GHOSTLOOP_DATABASE_URL": database_url,
            "GHOSTLOOP_USER": user,
            "GHOSTLOOP_SURVIVAL_WINDOWS_S": WINDOWS_S,
        }
    )
    line, character = lines_of(MID_LINE)
    kept = await ask(client, "kept.py")
    insert(client, "file:///workspace/kept.py", 2, line, character, kept.insert_text)
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="ghostloop.accept", arguments=kept.command.arguments)
    )
    thrown = (await ask(client, "thrown.py")).command.arguments[0]
    client.protocol.notify("ghostloop/feedback", {"completionId": thrown, "kind": "rejected"})
    insert(client, "file:///workspace/thrown.py", 2, line, character, TYPED_INSTEAD)
    dismissed = (await ask(client, "dismissed.py")).command.arguments[0]
    client.protocol.notify("ghostloop/feedback", {"completionId": dismissed, "kind": "shown"})
    client.protocol.notify("ghostloop/feedback", {"completionId": dismissed, "kind": "dismissed"})
    await asyncio.sleep(1.0)  # past the last survival window
    await client.shutdown_session()
    return Session(user, kept.command.arguments[0], kept.insert_text, thrown, dismissed)
