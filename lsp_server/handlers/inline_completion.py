"""textDocument/inlineCompletion (LSP 3.18): ghost text at the cursor."""

from __future__ import annotations

from lsprotocol import types

from lsp_server.session import GhostloopServer
from lsp_server.suggestions import accept_command, cursor_at, suggest


def register(server: GhostloopServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(
        ls: GhostloopServer, params: types.InlineCompletionParams
    ) -> types.InlineCompletionList:
        cursor = cursor_at(ls, params.text_document.uri, params.position)
        result = await suggest(ls, cursor)
        if not result.text:
            return types.InlineCompletionList(items=[])
        item = types.InlineCompletionItem(
            insert_text=result.text,
            range=types.Range(start=params.position, end=params.position),
            command=accept_command(result),
        )
        return types.InlineCompletionList(items=[item])
