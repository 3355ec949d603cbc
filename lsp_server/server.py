"""The Ghostloop language server: a pygls server whose handlers live in ``handlers/``."""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import cattrs
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcServerNotInitialized
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol, lsp_method

from feedback.prometheus import ServerMetrics
from ghostloop import __version__
from ghostloop.settings import Settings
from lsp_server.adapter_watch import AdapterWatcher
from lsp_server.engine import CompletionEngine
from lsp_server.recording import FeedbackLog

if TYPE_CHECKING:
    from lsp_server.team import Connection, Team

log = logging.getLogger(__name__)
_ANSWERED = object()


class GhostloopProtocol(LanguageServerProtocol):
    """pygls's protocol, but a request whose params do not parse gets an error response.

    pygls 2.1 logs such a request and never answers it, which leaves the client waiting.
    It also cannot read a request without ``params``, which JSON-RPC allows.
    """

    def structure_message(self, data: dict[str, Any]) -> Any:
        if "method" in data and "params" not in data:
            # JSON-RPC lets a request omit params (Neovim does for nil); pygls needs the key.
            data = {**data, "params": None}
        try:
            return super().structure_message(data)
        except JsonRpcException as error:
            if "id" not in data or "method" not in data:
                raise
            cause = error.__cause__
            details = (
                "; ".join(cattrs.transform_error(cause))
                if isinstance(cause, cattrs.ClassValidationError)
                else str(cause)
            )
            self._send_response(
                data["id"],
                error=types.ResponseError(
                    code=error.code,
                    message=f"invalid params for {data['method']}: {details}",
                ),
            )
            return _ANSWERED

    def handle_message(self, message: Any) -> None:
        if message is not _ANSWERED:
            super().handle_message(message)

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(
        self, params: types.DidOpenTextDocumentParams
    ) -> Generator[Any, Any, None]:
        """Open the document unless the connection holds max_open_documents already."""
        server = self._server
        assert isinstance(server, GhostloopServer)
        documents = self.workspace.text_documents
        cap = server.settings.max_open_documents
        uri = params.text_document.uri
        if uri not in documents and len(documents) >= cap:
            message = (
                f"{len(documents)} documents are open on this connection, the most "
                f"max_open_documents={cap} allows: {uri} gets no completions until "
                "another document is closed"
            )
            log.warning("%s", message)
            server.window_show_message(
                types.ShowMessageParams(type=types.MessageType.Warning, message=message)
            )
            return
        yield from super().lsp_text_document__did_open(params)


class GhostloopServer(LanguageServer):
    """Holds the settings of this session and the completion engine made at initialize."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            "ghostloop",
            __version__,
            text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
            protocol_cls=GhostloopProtocol,
        )
        self.base_settings = settings
        self.settings = settings
        self.engine_or_none: CompletionEngine | None = None
        self.feedback_or_none: FeedbackLog | None = None
        self.adapters_or_none: AdapterWatcher | None = None
        self.client_info: types.ClientInfo | None = None
        self.root_uri: str | None = None
        self.metrics = ServerMetrics()
        # On a team server (lsp_server.team) each connection has its own server object;
        # these say which connection and what the connections share.
        self.team: Team | None = None
        self.connection: Connection | None = None

    def job_key(self, uri: str) -> str:
        """The engine's key for a document: URIs of different connections may coincide."""
        return uri if self.connection is None else f"{self.connection.id} {uri}"

    def queue_key(self, uri: str) -> str:
        """Whose turn a job takes: the document's alone, or its connection's on a team."""
        return uri if self.connection is None else self.connection.id

    @property
    def engine(self) -> CompletionEngine:
        if self.engine_or_none is None:
            raise JsonRpcServerNotInitialized("send 'initialize' before any other request")
        return self.engine_or_none

    @property
    def adapters(self) -> AdapterWatcher:
        if self.adapters_or_none is None:
            raise JsonRpcServerNotInitialized("send 'initialize' before any other request")
        return self.adapters_or_none

    @property
    def feedback(self) -> FeedbackLog:
        if self.feedback_or_none is None:
            raise JsonRpcServerNotInitialized("send 'initialize' before any other request")
        return self.feedback_or_none


def start_serving(
    settings: Settings, metrics: ServerMetrics
) -> tuple[CompletionEngine, AdapterWatcher]:
    """The completion engine (loading its model in the background) and the adapter watcher
    that puts published adapters in force, both started; ``metrics`` follows them."""

    def read_adapters() -> None:  # once the model is loaded: the adapters in force
        watcher.check()

    engine = CompletionEngine(settings, prepare=read_adapters)
    watcher = AdapterWatcher(settings, engine)
    engine.start()
    watcher.start()
    metrics.follow_serving(lambda: engine.serving.describe())
    if settings.metrics_port:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    return engine, watcher


def create_server(settings: Settings) -> GhostloopServer:
    """A server with every feature registered; the caller starts it on stdio or TCP."""
    from lsp_server.handlers import (
        commands,
        completion,
        documents,
        feedback,
        inline_completion,
        lifecycle,
        status,
    )

    server = GhostloopServer(settings)
    for module in (lifecycle, documents, inline_completion, completion, commands, feedback, status):
        module.register(server)
    return server
