"""Bytes a typed client would never send, written straight to the server's stdin."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from tests.e2e.conftest import server_env


class RawServer:
    """``ghostloop serve`` on stdio, spoken to in hand-written JSON-RPC frames."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []  # what came while awaiting responses

    @classmethod
    async def start(cls, model: Path, stderr: Path | None = None, **env: str) -> RawServer:
        """The server; its stderr goes to the file ``stderr`` if given (else the test's)."""
        with open(stderr, "wb") if stderr else contextlib.nullcontext() as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ghostloop",
                "serve",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=server_env(model, **env),
            )
        return cls(process)

    def send(self, message: dict[str, Any]) -> None:
        self.send_body(json.dumps({"jsonrpc": "2.0", **message}).encode())

    def send_body(self, body: bytes) -> None:
        self.send_bytes(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def send_bytes(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)

    async def initialize(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """initialize and initialized; returns once the model is ready."""
        init = await self.request(
            "initialize",
            {"processId": None, "capabilities": {}, "initializationOptions": options or {}},
        )
        self.send({"method": "initialized", "params": {}})
        while (await self.request("ghostloop/status", None))["result"]["state"] == "starting":
            await asyncio.sleep(0.05)
        return init

    def open(self, uri: str, text: str) -> None:
        document = {"uri": uri, "languageId": "python", "version": 1, "text": text}
        self.send({"method": "textDocument/didOpen", "params": {"textDocument": document}})

    async def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        length = 0
        while (line := await self.process.stdout.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return json.loads(await self.process.stdout.readexactly(length))

    async def request(self, method: str, params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.send({"id": msg_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.receive(), 60)
            if message.get("id") == msg_id:
                return message
            self.notifications.append(message)

    async def stop(self) -> None:
        await self.request("shutdown", None)
        self.send({"method": "exit"})
        await asyncio.wait_for(self.process.wait(), 20)


async def test_malformed_messages_get_errors_and_the_server_survives(tiny_model_dir: Path):
    server = await RawServer.start(tiny_model_dir)
    uri = "file:///workspace/a.py"
    position_request = {"textDocument": {"uri": uri}, "context": {"triggerKind": 1}}

    server.send(  # a notification before initialize is ignored, not fatal
        {"method": "ghostloop/feedback", "params": {"completionId": "x", "kind": "shown"}}
    )
    early = await server.request(
        "textDocument/inlineCompletion",
        {**position_request, "position": {"line": 0, "character": 0}},
    )
    assert early["error"]["code"] == -32002  # not initialized yet

    init = await server.request("initialize", {"processId": None, "capabilities": {}})
    assert "inlineCompletionProvider" in init["result"]["capabilities"]
    server.send({"method": "initialized", "params": {}})
    while (await server.request("ghostloop/status", None))["result"]["state"] == "starting":
        await asyncio.sleep(0.05)
    text = "def f(self):\n    return self.wor"
    server.send(
        {
            "method": "textDocument/didOpen",
            "params": {
                "textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}
            },
        }
    )

    for bad in ({"line": "one", "character": 0}, {"line": -1, "character": 0}, None):
        reply = await server.request(
            "textDocument/inlineCompletion", {**position_request, "position": bad}
        )
        assert reply["error"]["code"] == -32602, reply
        assert "position" in reply["error"]["message"] or "line" in reply["error"]["message"]
    server.send({"id": "no-params", "method": "ghostloop/status"})  # params may be omitted
    while (reply := await server.receive()).get("id") != "no-params":
        pass
    assert reply["result"]["state"] == "ready"
    unknown = await server.request("ghostloop/noSuchMethod", {})
    assert unknown["error"]["code"] == -32601
    garbage_command = await server.request(
        "workspace/executeCommand", {"command": "ghostloop.accept", "arguments": [{"x": 1}]}
    )
    assert "completion_id: string" in garbage_command["error"]["message"]

    good = await server.request(
        "textDocument/inlineCompletion",
        {**position_request, "position": {"line": 1, "character": 19}},
    )
    assert good["result"]["items"][0]["insertText"].strip()
    await server.stop()
    assert server.process.returncode == 0
