"""What a real LSP session leaves in the real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest
from lsprotocol import types
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.schema import Completion, FeedbackEvent
from tests.e2e.conftest import StartServer, inline_params, open_document
from tests.e2e.test_server import MID_LINE, lines_of


async def ask(client, name: str) -> types.InlineCompletionItem:
    uri = open_document(client, MID_LINE, name)
    result = await client.text_document_inline_completion_async(
        inline_params(uri, *lines_of(MID_LINE))
    )
    assert result.items, "the tiny model writes something at this position"
    return result.items[0]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, isolated_data_dir: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    return request.getfixturevalue("postgres_url")


async def test_session_is_recorded_exactly(start_server: StartServer, database_url: str):
    client = await start_server(
        env={"GHOSTLOOP_DATABASE_URL": database_url, "GHOSTLOOP_USER": "alice"}
    )
    taken = await ask(client, "taken.py")
    taken_id = taken.command.arguments[0]
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="ghostloop.accept", arguments=[taken_id, 2])
    )
    dismissed = (await ask(client, "dismissed.py")).command.arguments[0]
    client.protocol.notify("ghostloop/feedback", {"completionId": dismissed, "kind": "shown"})
    client.protocol.notify("ghostloop/feedback", {"completionId": dismissed, "kind": "dismissed"})
    client.protocol.notify("ghostloop/feedback", {"completionId": "f" * 32, "kind": "shown"})
    client.protocol.notify("ghostloop/feedback", {"completionId": taken_id, "kind": "rejected"})
    superseded = (await ask(client, "typing.py")).command.arguments[0]
    latest = (await ask(client, "typing.py")).command.arguments[0]
    await client.shutdown_session()  # the server flushes its recorder before answering
    warnings = [m.message for m in client.log_messages if m.type == types.MessageType.Warning]
    assert any("unknown completion id" in w for w in warnings)
    assert any("was already partial" in w for w in warnings)

    engine = open_engine(database_url)
    with Session(engine) as session:
        rows = {c.id: c for c in session.scalars(select(Completion))}
        events = [
            (e.completion_id, e.kind, e.accepted_length)
            for e in session.scalars(select(FeedbackEvent).order_by(FeedbackEvent.created_at))
        ]
    engine.dispose()
    assert set(rows) == {taken_id, dismissed, superseded, latest}
    assert (rows[taken_id].outcome, rows[taken_id].accepted_length) == ("partial", 2)
    assert rows[dismissed].outcome == "dismissed"
    assert rows[superseded].outcome == "rejected"
    assert rows[latest].outcome == "pending"
    assert sorted(events) == sorted(
        [
            (taken_id, "partial", 2),
            (dismissed, "shown", None),
            (dismissed, "dismissed", None),
            (superseded, "rejected", None),
            # the session ended before the first window: measured once more at its end
            (taken_id, "written", None),
            (taken_id, "survival", None),
            (dismissed, "typed_instead", None),
            (superseded, "typed_instead", None),
        ]
    )
    row = rows[taken_id]
    assert (row.user, row.client_name, row.language, row.path) == (
        "alice",
        "pytest-lsp",
        "python",
        "/workspace/taken.py",
    )
    assert row.base_model and row.template == "prefix-only"
    assert row.prompt_prefix.endswith("self.word") and row.suggestion == taken.insert_text
    assert row.latency_ms > 0 and row.generated_tokens > 0


async def test_what_follows_the_cursor_is_stored_for_the_labels(
    start_server: StartServer, isolated_data_dir: Path
):
    """The tiny model is prefix-only: its prompt has no suffix, but the night's labels need
    the next line's start (the newline token that ends a target) and the rest of the line."""
    after = "\n\n        self.quotes = '\"'\n        self.state = ' '\n"
    client = await start_server()
    uri = open_document(client, MID_LINE + after, "suffix.py")
    result = await client.text_document_inline_completion_async(
        inline_params(uri, *lines_of(MID_LINE))
    )
    assert result.items
    await client.shutdown_session()
    engine = open_engine(f"sqlite:///{isolated_data_dir / 'ghostloop.db'}")
    with Session(engine) as session:
        row = session.scalars(select(Completion)).one()
    engine.dispose()
    assert row.template == "prefix-only"
    assert row.prompt_prefix.endswith("self.word")
    assert row.prompt_suffix == "\n\n        self.quotes = '\"'"


async def test_hashed_user_is_stored_instead_of_the_name(
    start_server: StartServer, isolated_data_dir: Path
):
    client = await start_server(env={"GHOSTLOOP_USER": "alice", "GHOSTLOOP_HASH_USER": "1"})
    await ask(client, "hashed.py")
    await client.shutdown_session()
    engine = open_engine(f"sqlite:///{isolated_data_dir / 'ghostloop.db'}")
    with Session(engine) as session:
        users = session.scalars(select(Completion.user)).all()
    engine.dispose()
    digest = hashlib.sha256(b"alice").hexdigest()[:32]
    assert users == [f"sha256:{digest}"]


async def test_telemetry_off_stores_nothing(start_server: StartServer, isolated_data_dir: Path):
    client = await start_server(options={"telemetry": False})
    item = await ask(client, "private.py")
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="ghostloop.accept", arguments=item.command.arguments)
    )
    await client.shutdown_session()
    assert not (isolated_data_dir / "ghostloop.db").exists()
    assert not (isolated_data_dir / "journal.jsonl").exists()


