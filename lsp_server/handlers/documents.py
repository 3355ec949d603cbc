"""didChange / didClose: the protocol keeps the text; we follow suggestions' regions
through it. ghostloop/documentState: what the server holds, for clients to check."""

from __future__ import annotations

import hashlib
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from lsp_server.positions import code_units
from lsp_server.protocol import DOCUMENT_STATE_REQUEST, param
from lsp_server.session import GhostloopServer


def register(server: GhostloopServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: GhostloopServer, params: types.DidChangeTextDocumentParams) -> None:
        uri = params.text_document.uri
        document = ls.session.document(uri)
        if document is not None and ls.feedback_or_none is not None:
            ls.feedback_or_none.changed(uri, document.source)
        if document is not None and ls.workspace_or_none is not None:
            ls.workspace_or_none.changed(uri, document.source)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: GhostloopServer, params: types.DidCloseTextDocumentParams) -> None:
        if ls.feedback_or_none is not None:
            ls.feedback_or_none.closed(params.text_document.uri)
        if ls.workspace_or_none is not None:
            ls.workspace_or_none.closed(params.text_document.uri)
        if ls.engine_or_none is not None:
            ls.engine_or_none.forget(ls.job_key(params.text_document.uri))

    @server.feature(DOCUMENT_STATE_REQUEST)
    def document_state(ls: GhostloopServer, params: Any) -> dict[str, Any]:
        uri = param(param(params, "textDocument"), "uri")
        if not isinstance(uri, str):
            raise JsonRpcInvalidParams(
                f"{DOCUMENT_STATE_REQUEST} takes {{textDocument: {{uri: string}}}}, got {params!r}"
            )
        held = ls.session.document(uri)
        if held is None:
            raise JsonRpcInvalidParams(f"document {uri} is not open")
        text = held.source
        return {
            "uri": uri,
            "version": held.version,
            "length": code_units(text, "utf-16"),
            "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
            "outOfSync": ls.session.out_of_sync.get(uri),
        }
