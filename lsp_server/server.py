"""The Ghostloop language server: a pygls server whose handlers live in ``handlers/``."""

from __future__ import annotations

from lsprotocol import types
from pygls.exceptions import JsonRpcServerNotInitialized
from pygls.lsp.server import LanguageServer

from ghostloop import __version__
from ghostloop.settings import Settings
from lsp_server.engine import CompletionEngine


class GhostloopServer(LanguageServer):
    """Holds the settings of this session and the completion engine made at initialize."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            "ghostloop",
            __version__,
            text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
        )
        self.base_settings = settings
        self.settings = settings
        self.engine_or_none: CompletionEngine | None = None

    @property
    def engine(self) -> CompletionEngine:
        if self.engine_or_none is None:
            raise JsonRpcServerNotInitialized("send 'initialize' before any other request")
        return self.engine_or_none


def create_server(settings: Settings) -> GhostloopServer:
    """A server with every feature registered; the caller starts it on stdio or TCP."""
    from lsp_server.handlers import commands, completion, inline_completion, lifecycle, status

    server = GhostloopServer(settings)
    for module in (lifecycle, inline_completion, completion, commands, status):
        module.register(server)
    return server
