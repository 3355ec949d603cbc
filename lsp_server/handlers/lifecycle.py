"""initialize / shutdown: settings from initializationOptions, the engine's life."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from ghostloop.settings import SettingsError
from lsp_server.recording import FeedbackLog
from lsp_server.serving import start_serving
from lsp_server.session import GhostloopServer

log = logging.getLogger(__name__)


def _options(params: types.InitializeParams) -> dict[str, Any]:
    options = params.initialization_options
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise JsonRpcInvalidParams(
            f"initializationOptions must be an object of Ghostloop settings, got {options!r}"
        )
    # a team server's access token, not a setting (stdio servers need none and ignore it)
    return {name: value for name, value in options.items() if name != "token"}


def register(server: GhostloopServer) -> None:
    @server.feature(types.INITIALIZE)
    def initialize(ls: GhostloopServer, params: types.InitializeParams) -> None:
        if ls.team is not None and ls.connection is not None:
            # a connection to a team server: the token decides who it is, the admin the rest
            ls.team.admit(ls, params)
            ls.client_info = params.client_info
            ls.root_uri = params.root_uri
            ls.open_workspace(params)
            return
        try:
            ls.settings = ls.base_settings.with_overrides(
                _options(params), source="initializationOptions"
            )
        except SettingsError as error:
            raise JsonRpcInvalidParams(str(error)) from None
        client = params.client_info
        log.info(
            "initialize client=%s/%s user=%s model=%s",
            client.name if client else "unknown",
            client.version if client and client.version else "",
            ls.settings.store.user,
            ls.settings.inference.model or "(embedded default)",
        )
        ls.client_info = client
        ls.root_uri = params.root_uri
        if ls.engine_or_none is None:
            loop = asyncio.get_event_loop()
            ls.feedback_or_none = FeedbackLog.open(
                ls.settings,
                metrics=ls.metrics,
                schedule=loop.call_later,
                busy=lambda: ls.engine_or_none is not None and ls.engine_or_none.busy(),
            )
            ls.engine_or_none, ls.adapters_or_none = start_serving(ls.settings, ls.metrics)
        ls.open_workspace(params)

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: GhostloopServer, params: None) -> None:
        ls.close_session()
