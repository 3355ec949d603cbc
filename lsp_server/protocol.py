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
  "template": str | null, "adapter": str | null, "queued": int, "stats": {...}}``.
  Editors show it in their status line; tests and benchmarks wait for ``ready``.
  ``"adapter"`` is the active adapter version (null: the base model), ``"canary"`` is
  ``{"version", "share"}`` while a canary runs, ``"adapters"`` the watcher's state.
- request ``ghostloop/reloadAdapters``: no params. Reads the adapters table now (instead
  of at the next ``adapter_poll_s``) and puts what it names in force. Result:
  ``{"adapter": str | null, "canary": {...} | null, "swaps": int, "last_read_ms": float |
  null, "refused": [{"version": str, "reason": str}], "error": str | null}``.

Error codes a client can meet
- ``-32800`` RequestCancelled: the client cancelled the request.
- ``-32802`` ServerCancelled: a newer completion request for the same document
  superseded this one.
- ``-32602`` InvalidParams: the document is not open, the position is outside it or
  splits a character, the document is binary or too large, a command's arguments are bad.
- ``-32001`` ModelUnavailable: the configured model could not be loaded; the message says
  how to fix it.
- ``-32003`` Unauthorized (team server, ``serve --tcp``): ``initialize`` without a valid
  access token where one is needed, or a revoked token; the connection is closed after
  the response. Anything sent before a successful ``initialize`` gets ``-32002``.
- ``-32803`` RequestFailed: the user's rate limit (``rate_limit_per_minute``) is spent;
  the message says when to retry.
"""

from __future__ import annotations

from pygls.exceptions import JsonRpcException

ACCEPT_COMMAND = "ghostloop.accept"
STATUS_REQUEST = "ghostloop/status"
RELOAD_ADAPTERS_REQUEST = "ghostloop/reloadAdapters"
FEEDBACK_NOTIFICATION = "ghostloop/feedback"

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
