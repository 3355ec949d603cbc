"""One client's session: its protocol (documents, their sync state, the LSP's rules) and
the server object pygls hands every handler, with what the session serves through.

Handlers import this module, never ``lsp_server.server`` (which builds and registers
them), so the two never import each other. On a team server each TCP connection has its
own session; what the connections share is reached through ``TeamRules``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidRequest, JsonRpcServerNotInitialized
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol, lsp_method
from pygls.workspace import TextDocument

from feedback.prometheus import ServerMetrics
from ghostloop import __version__
from ghostloop.settings import Settings
from lsp_server.adapter_watch import AdapterWatcher
from lsp_server.engine import CompletionEngine
from lsp_server.positions import PositionError, apply_change
from lsp_server.recording import FeedbackLog
from lsp_server.workspace import Workspace, path_of

log = logging.getLogger(__name__)


@dataclass
class Connection:
    """One client's TCP connection."""

    id: str
    peer: str
    loopback: bool
    writer: asyncio.StreamWriter
    user: str | None = None  # set once admitted
    token_digest: str | None = None
    token_checked_at: float = 0.0
    refused: str | None = None  # why it is being closed
    opened_at: float = field(default_factory=time.monotonic)


class TeamRules(Protocol):
    """What a session on a team server asks of the team (``lsp_server.team.Team``)."""

    def admit(self, server: GhostloopServer, params: types.InitializeParams) -> None: ...

    async def check(self, server: GhostloopServer) -> None: ...

    def release(self, server: GhostloopServer) -> None: ...

    def status(self) -> dict[str, Any]: ...


