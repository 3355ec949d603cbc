"""A typed LSP client that starts ``ghostloop serve`` and asks it for completions.

Used by the demo, the benchmarks and tests: the same protocol path an editor takes.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.io_ import run_async
from pygls.lsp.client import LanguageClient

from lsp_server.protocol import (
    ACCEPT_COMMAND,
    FEEDBACK_NOTIFICATION,
    RELOAD_ADAPTERS_REQUEST,
    STATUS_REQUEST,
)


@dataclass(frozen=True)
class TimedSuggestion:
    """One inline completion as a client saw it."""

    text: str
    completion_id: str | None
    latency_ms: float


class GhostloopClient:
    """A running ``ghostloop serve`` subprocess and a pygls client talking to it."""

    def __init__(self, client: LanguageClient) -> None:
        self.lsp = client
        self._versions: dict[str, int] = {}

    @property
    def pid(self) -> int | None:
        """The server process's id (a server this client started), for the benchmarks'
        memory figures; None over TCP. pygls keeps the process in a private attribute."""
        process = getattr(self.lsp, "_server", None)
        return getattr(process, "pid", None)

    @classmethod
    async def start(
        cls,
        *,
        env: Mapping[str, str] | None = None,
        initialization_options: Mapping[str, Any] | None = None,
        root: Path | None = None,
    ) -> GhostloopClient:
        client = LanguageClient("ghostloop-client", "0.1")
        server_env = dict(os.environ if env is None else env)
        await client.start_io(sys.executable, "-m", "ghostloop", "serve", env=server_env)
        return await cls._initialize(client, initialization_options, root)

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        initialization_options: Mapping[str, Any] | None = None,
        root: Path | None = None,
        name: str = "ghostloop-client",
    ) -> GhostloopClient:
        """A client of a running team server (``ghostloop serve --tcp``), over TLS with
        ``tls``; raises the server's error when it refuses the token."""
        client = LanguageClient(name, "0.1")
        # pygls's start_tcp, with TLS: LanguageClient.start_tcp takes no SSL context
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        client.protocol.set_writer(writer)  # type: ignore[arg-type]
        client._async_tasks.append(
            asyncio.create_task(
                run_async(
                    stop_event=client._stop_event,
                    reader=reader,
                    protocol=client.protocol,
                    error_handler=client.report_server_error,
                )
            )
        )
        options = dict(initialization_options or {})
        if token is not None:
            options["token"] = token
        try:
            return await cls._initialize(client, options, root, name=name)
        except BaseException:
            writer.close()
            await client.stop()
            raise

    @classmethod
    async def _initialize(
        cls,
        client: LanguageClient,
        initialization_options: Mapping[str, Any] | None,
        root: Path | None,
        name: str = "ghostloop-client",
    ) -> GhostloopClient:
        await client.initialize_async(
            types.InitializeParams(
                capabilities=types.ClientCapabilities(),
                client_info=types.ClientInfo(name=name, version="0.1"),
                root_uri=root.resolve().as_uri() if root else None,
                initialization_options=dict(initialization_options or {}),
            )
        )
        client.initialized(types.InitializedParams())
        return cls(client)

    async def status(self) -> dict[str, Any]:
        result = await self.lsp.protocol.send_request_async(STATUS_REQUEST, None)
        return _plain(result)

    async def wait_ready(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """The server's status once its model is loaded; raises if loading failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.status()
            if status["state"] == "ready":
                return status
            if status["state"] == "error":
                raise RuntimeError(f"server could not load its model: {status['error']}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout_s:.0f} s: {status}")
            await asyncio.sleep(0.1)

    def open(self, uri: str, text: str, language_id: str = "python") -> None:
        self._versions[uri] = 1
        self.lsp.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=uri, language_id=language_id, version=1, text=text
                )
            )
        )

    def replace(self, uri: str, text: str) -> None:
        self._versions[uri] += 1
        self.lsp.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(
                    uri=uri, version=self._versions[uri]
                ),
                content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)],
            )
        )

    async def inline(self, uri: str, line: int, character: int) -> TimedSuggestion:
        started = time.perf_counter()
        result = await self.lsp.text_document_inline_completion_async(
            types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(line=line, character=character),
                context=types.InlineCompletionContext(
                    trigger_kind=types.InlineCompletionTriggerKind.Invoked
                ),
            )
        )
        latency_ms = (time.perf_counter() - started) * 1000
        items = result.items if isinstance(result, types.InlineCompletionList) else result or []
        if not items:
            return TimedSuggestion("", None, latency_ms)
        item = items[0]
        text = item.insert_text if isinstance(item.insert_text, str) else item.insert_text.value
        completion_id = (
            item.command.arguments[0] if item.command and item.command.arguments else None
        )
        return TimedSuggestion(text, completion_id, latency_ms)

    async def accept(self, completion_id: str, length: int | None = None) -> None:
        """What an editor does on inserting a suggestion (``length``: a partial accept)."""
        arguments: list[Any] = [completion_id] if length is None else [completion_id, length]
        await self.lsp.workspace_execute_command_async(
            types.ExecuteCommandParams(command=ACCEPT_COMMAND, arguments=arguments)
        )

    def feedback(self, completion_id: str, kind: str) -> None:
        """shown | rejected | dismissed, as ``ghostloop/feedback``."""
        self.lsp.protocol.notify(
            FEEDBACK_NOTIFICATION, {"completionId": completion_id, "kind": kind}
        )

    async def reload_adapters(self) -> dict[str, Any]:
        result = await self.lsp.protocol.send_request_async(RELOAD_ADAPTERS_REQUEST, None)
        return _plain(result)

    async def stop(self) -> None:
        await self.lsp.shutdown_async(None)
        self.lsp.exit(None)
        await self.lsp.stop()


def _plain(value: Any) -> Any:
    """pygls hands custom results back as namespace objects; make them dicts."""
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
