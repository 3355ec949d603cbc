from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from ghostloop.corpus import stdlib_dir
from tests.conftest import TEST_BACKEND

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
    env["GHOSTLOOP_BACKEND"] = TEST_BACKEND
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
        root_uri: str | None = None,
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
                root_uri=root_uri,
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


# The start of a real function, cursor on an empty line of its body: SmolLM2 suggests
# code of several words here, which the editors' word-accept tests need.
LISTING = """import os


def python_files(root):
    \"\"\"The Python files under root.\"\"\"
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(".py"):
                """


def sample_source() -> str:
    return (stdlib_dir() / "shlex.py").read_text(encoding="utf-8")


def listening(port: int) -> bool:
    """Whether a socket listens on ``port`` (Linux: /proc/net/tcp, state 0A)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@pytest.fixture
def tcp_server(tiny_model_dir: Path, isolated_data_dir: Path) -> Iterator[int]:
    """A shared `ghostloop serve --tcp` on loopback, as a team would run it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = dict(os.environ, GHOSTLOOP_MODEL=str(tiny_model_dir), GHOSTLOOP_DEADLINE_MS="120000")
    process = subprocess.Popen(
        [sys.executable, "-m", "ghostloop", "serve", "--tcp", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Watch for the listening socket rather than connect: a probe connection would be a
    # client of its own in the server's log.
    deadline = time.monotonic() + 60
    while not listening(port):
        assert process.poll() is None and time.monotonic() < deadline, "no TCP server"
        time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(10)
