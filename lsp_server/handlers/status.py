"""ghostloop/status: the model, adapter and state an editor shows in its status line;
ghostloop/reloadAdapters: follow the adapters table now rather than at the next poll."""

from __future__ import annotations

import asyncio
from typing import Any

from lsp_server.protocol import RELOAD_ADAPTERS_REQUEST, STATUS_REQUEST, ModelUnavailable
from lsp_server.session import GhostloopServer


def register(server: GhostloopServer) -> None:
    @server.feature(STATUS_REQUEST)
    def status(ls: GhostloopServer, params: Any) -> dict[str, Any]:
        status = ls.engine.status()
        if ls.feedback_or_none is not None:
            status["recorder"] = ls.feedback_or_none.status()
        if ls.adapters_or_none is not None:
            status["adapters"] = ls.adapters_or_none.status()
        status["metrics"] = ls.metrics.status()
        if ls.workspace_or_none is not None:
            status["repository"] = ls.workspace_or_none.describe()
        if ls.team is not None and ls.connection is not None:
            status["team"] = {**ls.team.status(), "user": ls.settings.store.stored_user}
        return status

    @server.feature(RELOAD_ADAPTERS_REQUEST)
    async def reload_adapters(ls: GhostloopServer, params: Any) -> dict[str, Any]:
        watcher = ls.adapters
        if ls.engine.loaded is None:
            raise ModelUnavailable(
                f"the model is {ls.engine.state}; adapters are read once it is ready"
            )
        return await asyncio.to_thread(watcher.check)
