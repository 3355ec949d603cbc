"""Property-based tests over the server's handlers: sequences of LSP messages built from
lsprotocol's types, valid and mutated, dispatched to a real server (the tiny model, a real
SQLite store) exactly as the stdio and TCP transports dispatch them.

Whatever the messages: every request with an id is answered exactly once, never with an
internal error, no id that was not sent is answered, nothing pops up in the editor, and
the server's text of each document stays the client's after every valid edit."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lsprotocol import types
from lsprotocol.converters import get_converter

from ghostloop.settings import Settings
from lsp_server.server import create_server
from lsp_server.session import GhostloopServer
from lsp_server.transport import dispatch
from tests.unit.test_positions import boundaries, reference_position

CONVERTER = get_converter()
PIECES = ["a", "x = 1", "    return self.", "é", "😀", " ", "\t", "\n", "\r\n", "\r", "\f"]
PIECES += ["\x0b", "\x1c", "\x85", "\u2028", "\u2029"]
ODD: list[Any] = [None, -1, 2**64, 1.5, True, "", "\ud800", [], {}, "x" * 50]
ODD += [{"jsonrpc": "2.0", "id": 999_999, "method": "ghostloop/status"}]
URIS = ["file:///fuzz/a.py", "file:///fuzz/b%20c.py"]


class Capture:
    """pygls's writer: every message the server sends, parsed."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        _, _, body = data.partition(b"\r\n\r\n")
        with self._lock:
            self.messages.append(json.loads(body))
            self.history.append(json.loads(body))

    def close(self) -> None:
        pass

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            taken, self.messages = self.messages, []
        return taken


class LiveServer:
    """A real server on an event loop of its own thread, fed parsed messages."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.capture = Capture()
        self.server: GhostloopServer = self.call(lambda: create_server(settings))
        self.server.protocol.set_writer(self.capture)  # type: ignore[arg-type]
        self.ids = 0
        self.sent_log: list[dict[str, Any]] = []
        self.texts: dict[str, str] = {}
        self.versions: dict[str, int] = {}

    def call(self, function: Any) -> Any:
        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(60)

    def send(self, message: dict[str, Any]) -> None:
        self.sent_log.append(message)
        self.call(lambda: dispatch(self.server.protocol, json.loads(json.dumps(message))))

    def request(self, method: str, params: Any) -> Any:
        self.ids += 1
        self.send({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})
        return self.ids

    def answers(self, wanted: set[Any], timeout_s: float = 60) -> list[dict[str, Any]]:
        """Everything sent until each id in ``wanted`` is answered (or the time is up)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen += self.capture.take()
            if wanted <= {m.get("id") for m in seen if "method" not in m}:
                break
            time.sleep(0.002)
        self.call(lambda: None)  # anything the last handlers sent
        return seen + self.capture.take()

    def settle(self) -> None:
        """Wait for the answers to every request sent so far, and forget them."""
        self.answers({m["id"] for m in self.sent_log if "id" in m} - self.answered)
        self.capture.take()

    @property
    def answered(self) -> set[Any]:
        return {m.get("id") for m in self.capture.history if "method" not in m}

    def close(self) -> None:
        self.call(self.server.close_session)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("fuzz-data")
    settings = Settings.of(
        model=str(tiny_model_dir),
        data_dir=data,
        max_new_tokens=4,
        deadline_ms=60_000,
        adapter_poll_s=0,
        survival_windows_s="0.05,0.1",
    )
    server = LiveServer(settings)
    server.request("initialize", {"processId": None, "capabilities": {}})
    server.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    assert server.server.engine.wait_ready(120)
    for uri in URIS:
        open_document(server, uri, "def f(self):\n    return self.wor")
    server.answers({1})
    yield server
    server.close()


def open_document(server: LiveServer, uri: str, text: str) -> None:
    server.texts[uri], server.versions[uri] = text, 1
    item = types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
    params = CONVERTER.unstructure(types.DidOpenTextDocumentParams(text_document=item))
    server.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": params})


texts = st.lists(st.sampled_from(PIECES), max_size=10).map("".join)


@st.composite
def valid_edit(draw: st.DrawFn, text: str) -> tuple[int, int, str]:
    """(start, end, new text) at offsets a client can name."""
    offsets = boundaries(text)
    start, end = sorted(draw(st.lists(st.sampled_from(offsets), min_size=2, max_size=2)))
    return start, end, draw(texts)