class GhostloopProtocol(LanguageServerProtocol):
    """pygls's protocol with the document rules of the LSP rather than of Python.

    - A request may omit ``params``, which JSON-RPC allows (Neovim does for nil).
    - A second ``initialize`` is refused and changes nothing (pygls made a new, empty
      workspace for it, dropping every open document).
    - ``didChange`` is applied with the LSP's line breaks (``lsp_server.positions``), not
      ``str.splitlines``; an edit whose range is not in the document leaves it out of
      sync, and it gets no completions until the client sends its whole text again.
    - A connection holds at most ``max_open_documents``.
    """

    def __init__(self, server: Any, converter: Any) -> None:
        super().__init__(server, converter)
        self.initialized = False
        self.out_of_sync: dict[str, str] = {}  # uri -> why its text is not the client's

    def structure_message(self, data: dict[str, Any]) -> Any:
        if "method" in data and "params" not in data:
            data = {**data, "params": None}
        return super().structure_message(data)

    def document(self, uri: str) -> TextDocument | None:
        """The open document ``uri`` (pygls keys them by the unquoted URI)."""
        return self.workspace.text_documents.get(unquote(uri))

    def encoding(self) -> str:
        """The position encoding agreed at initialize (utf-16 unless the client chose)."""
        negotiated = self.workspace.position_encoding or "utf-16"
        return str(getattr(negotiated, "value", negotiated))  # an enum member or a plain str

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(
        self, params: types.InitializeParams
    ) -> Generator[Any, Any, types.InitializeResult]:
        if self.initialized:
            raise JsonRpcInvalidRequest(
                "this session is initialized already; to start over send shutdown and "
                "exit, then start a new session"
            )
        result = yield from super().lsp_initialize(params)
        self.initialized = True
        return result

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(
        self, params: types.DidOpenTextDocumentParams
    ) -> Generator[Any, Any, None]:
        """Open the document unless the connection holds max_open_documents already."""
        server = self._server
        assert isinstance(server, GhostloopServer)
        documents = self.workspace.text_documents
        cap = server.settings.team.max_open_documents
        uri = params.text_document.uri
        if self.document(uri) is None and len(documents) >= cap:
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
        self.out_of_sync.pop(uri, None)
        yield from super().lsp_text_document__did_open(params)
        if server.workspace_or_none is not None:
            server.workspace_or_none.opened(uri, params.text_document.text)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(
        self, params: types.DidChangeTextDocumentParams
    ) -> Generator[Any, Any, None]:
        uri = params.text_document.uri
        document = self.document(uri)
        if document is None:
            log.warning("didChange for %s, which is not open: ignored (send didOpen first)", uri)
            return
        text = document.source
        for number, change in enumerate(params.content_changes):
            if isinstance(change, types.TextDocumentContentChangeWholeDocument):
                text = change.text
                self.out_of_sync.pop(uri, None)
            elif uri not in self.out_of_sync:
                try:
                    text = apply_change(text, change, self.encoding())
                except PositionError as error:
                    version = params.text_document.version
                    why = f"change {number} of version {version} did not apply: {error}"
                    self.out_of_sync[uri] = why
                    log.warning(
                        "%s is out of sync: %s; it gets no completions until it is reopened",
                        uri,
                        why,
                    )
        document.apply_change(types.TextDocumentContentChangeWholeDocument(text=text))
        document.version = params.text_document.version
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(
        self, params: types.DidCloseTextDocumentParams
    ) -> Generator[Any, Any, None]:
        self.out_of_sync.pop(params.text_document.uri, None)
        yield from super().lsp_text_document__did_close(params)


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
        self.workspace_or_none: Workspace | None = None  # with repo_context_tokens above 0
        self.metrics = ServerMetrics()
        self.closed = False
        # On a team server (lsp_server.team) each connection has its own server object;
        # these say which connection and what the connections share.
        self.team: TeamRules | None = None
        self.connection: Connection | None = None

    def job_key(self, uri: str) -> str:
        """The engine's key for a document: URIs of different connections may coincide."""
        return uri if self.connection is None else f"{self.connection.id} {uri}"

    def queue_key(self, uri: str) -> str:
        """Whose turn a job takes: the document's alone, or its connection's on a team."""
        return uri if self.connection is None else self.connection.id

    @property
    def session(self) -> GhostloopProtocol:
        """This connection's protocol: its documents and their sync state."""
        assert isinstance(self.protocol, GhostloopProtocol)
        return self.protocol

    def report_server_error(self, error: Exception, source: Any) -> None:
        """A failed notification handler: logged (a warning in the editor's log), never a
        pop-up; failed requests are answered with their error already."""
        log.warning("%s: %s", getattr(source, "__name__", source), error)

    def close_session(self) -> None:
        """The session ends (shutdown, exit, or the client went away): what accepted
        suggestions kept is measured once more and recorded, then everything stops. A
        team connection releases its own work only. Safe to call more than once."""
        if self.workspace_or_none is not None:
            self.workspace_or_none.stop()
        if self.team is not None and self.connection is not None:
            self.team.release(self)
            return
        if self.closed:
            return
        self.closed = True
        if self.adapters_or_none is not None:
            self.adapters_or_none.stop()
        if self.engine_or_none is not None:
            self.engine_or_none.stop()
        if self.feedback_or_none is not None:
            self.feedback_or_none.close()  # everything recorded is in the store or the journal
        self.metrics.close()

    def open_workspace(self, params: types.InitializeParams) -> None:
        """The repository for prompts (``repo_context_tokens`` above 0): the workspace's
        files on disk under the client's root, if this machine has it, and the open
        documents, indexed in the background."""
        if not self.settings.context.repo_context_tokens or self.workspace_or_none is not None:
            return
        uri = params.root_uri
        if uri is None and params.workspace_folders:
            uri = params.workspace_folders[0].uri
        path = path_of(uri) if uri else None
        try:
            root = path.resolve() if path is not None else None
        except (OSError, RuntimeError):  # a symlink loop in the root's own path
            root = None

        def busy() -> bool:
            return self.engine_or_none is not None and self.engine_or_none.busy()

        self.workspace_or_none = Workspace(self.settings.context, root, busy=busy)
        self.workspace_or_none.start()

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
