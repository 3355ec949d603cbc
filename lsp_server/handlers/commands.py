"""workspace/executeCommand ghostloop.accept: the client says a suggestion was taken."""

from __future__ import annotations

import logging
from typing import Any

from pygls.exceptions import JsonRpcInvalidParams

from lsp_server.protocol import ACCEPT_COMMAND
from lsp_server.session import GhostloopServer
from lsp_server.suggestions import served_to

log = logging.getLogger(__name__)


def _parse_accept(arguments: Any) -> tuple[str, int | None]:
    args = list(arguments or [])
    if not args or not isinstance(args[0], str) or len(args) > 2:
        raise JsonRpcInvalidParams(
            f"{ACCEPT_COMMAND} takes [completion_id: string, accepted_length?: integer], "
            f"got {args!r}"
        )
    length = args[1] if len(args) == 2 else None
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
        raise JsonRpcInvalidParams(f"accepted_length must be an integer, got {length!r}")
    return args[0], length


def register(server: GhostloopServer) -> None:
    @server.command(ACCEPT_COMMAND)
    def accept(ls: GhostloopServer, *arguments: Any) -> None:
        completion_id, length = _parse_accept(arguments)
        result = served_to(ls, completion_id)
        if result is None:
            raise JsonRpcInvalidParams(
                f"unknown completion id {completion_id!r}: this server never served it to you"
            )
        full = len(result.text)
        length = full if length is None else length
        if not 0 <= length <= full:
            raise JsonRpcInvalidParams(
                f"accepted_length={length} is outside the suggestion's 0..{full} characters"
            )
        if ls.feedback.fate(completion_id) in ("accepted", "partial"):
            raise JsonRpcInvalidParams(f"completion {completion_id} was already accepted")
        ls.feedback.accepted(completion_id, result.text[:length], partial=length < full)
        ls.engine.stats.accepted += 1
        log.info(
            "accept completion_id=%s accepted_chars=%d of=%d partial=%s",
            completion_id,
            length,
            full,
            length < full,
        )
