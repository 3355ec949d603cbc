"""The Ghostloop language server: builds a session with every handler of ``handlers/``
registered, and serves it on stdio (``lsp_server.team`` serves TCP)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from typing import BinaryIO

from ghostloop.settings import Settings
from lsp_server.client_log import ClientLog
from lsp_server.handlers import (
    commands,
    completion,
    documents,
    feedback,
    inline_completion,
    lifecycle,
    status,
)
from lsp_server.session import GhostloopServer
from lsp_server.transport import (
    FrameLimits,
    ProtocolViolation,
    StdoutWriter,
    dispatch,
    parse_message,
    read_messages,
    stdin_reader,
)

log = logging.getLogger(__name__)


def create_server(settings: Settings) -> GhostloopServer:
    """A server with every feature registered; the caller starts it on stdio or TCP."""
    server = GhostloopServer(settings)
    for module in (lifecycle, documents, inline_completion, completion, commands, feedback, status):
        module.register(server)
    return server


def serve_stdio(
    server: GhostloopServer, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None
) -> int:
    """Serve one client on stdio until ``exit`` (exit code 0 after shutdown, 1 without,
    as the LSP asks), the end of its input or SIGTERM (0); the session is closed either way
    (``GhostloopServer.close_session``: what accepted suggestions kept is recorded).
    Frames are read by ``lsp_server.transport``; once initialized, the server's log goes
    to the editor (``lsp_server.client_log``)."""
    writer = StdoutWriter(stdout)
    server.protocol.set_writer(writer)  # type: ignore[arg-type]
    limits = FrameLimits(server.settings.team.max_message_bytes)

    async def main() -> None:
        reader = stdin_reader(stdin or sys.stdin.buffer)
        live = lambda: server.session.initialized and not writer.closed  # noqa: E731
        with ClientLog(server.window_log_message, live):
            async for body in read_messages(reader, limits, resync=True):
                try:
                    data = parse_message(body)
                except ProtocolViolation as violation:
                    log.warning("ignored a message: %s", violation)
                    continue
                dispatch(server.protocol, data)
                await asyncio.sleep(0)  # let answers and other work through between messages

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(0)  # an editor's SIGTERM: end as at the end of input, below

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGTERM, terminate)
    try:
        asyncio.run(main())
    except SystemExit as requested:  # pygls's exit handler, or SIGTERM
        code = int(requested.code or 0)
    except KeyboardInterrupt:
        code = 130
    else:
        code = 0  # the client closed the stream: it has gone, nothing failed here
    finally:
        if main_thread:  # a second SIGTERM must not cut the closing short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.close_session()
    return code
