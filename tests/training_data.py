"""Feedback for the trainer's tests: recorded by a real LSP session, or written as rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lsprotocol import types
from pytest_lsp import LanguageClient
from sqlalchemy.orm import Session

from feedback.database import open_engine, upgrade
from feedback.schema import Completion, FeedbackEvent

TRUTH = "return result"
SHORT_WINDOWS = "0.2,0.4,0.6"
# Train hard enough that the tiny random model learns the one line the developer keeps.
TRAIN_ENV = {
    "GHOSTLOOP_LEARNING_RATE": "5e-3",
    "GHOSTLOOP_EPOCHS": "12",
    "GHOSTLOOP_MIN_TRAIN_EXAMPLES": "8",
    "GHOSTLOOP_MIN_EVAL_EXAMPLES": "4",
    "GHOSTLOOP_THREADS": "1",
}


def function_text(index: int) -> str:
    """A document cut where the developer writes ``return result``."""
    return f"def scale_{index}(value):\n    result = value * {index}\n    "


OTHER_TRUTH = "yield total"  # far from "return result": its adapter saves nothing here


def other_function_text(index: int) -> str:
    """Another habit: here the developer raises instead of returning."""
    return f"def offset_{index}(value):\n    total = value + {index}\n    "


async def record_session(client: LanguageClient, positions: int) -> list[str]:
    """A developer rejects each suggestion and types the real line; every fifth suggestion is
    accepted and then rewritten to the real line. Returns the completion ids."""
    ids = []
    for index in range(positions):
        uri = f"file:///workspace/scale_{index}.py"
        prefix = function_text(index)
        client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=uri, language_id="python", version=1, text=prefix
                )
            )
        )
        line = prefix.count("\n")
        result = await client.text_document_inline_completion_async(
            types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(line=line, character=4),
                context=types.InlineCompletionContext(
                    trigger_kind=types.InlineCompletionTriggerKind.Invoked
                ),
            )
        )
        assert result is not None and result.items, "the tiny model suggests something here"
        item = result.items[0]
        completion_id = item.command.arguments[0]
        ids.append(completion_id)
        version = 2
        if index % 5 == 4:
            await client.workspace_execute_command_async(
                types.ExecuteCommandParams(command="ghostloop.accept", arguments=[completion_id])
            )
            change(client, uri, version, prefix + str(item.insert_text))
            version += 1
        else:
            client.protocol.notify(
                "ghostloop/feedback", {"completionId": completion_id, "kind": "rejected"}
            )
        change(client, uri, version, prefix + TRUTH + "\n")
    await asyncio.sleep(1.0)  # every survival window and typed-instead check has run
    return ids


def change(client: LanguageClient, uri: str, version: int, text: str) -> None:
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)],
        )
    )


def write_rows(
    url: str,
    base_model: str,
    count: int,
    kept: Callable[[int], str],
    *,
    start: datetime | None = None,
    prefix: Callable[[int], str] = function_text,
) -> None:
    """``count`` rejected completions where the developer typed ``kept(index)`` instead,
    logged a millisecond apart from ``start`` (default: a second ago)."""
    rows = [(prefix(index), "", kept(index)) for index in range(count)]
    write_rejections(url, base_model, rows, start=start)


def write_rejections(
    url: str,
    base_model: str,
    rows: Sequence[tuple[str, str, str]],
    *,
    start: datetime | None = None,
    users: int = 1,
) -> None:
    """One rejected completion per (prefix, suffix, kept) with ``kept`` typed instead,
    a millisecond apart from ``start``, spread over ``users`` users."""
    engine = open_engine(url)
    upgrade(engine)
    start = start or datetime.now(UTC) - timedelta(seconds=1)
    with Session(engine) as session, session.begin():
        for index, (prefix, suffix, kept) in enumerate(rows):
            completion_id = uuid.uuid4().hex
            session.add(
                Completion(
                    id=completion_id,
                    created_at=start + timedelta(milliseconds=index),
                    user="alice" if users == 1 else f"dev{index % users}",
                    base_model=base_model,
                    template="prefix-only",
                    prompt_prefix=prefix,
                    prompt_suffix=suffix,
                    suggestion="pass",
                    latency_ms=1.0,
                    outcome="rejected",
                )
            )
            session.flush()
            session.add(
                FeedbackEvent(id=uuid.uuid4().hex, completion_id=completion_id, kind="rejected")
            )
            session.add(
                FeedbackEvent(
                    id=uuid.uuid4().hex,
                    completion_id=completion_id,
                    kind="typed_instead",
                    window_s=30.0,
                    text=kept,
                )
            )
    engine.dispose()


def write_repo(root: Path, files: int) -> Path:
    """A repository of small modules that share their habits (what a night can learn)."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        body = "".join(
            f"def scale_{index}_{j}(value):\n    result = value * {j + 2}\n    return result\n\n"
            for j in range(4)
        )
        (root / f"module_{index}.py").write_text(
            f'"""Module {index}."""\n\n{body}', encoding="utf-8"
        )
    (root / ".venv").mkdir()
    (root / ".venv" / "skipped.py").write_text("x = 1\n")
    (root / "empty.py").write_text("\n")
    return root