def insert(
    client, uri: str, version: int, line: int, character: int, text: str, end: int | None = None
) -> None:
    """What an editor sends when text is typed or a suggestion inserted at a position."""
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(
                        start=types.Position(line=line, character=character),
                        end=types.Position(line=line, character=character if end is None else end),
                    ),
                    text=text,
                )
            ],
        )
    )


async def stored(
    data_dir: Path, completion_id: str, kind: str, count: int, timeout_s: float = 60
) -> None:
    """Wait until the store holds ``count`` events of ``kind`` for ``completion_id``: the
    survival checks run at their windows and the recorder writes them moments later."""
    engine = open_engine(f"sqlite:///{data_dir / 'ghostloop.db'}")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with Session(engine) as session:
                found = session.scalar(
                    select(func.count())
                    .select_from(FeedbackEvent)
                    .where(FeedbackEvent.completion_id == completion_id)
                    .where(FeedbackEvent.kind == kind)
                )
            if (found or 0) >= count:
                return
            assert time.monotonic() < deadline, f"{count} {kind} events for {completion_id}"
            await asyncio.sleep(0.05)
    finally:
        engine.dispose()


async def test_survival_of_accepted_text_and_what_was_typed_after_a_rejection(
    start_server: StartServer, isolated_data_dir: Path
):
    client = await start_server(env={"GHOSTLOOP_SURVIVAL_WINDOWS_S": "0.3,1.2"})
    line, character = lines_of(MID_LINE)
    kept = await ask(client, "kept.py")
    kept_id, text = kept.command.arguments[0], kept.insert_text
    uri = "file:///workspace/kept.py"
    insert(client, uri, 2, line, character, text)  # the editor inserts the suggestion
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="ghostloop.accept", arguments=[kept_id])
    )
    # the first window's check: the text stands as inserted
    await stored(isolated_data_dir, kept_id, "survival", 1)
    cut = max(1, len(text) // 2)
    insert(client, uri, 3, line, character + cut, "ZZ", end=character + len(text))
    insert(client, uri, 4, line, character + cut + 2, " + 1")  # typed after the region

    thrown = (await ask(client, "thrown.py")).command.arguments[0]
    client.protocol.notify("ghostloop/feedback", {"completionId": thrown, "kind": "rejected"})
    insert(client, "file:///workspace/thrown.py", 2, line, character, "s_list = []")
    await stored(isolated_data_dir, kept_id, "survival", 2)  # the last window's check
    await stored(isolated_data_dir, thrown, "typed_instead", 1)
    await client.shutdown_session()

    engine = open_engine(f"sqlite:///{isolated_data_dir / 'ghostloop.db'}")
    with Session(engine) as session:
        survival = [
            (e.window_s, e.survival_ratio, e.text)
            for e in session.scalars(
                select(FeedbackEvent)
                .where(FeedbackEvent.completion_id == kept_id, FeedbackEvent.kind == "survival")
                .order_by(FeedbackEvent.window_s)
            )
        ]
        typed = session.scalars(
            select(FeedbackEvent.text).where(
                FeedbackEvent.completion_id == thrown, FeedbackEvent.kind == "typed_instead"
            )
        ).all()
        lines = session.execute(
            select(FeedbackEvent.window_s, FeedbackEvent.text).where(
                FeedbackEvent.completion_id == kept_id, FeedbackEvent.kind == "written"
            )
        ).all()
    engine.dispose()
    assert survival[0] == (0.3, 1.0, text)
    assert survival[1][0] == 1.2 and survival[1][2] == text[:cut] + "ZZ"
    assert survival[1][1] < 1.0
    # the line as written, once, at the window nearest two minutes: the region and what
    # was typed after it (which saved nothing, so it is not in the survival text)
    assert [tuple(row) for row in lines] == [(1.2, text[:cut] + "ZZ + 1")]
    assert typed == ["s_list = []"]


async def test_another_users_completion_cannot_be_accepted_or_rejected(
    start_server: StartServer, isolated_data_dir: Path
):
    """Alice and Bob each run a server on one store; Bob's signals for Alice's completion
    are refused, and her row stays as she left it."""
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    alice = await start_server(env={"GHOSTLOOP_DATABASE_URL": url, "GHOSTLOOP_USER": "alice"})
    bob = await start_server(env={"GHOSTLOOP_DATABASE_URL": url, "GHOSTLOOP_USER": "bob"})
    hers = (await ask(alice, "hers.py")).command.arguments[0]
    await alice.shutdown_session()  # her completion is in the store
    with pytest.raises(Exception, match="this server never served it"):
        await bob.workspace_execute_command_async(
            types.ExecuteCommandParams(command="ghostloop.accept", arguments=[hers])
        )
    bob.protocol.notify("ghostloop/feedback", {"completionId": hers, "kind": "rejected"})
    await bob.shutdown_session()
    warnings = [m.message for m in bob.log_messages if m.type == types.MessageType.Warning]
    assert any("unknown completion id" in w for w in warnings)
    engine = open_engine(url)
    with Session(engine) as session:
        row = session.get(Completion, hers)
        assert row is not None and (row.user, row.outcome) == ("alice", "pending")
        assert session.scalars(select(FeedbackEvent)).all() == []
    engine.dispose()
