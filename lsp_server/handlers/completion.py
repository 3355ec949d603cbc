"""textDocument/completion, for clients without inline completion (Eglot, Helix, ...).

Such clients filter items by the word before the cursor, so the item replaces that word
(``textEdit``) and its ``filterText`` starts with it (docs/architecture.md, "Clients").
"""

from __future__ import annotations

import re

from lsprotocol import types

from lsp_server.positions import code_units
from lsp_server.session import GhostloopServer
from lsp_server.suggestions import accept_command, cursor_at, suggest

# Only a run's first character may start the match: r"\w+\Z" alone tried every position
# of a long word and was quadratic in the line (a 60k-character line blocked the loop 11 s).
_WORD_AT_END = re.compile(r"(?<!\w)\w+\Z")
LABEL_CHARS = 80


def register(server: GhostloopServer) -> None:
    @server.feature(
        types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", " "])
    )
    async def completion(
        ls: GhostloopServer, params: types.CompletionParams
    ) -> types.CompletionList:
        cursor = cursor_at(ls, params.text_document.uri, params.position)
        result = await suggest(ls, cursor)
        if not result.text:
            return types.CompletionList(is_incomplete=True, items=[])
        match = _WORD_AT_END.search(cursor.context.line_prefix)
        typed = match.group(0) if match else ""
        start = types.Position(
            line=params.position.line,
            character=params.position.character - code_units(typed, cursor.encoding),
        )
        new_text = typed + result.text
        item = types.CompletionItem(
            label=new_text.split("\n", 1)[0][:LABEL_CHARS] or new_text.strip()[:LABEL_CHARS],
            kind=types.CompletionItemKind.Text,
            detail="Ghostloop",
            documentation=types.MarkupContent(
                kind=types.MarkupKind.Markdown, value=f"```\n{new_text}\n```"
            ),
            sort_text="0",
            filter_text=new_text,
            insert_text_format=types.InsertTextFormat.PlainText,
            text_edit=types.TextEdit(
                range=types.Range(start=start, end=params.position), new_text=new_text
            ),
            command=accept_command(result),
        )
        return types.CompletionList(is_incomplete=True, items=[item])
