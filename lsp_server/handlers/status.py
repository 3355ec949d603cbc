"""ghostloop/status: the model, adapter and state an editor shows in its status line."""

from __future__ import annotations

from typing import Any

from lsp_server.protocol import STATUS_REQUEST
from lsp_server.server import GhostloopServer


def register(server: GhostloopServer) -> None:
    @server.feature(STATUS_REQUEST)
    def status(ls: GhostloopServer, params: Any) -> dict[str, Any]:
        status = ls.engine.status()
        if ls.feedback_or_none is not None:
            status["recorder"] = ls.feedback_or_none.status()
        return status
