"""ghostloop/feedback: the client says a suggestion was shown, rejected or dismissed.

A notification has no response, so bad input is reported back as a warning in the
client's log (window/logMessage) and changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from lsprotocol import types

from lsp_server.protocol import FEEDBACK_NOTIFICATION, param
from lsp_server.recording import FEEDBACK_KINDS
from lsp_server.session import GhostloopServer
from lsp_server.suggestions import served_to

log = logging.getLogger(__name__)
OPEN_FATES = (None, "pending", "shown")


def register(server: GhostloopServer) -> None:
    @server.feature(FEEDBACK_NOTIFICATION)
    def feedback(ls: GhostloopServer, params: Any) -> None:
        completion_id, kind = param(params, "completionId"), param(params, "kind")
        problem = None
        if not isinstance(completion_id, str) or kind not in FEEDBACK_KINDS:
            problem = (
                f"{FEEDBACK_NOTIFICATION} needs completionId (string) and kind "
                f"({' | '.join(FEEDBACK_KINDS)}), got {completion_id!r}, {kind!r}"
            )
        elif served_to(ls, completion_id) is None:
            problem = f"{FEEDBACK_NOTIFICATION}: unknown completion id {completion_id!r}"
        elif (fate := ls.feedback.fate(completion_id)) not in OPEN_FATES:
            problem = f"{FEEDBACK_NOTIFICATION}: completion {completion_id} was already {fate}"
        if problem:
            log.warning(problem)
            ls.window_log_message(
                types.LogMessageParams(type=types.MessageType.Warning, message=problem)
            )
            return
        ls.feedback.signal(completion_id, kind)
