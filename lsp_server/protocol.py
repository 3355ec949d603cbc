"""Ghostloop's custom LSP surface, in one place (as Tabby's protocol.ts).

Client -> server
- ``workspace/executeCommand`` ``ghostloop.accept``: arguments ``[completion_id: str,
  accepted_length: int]``. Sent by the client when the user accepts an item; every item
  carries this command with the full length, clients send a shorter length for partial
  (word / line) accepts. Length counts characters (code points) of the suggestion.
- notification ``ghostloop/feedback``: ``{"completionId": str, "kind": "shown" |
  "rejected" | "dismissed"}``. Sent when the editor showed, the user rejected (e.g.
  typed something else), or dismissed (Escape) a suggestion. Bad input is answered with a
  warning in the client's log (window/logMessage) and changes nothing. A suggestion that a
  newer request for the same document supersedes without an accept counts as rejected.
- request ``ghostloop/status``: no params. Result: ``{"state": "starting" | "ready" |
  "error", "error": str | null, "model": str | null, "device": str | null,
  "backend": str, "onnx_export": str | null, "template": str | null,
  "adapter": str | null, "queued": int, "stats": {...}}``.
  Editors show it in their status line; tests and benchmarks wait for ``ready``.
  ``"backend"`` is what generates new completions: ``torch``, ``onnxruntime (cpu)``,
  ``onnxruntime int8 (cpu)``; ``"onnx_export"`` (backend auto) ``running`` while torch
  serves and the model is exported, then ``done`` or ``failed: why``.
  ``"adapter"`` is the active adapter version (null: the base model), ``"canary"`` is
  ``{"version", "share"}`` while a canary runs, ``"adapters"`` the watcher's state.
- request ``ghostloop/reloadAdapters``: no params. Reads the adapters table now (instead
  of at the next ``adapter_poll_s``) and puts what it names in force. Result:
  ``{"adapter": str | null, "canary": {...} | null, "swaps": int, "last_read_ms": float |
  null, "refused": [{"version": str, "reason": str}], "error": str | null}``.

- request ``ghostloop/documentState``: ``{"textDocument": {"uri": str}}``. Result:
  ``{"uri": str, "version": int | null, "length": int (UTF-16 code units), "sha256":
  str (of the text as UTF-8), "outOfSync": str | null}``: what the server holds for an
  open document, so a client (or ``bench/fuzz.py``) can check that it is the editor's
  text. ``outOfSync`` says why an edit did not apply; such a document gets no completions
  until its whole text arrives again (didOpen, or a didChange without a range).

Framing and malformed input (stdio and TCP): a frame whose Content-Length is absurd, or
whose body is not a JSON object, is skipped on stdio (reading goes on at the next header)
and closes the connection on TCP. A request whose params do not parse is answered with
``-32602``; a notification whose params do not parse is dropped with a warning in the
client's log. The server's own log reaches the editor as ``window/logMessage`` at each
line's level once the session is initialized (stdio), never as a pop-up.

Error codes a client can meet
- ``-32800`` RequestCancelled: the client cancelled the request.
- ``-32802`` ServerCancelled: a newer completion request for the same document
  superseded this one.
- ``-32602`` InvalidParams: the document is not open or out of sync, the position is
  outside it or splits a character, the document is binary, too large or holds a lone
  surrogate, a command's arguments are bad.
- ``-32600`` InvalidRequest: not a JSON-RPC 2.0 message, or a second ``initialize``
  (which changes nothing).
- ``-32001`` ModelUnavailable: the configured model could not be loaded; the message says
  how to fix it.
- ``-32003`` Unauthorized (team server, ``serve --tcp``): ``initialize`` without a valid
  access token where one is needed, or a revoked token; the connection is closed after
  the response. Anything sent before a successful ``initialize`` gets ``-32002``.
- ``-32803`` RequestFailed: the user's rate limit (``rate_limit_per_minute``) is spent;
  the message says when to retry.
"""

from __future__ import annotations

from typing import Any

from pygls.exceptions import JsonRpcException

ACCEPT_COMMAND = "ghostloop.accept"
STATUS_REQUEST = "ghostloop/status"
RELOAD_ADAPTERS_REQUEST = "ghostloop/reloadAdapters"
FEEDBACK_NOTIFICATION = "ghostloop/feedback"
DOCUMENT_STATE_REQUEST = "ghostloop/documentState"


def param(params: Any, name: str) -> Any:
    """Field ``name`` of a custom method's params: pygls hands them over as a named tuple
    (``Object``) when they parse as one, as a plain dict otherwise; None if absent."""
    if isinstance(params, dict):
        return params.get(name)
    return getattr(params, name, None)


MODEL_UNAVAILABLE = -32001
SERVER_CANCELLED = -32802
UNAUTHORIZED = -32003
REQUEST_FAILED = -32803


class ServerCancelled(JsonRpcException):
    """LSP 3.17 ServerCancelled: the server dropped the request (a newer one replaced it)."""

    CODE = SERVER_CANCELLED
    MESSAGE = "Server Cancelled"


class ModelUnavailable(JsonRpcException):
    """The model could not be loaded; the message names the fix."""

    CODE = MODEL_UNAVAILABLE
    MESSAGE = "Model Unavailable"


class Unauthorized(JsonRpcException):
    """A team server refused the client: no token, a wrong one, or a revoked one."""

    CODE = UNAUTHORIZED
    MESSAGE = "Unauthorized"


class RateLimited(JsonRpcException):
    """LSP RequestFailed: the user asked for more completions than their rate limit."""

    CODE = REQUEST_FAILED
    MESSAGE = "Rate limited"
