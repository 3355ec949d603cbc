"""didChange / didClose: pygls keeps the text; we follow suggestions' regions through it."""

from __future__ import annotations

from lsprotocol import types

from lsp_server.server import GhostloopServer


def register(server: GhostloopServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: GhostloopServer, params: types.DidChangeTextDocumentParams) -> None:
        uri = params.text_document.uri
        document = ls.workspace.text_documents.get(uri)
        if document is not None and ls.feedback_or_none is not None:
            ls.feedback_or_none.changed(uri, document.source)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: GhostloopServer, params: types.DidCloseTextDocumentParams) -> None:
        if ls.feedback_or_none is not None:
            ls.feedback_or_none.closed(params.text_document.uri)
        if ls.engine_or_none is not None:
            ls.engine_or_none.forget(ls.job_key(params.text_document.uri))
