"""From an LSP request to a finished suggestion: checks, job submission, error mapping."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcRequestCancelled

from ghostloop.models import ModelNotFoundError
from ghostloop.postprocess import CursorContext
from lsp_server.engine import CompletionResult, JobCancelled
from lsp_server.positions import PositionError, lone_surrogate_line, offset_at
from lsp_server.protocol import ACCEPT_COMMAND, ModelUnavailable, ServerCancelled
from lsp_server.session import GhostloopServer

SNIPPETS = 8  # repository snippets retrieved per completion, fitted to the budget after


@dataclass(frozen=True)
class Cursor:
    """A checked cursor: the document's text split at it, and how the client counts units."""

    uri: str
    context: CursorContext
    encoding: str
    language: str


def cursor_at(server: GhostloopServer, uri: str, position: types.Position) -> Cursor:
    """The cursor for a request, or an InvalidParams error saying what is wrong."""
    server.engine  # noqa: B018 - raises ServerNotInitialized before initialize
    session = server.session
    document = session.document(uri)
    if document is None:
        raise JsonRpcInvalidParams(f"document {uri} is not open; send textDocument/didOpen first")
    if (why := session.out_of_sync.get(uri)) is not None:
        raise JsonRpcInvalidParams(
            f"document {uri} is out of sync with the editor ({why}); close and reopen it, "
            "or send its whole text in a didChange"
        )
    text = document.source
    limit = server.settings.serving.max_document_chars
    if len(text) > limit:
        raise JsonRpcInvalidParams(
            f"document {uri} has {len(text)} characters, over max_document_chars={limit}; "
            "Ghostloop does not complete files this large"
        )
    if "\x00" in text:
        raise JsonRpcInvalidParams(
            f"document {uri} looks binary (it contains NUL characters); "
            "Ghostloop completes text files only"
        )
    if (line := lone_surrogate_line(text)) is not None:
        raise JsonRpcInvalidParams(
            f"document {uri} holds a lone UTF-16 surrogate on line {line} (half of a "
            "character, not text); Ghostloop completes valid Unicode text only"
        )
    encoding = session.encoding()
    try:
        offset = offset_at(text, position.line, position.character, encoding)
    except PositionError as error:
        raise JsonRpcInvalidParams(f"bad position in {uri}: {error}") from None
    return Cursor(
        uri, CursorContext(text[:offset], text[offset:]), encoding, document.language_id or ""
    )


async def suggest(server: GhostloopServer, cursor: Cursor) -> CompletionResult:
    """Run one completion job; cancellation of this request stops its generation."""
    if server.team is not None:
        await server.team.check(server)  # the rate limit; a revoked token ends here
    server.feedback.superseded(cursor.uri)
    workspace, prefix = server.workspace_or_none, cursor.context.prefix
    job = server.engine.submit(
        server.job_key(cursor.uri),
        cursor.context,
        server.settings.store.stored_user,
        queue=server.queue_key(cursor.uri),
        snippets=(
            (lambda: workspace.snippets(cursor.uri, prefix, limit=SNIPPETS))
            if workspace is not None
            else None
        ),
        language=cursor.language,
    )
    try:
        result = await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:
        job.cancel("cancelled")
        server.metrics.request("cancelled")
        raise
    except JobCancelled as cancelled:
        server.metrics.request("cancelled")
        if cancelled.reason == "superseded":
            raise ServerCancelled(
                "superseded by a newer completion request for this document"
            ) from None
        raise JsonRpcRequestCancelled(f"completion {cancelled.reason}") from None
    except ModelNotFoundError as error:
        server.metrics.request("error")
        raise ModelUnavailable(str(error)) from None
    except Exception:
        server.metrics.request("error")
        raise
    server.metrics.request(
        "served" if result.text else "empty",
        latency_ms=result.latency_ms,
        adapter=result.adapter_version,
    )
    if result.text:
        client = server.client_info
        server.feedback.served(
            result,
            uri=cursor.uri,
            document=cursor.context.prefix + cursor.context.suffix,
            root_uri=server.root_uri,
            language=cursor.language,
            client_name=client.name if client else "",
            client_version=(client.version or "") if client else "",
            base_model=server.engine.model_name,
        )
    return result


def served_to(server: GhostloopServer, completion_id: str) -> CompletionResult | None:
    """The completion ``completion_id`` if this client's user was served it, else None:
    nobody sends feedback on another user's suggestions."""
    result = server.engine.recent.get(completion_id)
    if result is None or result.user != server.settings.store.stored_user:
        return None
    return result


def accept_command(result: CompletionResult) -> types.Command:
    """The command a client runs when the user takes the whole suggestion."""
    return types.Command(
        title="Accept Ghostloop suggestion",
        command=ACCEPT_COMMAND,
        arguments=[result.completion_id, len(result.text)],
    )
