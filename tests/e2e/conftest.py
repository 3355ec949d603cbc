from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from ghostloop.corpus import stdlib_dir

SERVER_COMMAND = [sys.executable, "-m", "ghostloop", "serve"]
StartServer = Callable[..., Awaitable[LanguageClient]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.path):
            item.add_marker(pytest.mark.e2e)


def server_env(model: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["GHOSTLOOP_MODEL"] = str(model)
    env["GHOSTLOOP_LOG_LEVEL"] = "INFO"
    # `make test` runs the server's own end-to-end tests a second time on onnxruntime
    env["GHOSTLOOP_BACKEND"] = os.environ.get("GHOSTLOOP_TEST_BACKEND", "torch")
    env.update(extra)
    return env


async def wait_ready(client: LanguageClient, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.protocol.send_request_async("ghostloop/status", None)
        if status.state != "starting" or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def start_server(tiny_model_dir: Path) -> AsyncIterator[StartServer]:
    """Start real ``ghostloop serve`` processes behind pytest-lsp clients; all stopped after."""
    clients: list[LanguageClient] = []

    async def start(
        *,
        model: Path | None = None,
        options: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        ready: bool = True,
    ) -> LanguageClient:
        config = ClientServerConfig(
            server_command=SERVER_COMMAND,
            server_env=server_env(model or tiny_model_dir, **(env or {})),
        )
        client = await config.start()
        clients.append(client)
        client.initialize_result = await client.initialize_session(
            types.InitializeParams(
                capabilities=client_capabilities("visual-studio-code"),
                client_info=types.ClientInfo(name="pytest-lsp", version="1"),
                initialization_options=options or {},
            )
        )
        if ready:
            status = await wait_ready(client)
            assert status.state == "ready", status
        return client

    yield start
    for client in clients:
        if not client.stopped:
            # a test may have left the server unable to answer
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.shutdown_session(), 10)
        await client.stop()


def open_document(
    client: LanguageClient, text: str, name: str = "example.py", version: int = 1
) -> str:
    uri = f"file:///workspace/{name}"
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(
                uri=uri, language_id="python", version=version, text=text
            )
        )
    )
    return uri


def inline_params(uri: str, line: int, character: int) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Invoked
        ),
    )


def sample_source() -> str:
    return (stdlib_dir() / "shlex.py").read_text(encoding="utf-8")
