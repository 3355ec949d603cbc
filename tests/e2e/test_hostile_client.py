"""What a fuzzer found a hostile client could do to the server, each now held: absurd
frames, JSON-RPC inside params, a second initialize, edits at the LSP's line breaks, a 2 MB
line, the session's end before the survival windows, logs at their level, a bad message
on TCP, SIGINT after serving, a closed pipe under `ghostloop logs`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.schema import Completion, FeedbackEvent
from tests.e2e.team_servers import TeamServer
from tests.e2e.test_raw_protocol import RawServer
from tests.unit.test_positions import reference_position

TEXT = "def f(self):\n    return self.wor"
END = {"line": 1, "character": 19}


StartRaw = Callable[..., Awaitable[RawServer]]


@pytest_asyncio.fixture
async def start_raw(tiny_model_dir: Path) -> AsyncIterator[StartRaw]:
    """Start ``ghostloop serve`` processes spoken to in raw frames; any still running when
    the test ends (a failed one) is killed, not left spinning."""
    started: list[RawServer] = []

    async def start(**options: Any) -> RawServer:
        server = await RawServer.start(tiny_model_dir, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()


def at(uri: str, position: dict[str, int]) -> dict[str, Any]:
    return {"textDocument": {"uri": uri}, "position": position, "context": {"triggerKind": 1}}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def log_messages(server: RawServer, kind: int | None = None) -> list[str]:
    return [
        n["params"]["message"]
        for n in server.notifications
        if n.get("method") == "window/logMessage" and kind in (None, n["params"]["type"])
    ]


async def test_bad_frames_and_messages_on_stdio_are_skipped_and_the_server_lives(
    start_raw: StartRaw, tmp_path: Path
):
    stderr = tmp_path / "stderr.log"
    server = await start_raw(stderr=stderr)
    await server.initialize()
    uri = "file:///workspace/with%20space.py"  # pygls keeps documents by the unquoted URI
    server.open(uri, TEXT)
    for frame in (
        b"Content-Length: 73786976294838206464\r\n\r\n",  # OverflowError in pygls's reader
        b"Content-Length: 1000000000000\r\n\r\n",  # MemoryError
        b"Content-Length: 12\r\n\r\nnot json at all",
    ):
        server.send_bytes(frame)
    server.send_body(b"[1, 2]")  # JSON, but no message
    server.send({"method": "textDocument/didChange", "params": {"contentChanges": "x"}})
    server.send({"method": "ghostloop/feedback", "params": 5})
    nested = {"x": {"jsonrpc": "2.0", "id": 7, "method": "ghostloop/status", "params": None}}
    status = await server.request("ghostloop/status", nested)
    assert status["result"]["state"] == "ready"  # the object in params is data

    again = await server.request("initialize", {"processId": None, "capabilities": {}})
    assert again["error"]["code"] == -32600 and "initialized already" in again["error"]["message"]
    good = await server.request("textDocument/inlineCompletion", at(uri, END))
    assert good["result"]["items"][0]["insertText"].strip()  # the document is still open
    classic = await server.request("textDocument/completion", at(uri, END))
    assert classic["result"]["items"][0]["textEdit"]["newText"].startswith("wor")
    await server.stop()

    assert server.process.returncode == 0
    assert all(message.get("id") != 7 for message in server.notifications)
    assert not [n for n in server.notifications if n.get("method") == "window/showMessage"]
    warnings = log_messages(server, 2)
    assert any("ignored a message" in w and "textDocument/didChange" in w for w in warnings)
    assert any("skipped" in w for w in warnings)
    # the server's log reached the editor at its level, not as stderr lines
    assert any("completion_id=" in m for m in log_messages(server, 3))
    log = stderr.read_text()
    assert "Traceback" not in log and "completion_id=" not in log


async def test_edits_land_at_the_lsp_line_breaks_and_a_bad_one_is_reported(
    start_raw: StartRaw,
):
    """Form feeds, U+2028, NEL and a lone \\r: Python's splitlines splits at all of them,
    the LSP at \\r, \\n and \\r\\n only. The server's text must stay the client's."""
    server = await start_raw()
    await server.initialize()
    uri = "file:///workspace/breaks.py"
    text = "a = 1\f# x\u2028y\rb = 2\x85c\r\nd = 😀\nreturn self.wor"
    server.open(uri, text)
    edits = [("b = 2", "bb = 22"), ("d = 😀", "d = 'ok'"), ("\u2028y", "\u2028why"), ("a", "A")]
    for version, (old, new) in enumerate(edits, start=2):
        start = text.index(old)
        change = {
            "range": {
                "start": _position(text, start),
                "end": _position(text, start + len(old)),
            },
            "text": new,
        }
        text = text[:start] + new + text[start + len(old) :]
        server.send(
            {
                "method": "textDocument/didChange",
                "params": {
                    "textDocument": {"uri": uri, "version": version},
                    "contentChanges": [change],
                },
            }
        )
        state = await server.request("ghostloop/documentState", {"textDocument": {"uri": uri}})
        assert state.get("result", {}).get("sha256") == sha(text), (old, new, state)
        assert state["result"]["version"] == version and state["result"]["outOfSync"] is None

    past_end = {
        "range": {"start": {"line": 40, "character": 0}, "end": {"line": 40, "character": 0}}
    }
    server.send(
        {
            "method": "textDocument/didChange",
            "params": {
                "textDocument": {"uri": uri, "version": 9},
                "contentChanges": [{**past_end, "text": "lost"}],
            },
        }
    )
    state = await server.request("ghostloop/documentState", {"textDocument": {"uri": uri}})
    assert "past the end" in state["result"]["outOfSync"]
    refused = await server.request(
        "textDocument/inlineCompletion", at(uri, {"line": 0, "character": 0})
    )
    assert refused["error"]["code"] == -32602 and "out of sync" in refused["error"]["message"]
    server.send(  # the whole text again: back in sync
        {
            "method": "textDocument/didChange",
            "params": {
                "textDocument": {"uri": uri, "version": 10},
                "contentChanges": [{"text": TEXT}],
            },
        }
    )
    served = await server.request("textDocument/inlineCompletion", at(uri, END))
    assert "result" in served
    await server.stop()


def _position(text: str, offset: int) -> dict[str, int]:
    position = reference_position(text, offset)
    return {"line": position.line, "character": position.character}


async def test_a_two_megabyte_line_does_not_hold_up_another_document(start_raw: StartRaw):
    server = await start_raw()
    await server.initialize()
    huge, small = "file:///workspace/huge.py", "file:///workspace/small.py"
    # one line under max_document_chars, a long word run ended by a non-word character:
    # the run every start of a regex anchored at the line's end scanned to the end
    line = "a" * 1_999_000 + "("
    server.open(huge, line)
    server.open(small, TEXT)
    end = {"line": 0, "character": len(line)}
    server.send(
        {"id": "huge-inline", "method": "textDocument/inlineCompletion", "params": at(huge, end)}
    )
    server.send(
        {"id": "huge-classic", "method": "textDocument/completion", "params": at(huge, end)}
    )
    asked = time.monotonic()
    reply = await server.request("textDocument/inlineCompletion", at(small, END))
    waited_s = time.monotonic() - asked
    assert "result" in reply
    assert waited_s < 1.0, f"another document's completion waited {waited_s:.2f} s"
    answered = {m.get("id") for m in server.notifications}
    while not {"huge-inline", "huge-classic"} <= answered:
        answered.add((await asyncio.wait_for(server.receive(), 60)).get("id"))
    await server.stop()


async def test_the_session_end_keeps_what_accepted_suggestions_saved(
    start_raw: StartRaw, isolated_data_dir: Path
):
    """Accepted a second before the editor closes (with shutdown, or without: the pipe
    just ends, or the server is sent SIGTERM): each gets a survival figure at the time it
    reached and characters saved, and `ghostloop stats` counts them."""
    ids = []
    for ending in ("shutdown", "end of input", "SIGTERM"):
        server = await start_raw()
        await server.initialize()
        uri = f"file:///workspace/end-{ending.replace(' ', '-')}.py"
        server.open(uri, TEXT)
        item = (await server.request("textDocument/inlineCompletion", at(uri, END)))["result"][
            "items"
        ][0]
        completion_id, inserted = item["command"]["arguments"][0], item["insertText"]
        change = {"range": {"start": END, "end": END}, "text": inserted}
        server.send(
            {
                "method": "textDocument/didChange",
                "params": {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [change]},
            }
        )
        accepted = await server.request(
            "workspace/executeCommand",
            {"command": "ghostloop.accept", "arguments": [completion_id, len(inserted)]},
        )
        assert "error" not in accepted
        if ending == "shutdown":
            await server.stop()
        elif ending == "end of input":
            assert server.process.stdin is not None
            server.process.stdin.close()
            await asyncio.wait_for(server.process.wait(), 30)
        else:
            server.process.terminate()
            await asyncio.wait_for(server.process.wait(), 30)
        assert server.process.returncode == 0
        ids.append((completion_id, len(inserted)))

    engine = open_engine(f"sqlite:///{isolated_data_dir / 'ghostloop.db'}")
    with Session(engine) as session:
        for completion_id, length in ids:
            row = session.get(Completion, completion_id)
            assert row is not None and row.outcome == "accepted"
            assert row.survival_ratio == 1.0 and row.chars_saved == length
            assert row.survival_window_s is not None and row.survival_window_s < 30
            kinds = set(
                session.scalars(
                    select(FeedbackEvent.kind).where(FeedbackEvent.completion_id == completion_id)
                )
            )
            assert {"accepted", "written", "survival"} <= kinds
    engine.dispose()
    stats = subprocess.run(
        [sys.executable, "-m", "ghostloop", "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stats.returncode == 0, stats.stderr
    rows = [json.loads(line) for line in stats.stdout.splitlines() if line.strip()]
    total = sum(length for _, length in ids) / len(ids)
    assert any(
        row.get("settled") == 3 and row.get("chars_saved_per_completion") == total for row in rows
    ), rows

    # the reader of `ghostloop logs --json` goes away: no traceback, no complaint
    logs = subprocess.Popen(
        [sys.executable, "-m", "ghostloop", "logs", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert logs.stdout is not None and logs.stderr is not None
    logs.stdout.close()
    assert logs.wait(120) in (0, 1)
    assert b"Traceback" not in logs.stderr.read()


def _tcp_message(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps({"jsonrpc": "2.0", **message}).encode()
    sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _tcp_response(sock: socket.socket, wanted: Any) -> dict[str, Any]:
    reader = sock.makefile("rb")
    while True:
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        assert length, "the connection closed"
        message = json.loads(reader.read(length))
        if message.get("id") == wanted:
            return message


def test_a_bad_notification_on_tcp_keeps_the_connection_and_sigint_ends_cleanly(
    tiny_model_dir: Path, tmp_path: Path
):
    for run in range(2):  # SIGINT after serving ended in SIGABRT one run in two
        server = TeamServer(tiny_model_dir, tmp_path / f"team-{run}")
        try:
            log = _serve_badly_then_interrupt(server)
        finally:
            server.stop()  # a no-op once it has exited
        assert "terminate called" not in log and "Traceback" not in log, log[-3000:]


def _serve_badly_then_interrupt(server: TeamServer) -> str:
    """Bad notifications and JSON-RPC inside params on one connection, which must go on
    being served; then SIGINT, which must end the server with exit code 0. Its log."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        _tcp_message(sock, {"id": 1, "method": "initialize", "params": {"capabilities": {}}})
        assert "result" in _tcp_response(sock, 1)
        _tcp_message(sock, {"method": "initialized", "params": {}})
        _tcp_message(sock, {"method": "textDocument/didChange", "params": {"bad": True}})
        _tcp_message(sock, {"method": "textDocument/didOpen"})  # no params at all
        nested = {"x": {"jsonrpc": "2.0", "id": 9, "method": "exit"}}
        _tcp_message(sock, {"id": 2, "method": "ghostloop/status", "params": nested})
        assert _tcp_response(sock, 2)["result"]["state"] in ("starting", "ready")
        uri = "file:///workspace/t.py"
        document = {"uri": uri, "languageId": "python", "version": 1, "text": TEXT}
        _tcp_message(sock, {"method": "textDocument/didOpen", "params": {"textDocument": document}})
        _tcp_message(
            sock, {"id": 3, "method": "textDocument/inlineCompletion", "params": at(uri, END)}
        )
        assert "result" in _tcp_response(sock, 3)
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 0
    return server.log.read_text()