def mutate(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with a field dropped, replaced by an odd value, or left as it is."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["drop", "odd", "deeper", "keep"]))
        if action == "drop":
            return {k: v for k, v in value.items() if k != key}
        if action == "odd":
            return {**value, key: draw(st.sampled_from(ODD))}
        if action == "deeper":
            return {**value, key: mutate(draw, value[key])}
        return value
    if draw(st.booleans()):
        return draw(st.sampled_from(ODD))
    return value


ACTIONS = ["edit", "complete", "classic", "state", "accept", "feedback", "mutant", "cancel"]
MUTANTS: list[tuple[str, Any]] = [
    (
        "textDocument/inlineCompletion",
        {
            "textDocument": {"uri": URIS[0]},
            "position": {"line": 0, "character": 0},
            "context": {"triggerKind": 1},
        },
    ),
    (
        "textDocument/didChange",
        {
            "textDocument": {"uri": "file:///fuzz/scratch.py", "version": 2},
            "contentChanges": [{"text": "x"}],
        },
    ),
    (
        "textDocument/didOpen",
        {
            "textDocument": {
                "uri": "file:///fuzz/scratch.py",
                "languageId": "python",
                "version": 1,
                "text": "x",
            }
        },
    ),
    ("workspace/executeCommand", {"command": "ghostloop.accept", "arguments": ["0" * 32, 1]}),
    ("ghostloop/feedback", {"completionId": "0" * 32, "kind": "shown"}),
    ("ghostloop/status", None),
    ("initialize", {"processId": None, "capabilities": {}}),
    ("ghostloop/documentState", {"textDocument": {"uri": URIS[1]}}),
]
NOTIFIED = ("textDocument/didChange", "textDocument/didOpen", "ghostloop/feedback")


def keep_served(message: dict[str, Any], served: list[tuple[str, int]]) -> None:
    """Remember the completions a message served, for accepts and feedback later."""
    result = message.get("result")
    items = result.get("items", []) if isinstance(result, dict) else []
    for item in items:
        arguments = (item.get("command") or {}).get("arguments") or []
        if len(arguments) == 2:
            served.append((arguments[0], arguments[1]))


def position(text: str, offset: int) -> types.Position:
    return reference_position(text, offset)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_message_sequence_is_answered_once_and_keeps_the_documents(
    live: LiveServer, data: st.DataObject
) -> None:
    server = live
    sent: set[Any] = set()
    served: list[tuple[str, int]] = []
    messages: list[dict[str, Any]] = []
    # Every draw depends on earlier draws only (Hypothesis replays them): each example opens
    # its documents anew, and picks among what was served by a drawn number.
    server.settle()  # a failed example may have left answers in flight
    for uri in URIS:
        open_document(server, uri, "def f(self):\n    " + data.draw(texts))
    steps = data.draw(st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=8))
    for action in steps:
        uri = data.draw(st.sampled_from(URIS))
        text = server.texts[uri]
        if action == "edit":
            start, end, new = data.draw(valid_edit(text))
            change = types.TextDocumentContentChangePartial(
                range=types.Range(start=position(text, start), end=position(text, end)),
                text=new,
            )
            server.versions[uri] += 1
            params = types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(
                    uri=uri, version=server.versions[uri]
                ),
                content_changes=[change],
            )
            server.texts[uri] = text[:start] + new + text[end:]
            server.send(
                {
                    "jsonrpc": "2.0",
                    "method": "textDocument/didChange",
                    "params": CONVERTER.unstructure(params),
                }
            )
        elif action in ("complete", "classic"):
            offset = data.draw(st.integers(0, len(text)))
            where = position(text, offset)
            method, params_type = (
                ("textDocument/inlineCompletion", types.InlineCompletionParams)
                if action == "complete"
                else ("textDocument/completion", types.CompletionParams)
            )
            invoked = types.InlineCompletionTriggerKind.Invoked
            extra = (
                {"context": types.InlineCompletionContext(trigger_kind=invoked)}
                if action == "complete"
                else {}
            )
            params = params_type(
                text_document=types.TextDocumentIdentifier(uri=uri), position=where, **extra
            )
            sent.add(server.request(method, CONVERTER.unstructure(params)))
        elif action == "state":
            sent.add(server.request("ghostloop/documentState", {"textDocument": {"uri": uri}}))
        elif action == "accept":
            pick, extra = data.draw(st.integers(0, 2**16)), data.draw(st.integers(-1, 1))
            if not served:
                continue
            completion_id, length = served[pick % len(served)]
            arguments = [completion_id, min(length, pick % (length + 1)) + extra]
            params = types.ExecuteCommandParams(command="ghostloop.accept", arguments=arguments)
            sent.add(server.request("workspace/executeCommand", CONVERTER.unstructure(params)))
        elif action == "feedback":
            pick = data.draw(st.integers(0, 2**16))
            kind = data.draw(st.sampled_from(["shown", "rejected", "dismissed", "bogus"]))
            if not served:
                continue
            completion_id, _ = served[pick % len(served)]
            server.send(
                {
                    "jsonrpc": "2.0",
                    "method": "ghostloop/feedback",
                    "params": {"completionId": completion_id, "kind": kind},
                }
            )
        elif action == "cancel":
            server.send(
                {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": server.ids}}
            )
        elif action == "mutant":
            method, params = data.draw(st.sampled_from(MUTANTS))
            params = mutate(data.draw, params)
            if data.draw(st.integers(0, 9)) == 0:  # params that are no object at all
                params = data.draw(st.sampled_from(ODD))
            if method not in NOTIFIED and data.draw(st.booleans()):
                sent.add(server.request(method, params))
            else:
                server.send({"jsonrpc": "2.0", "method": method, "params": params})
        for message in server.answers(set()):
            keep_served(message, served)
            messages.append(message)
    for uri in URIS:
        sent.add(server.request("ghostloop/documentState", {"textDocument": {"uri": uri}}))
    answered = {m.get("id") for m in messages if "method" not in m}
    messages += server.answers(sent - answered)
    answers = [m for m in messages if "method" not in m]
    ids = [m.get("id") for m in answers]
    assert sorted(ids) == sorted(set(ids)), "a request answered twice"
    assert set(ids) <= sent, f"answers to ids never sent: {set(ids) - sent}"
    assert sent <= set(ids), f"unanswered: {sent - set(ids)}"
    internal = [m for m in answers if (m.get("error") or {}).get("code") == -32603]
    assert not internal, internal
    assert not [m for m in messages if m.get("method") == "window/showMessage"]
    states = {
        m["result"]["uri"]: m["result"]
        for m in answers
        if isinstance(m.get("result"), dict) and "sha256" in m["result"]
    }
    for uri in URIS:
        expected = hashlib.sha256(server.texts[uri].encode("utf-8", "surrogatepass")).hexdigest()
        assert states[uri]["sha256"] == expected and states[uri]["outOfSync"] is None
