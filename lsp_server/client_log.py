"""The server's log in the editor: ``window/logMessage`` at each record's level.

An editor shows what a stdio server writes to stderr as errors (vscode-languageclient
10+ logs every stderr line at error level), so while a session is live the log goes to
the client as ``window/logMessage`` with the record's level as its type; before the
session is initialized (the LSP allows no messages then) and once the client is gone, it
goes to stderr as before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from types import TracebackType

from lsprotocol import types

_LEVELS = (
    (logging.ERROR, types.MessageType.Error),
    (logging.WARNING, types.MessageType.Warning),
    (logging.INFO, types.MessageType.Info),
)


def message_type(level: int) -> types.MessageType:
    """The LSP message type of a logging level (DEBUG and below: Log)."""
    return next((kind for floor, kind in _LEVELS if level >= floor), types.MessageType.Log)


class ClientLog(logging.Handler):
    """Takes the root logger's place while installed (``with ClientLog(...)``): records go
    to ``send`` while ``live()``, to the handlers it replaced otherwise. Records from
    other threads are sent from the event loop's thread."""

    def __init__(
        self, send: Callable[[types.LogMessageParams], None], live: Callable[[], bool]
    ) -> None:
        super().__init__()
        self._send = send
        self._live = live
        self._replaced: list[logging.Handler] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._sending = threading.local()  # a record logged while sending one goes to stderr

    def __enter__(self) -> ClientLog:
        root = logging.getLogger()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._replaced = list(root.handlers)
        if self._replaced:
            self.setFormatter(logging.Formatter("%(name)s %(message)s"))
            self.setLevel(min(handler.level for handler in self._replaced))
        for handler in self._replaced:
            root.removeHandler(handler)
        root.addHandler(self)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        for handler in self._replaced:
            root.addHandler(handler)

    def emit(self, record: logging.LogRecord) -> None:
        loop = self._loop
        if getattr(self._sending, "active", False) or loop is None or not self._live():
            self._fallback(record)
            return
        params = types.LogMessageParams(
            type=message_type(record.levelno), message=self.format(record)
        )
        try:
            if threading.get_ident() == self._loop_thread:
                self._deliver(params, record)
            else:
                loop.call_soon_threadsafe(self._deliver, params, record)
        except RuntimeError:  # the loop is closed
            self._fallback(record)

    def _deliver(self, params: types.LogMessageParams, record: logging.LogRecord) -> None:
        if not self._live():
            self._fallback(record)
            return
        self._sending.active = True
        try:
            self._send(params)
        except Exception:  # the client went away mid-write: stderr still has it
            self._fallback(record)
        finally:
            self._sending.active = False

    def _fallback(self, record: logging.LogRecord) -> None:
        for handler in self._replaced:
            if record.levelno >= handler.level:
                handler.handle(record)
