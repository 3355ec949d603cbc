"""``ghostloop serve --tcp``: one model serving a team's editors over TCP (and TLS).

pygls's own TCP server serves a single connection and exits when it closes, so this
module runs the listener: every connection gets its own pygls server object (its
documents, its feedback bookkeeping, its user) while the connections share one
completion engine, one recorder, one adapter watcher and one metrics registry.

What a shared server must hold up against, and where it is held:
- who: a client presents a token from ``ghostloop users add`` in
  ``initializationOptions.token``; off loopback it must (``tcp_auth``). Nothing but
  ``initialize`` is read before that, a refused client is told why and disconnected, and
  the token, not the client, names the user on every row.
- fairness: the engine's queue takes connections in turn, so one busy client cannot
  starve the others; each user has a rate limit (a token bucket).
- the wire: each message must arrive whole within ``message_timeout_s`` and be at most
  ``max_message_bytes``; garbage framing, an oversize message or a stalled one closes that
  connection only, as does ``idle_timeout_s`` of silence. A connection that closes
  cancels its queued and running completions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import ssl
import threading
import time
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from sqlalchemy import Engine

from feedback.database import StoreError, open_store, upgrade
from feedback.prometheus import ServerMetrics
from feedback.recorder import Recorder
from feedback.tokens import any_active, digest, user_for, user_for_digest
from ghostloop.settings import Settings
from lsp_server.adapter_watch import AdapterWatcher
from lsp_server.engine import CompletionEngine
from lsp_server.protocol import RateLimited, Unauthorized
from lsp_server.recording import FateBook, FeedbackLog, open_recorder
from lsp_server.server import create_server
from lsp_server.serving import start_serving
from lsp_server.session import Connection, GhostloopServer
from lsp_server.transport import (
    FrameLimits,
    ProtocolViolation,
    dispatch,
    parse_message,
    read_messages,
)

log = logging.getLogger(__name__)

TOKEN_RECHECK_S = 60.0  # a revoked token stops working within this long
# settings a client may choose for itself on a team server; the rest are the admin's
CLIENT_SETTINGS = ("telemetry",)
TOKEN_HELP = (
    "put a token from your Ghostloop admin (`ghostloop users add NAME` on the server) in "
    "initializationOptions.token (VS Code: the command 'Ghostloop: Set Server Token'; "
    "Neovim: setup{ token = ... })"
)


class StartRefused(RuntimeError):
    """The team server will not start as configured; the message says what to change."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class RateLimiter:
    """A token bucket per user: ``per_minute`` completions a minute, bursts of ten
    seconds' worth. Thread-safe; 0 means no limit."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1.0, per_minute / 6.0)
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, user: str, now: float | None = None) -> float:
        """0 if ``user`` may go ahead (and counts it), else the seconds until they may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(user, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[user] = (tokens - 1.0, now)
                return 0.0
            self._buckets[user] = (tokens, now)
            return (1.0 - tokens) / self.rate


class _GuardedWriter:
    """The connection's writer for pygls: a client that stops reading its responses
    (their bytes pile up unsent past ``limit``) is disconnected rather than buffered for."""

    def __init__(self, writer: asyncio.StreamWriter, connection: Connection, limit: int) -> None:
        self._writer = writer
        self._connection = connection
        self._limit = limit

    def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            return
        self._writer.write(data)
        if self._writer.transport.get_write_buffer_size() > self._limit:
            self._connection.refused = (
                f"over {self._limit} bytes of responses unread: the client stopped reading"
            )
            log.warning("connection %s: %s", self._connection.id, self._connection.refused)
            self._writer.transport.abort()

    def close(self) -> None:
        self._writer.close()


class _Dropped:
    """Where a closed connection's late responses go: nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class Team:
    """What all connections share, and the rules every connection is held to. ``engine``
    and ``watcher`` exist once ``open`` has run."""

    engine: CompletionEngine
    watcher: AdapterWatcher

    def __init__(self, settings: Settings, host: str) -> None:
        self.settings = settings
        self.host = host
        self.metrics = ServerMetrics()
        self.limiter = RateLimiter(settings.team.rate_limit_per_minute)
        self.connections: dict[str, Connection] = {}
        self.fates = FateBook()  # one suggestion is taken once, whichever connection says so
        self._next_id = 0
        self.store: Engine | None = None
        self.recorder: Recorder | None = None

    # -- start and stop

    def open(self) -> None:
        """Open the store and check the configuration; raises StartRefused."""
        settings = self.settings
        exposed = not is_loopback(self.host)
        try:
            self.store = open_store(settings.store)
            upgrade(self.store)
        except StoreError as error:
            if exposed and settings.team.tcp_auth != "off":
                raise StartRefused(
                    f"the access tokens live in the database, which cannot be used: {error}"
                ) from None
            log.warning("no database (%s): only clients without a token can connect", error)
            self.store = None
        if exposed and settings.team.tcp_auth != "off" and not self._any_tokens():
            raise StartRefused(
                f"{self.host} is reachable from other machines but no access token exists: "
                "create one per developer with `ghostloop users add NAME`, or set "
                "tcp_auth = 'off' (GHOSTLOOP_TCP_AUTH=off) to let anyone on the network in"
            )
        if exposed and settings.team.tcp_auth == "off":
            log.warning("tcp_auth=off on %s: anyone who can reach it is served", self.host)
        if exposed and settings.team.tls_cert is None:
            log.warning(
                "no TLS on %s: tokens and code travel in clear text; set tls_cert and "
                "tls_key, or put a TLS proxy in front (docs/team.md)",
                self.host,
            )
        self.engine, self.watcher = start_serving(settings, self.metrics)
        if settings.store.telemetry:
            self.recorder = open_recorder(settings, busy=self.engine.busy)

    def _any_tokens(self) -> bool:
        return self.store is not None and any_active(self.store)

    def close(self) -> None:
        self.watcher.stop()
        self.engine.stop()
        if self.recorder is not None:
            self.recorder.close()  # everything recorded is in the store or the journal
        self.metrics.close()

    def status(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "users": len({c.user for c in self.connections.values() if c.user}),
        }

    # -- connections

    def connect(self, writer: asyncio.StreamWriter) -> tuple[Connection, GhostloopServer]:
        peer = writer.get_extra_info("peername") or ("?", 0)
        self._next_id += 1
        connection = Connection(
            id=f"c{self._next_id}",
            peer=f"{peer[0]}:{peer[1]}",
            loopback=is_loopback(str(peer[0])),
            writer=writer,
        )
        server = create_server(self.settings)
        server.team, server.connection = self, connection
        server.engine_or_none, server.adapters_or_none = self.engine, self.watcher
        server.metrics = self.metrics
        guarded = _GuardedWriter(writer, connection, 2 * self.settings.team.max_message_bytes)
        server.protocol.set_writer(guarded)  # type: ignore[arg-type]
        self.connections[connection.id] = connection
        log.info("connection %s from %s", connection.id, connection.peer)
        return connection, server

    def admit(self, server: GhostloopServer, params: types.InitializeParams) -> None:
        """``initialize`` on a connection: the token decides the user, or it is refused."""
        connection = server.connection
        assert connection is not None
        options = params.initialization_options
        if options is None:
            options = {}
        if not isinstance(options, dict):
            connection.refused = "bad initializationOptions"
            raise JsonRpcInvalidParams(
                f"initializationOptions must be an object, got {type(options).__name__}"
            )
        token = options.get("token")
        settings = self.settings
        needs_token = settings.team.tcp_auth == "required" or (
            settings.team.tcp_auth == "auto" and not connection.loopback
        )
        if token is not None and (not isinstance(token, str) or not token):
            connection.refused = "malformed token"
            raise Unauthorized(f"initializationOptions.token must be a string; {TOKEN_HELP}")
        if token:
            user = self._user_for(connection, token)
        elif needs_token:
            connection.refused = "no token"
            raise Unauthorized(f"this Ghostloop server needs an access token: {TOKEN_HELP}")
        elif settings.team.tcp_auth == "off" and isinstance(options.get("user"), str):
            user = options["user"]  # a trusted network: clients say who they are
        else:
            user = settings.store.user  # loopback without a token: the server's own user
        telemetry = options.get("telemetry", True)
        if not isinstance(telemetry, bool):
            connection.refused = "bad telemetry"
            raise JsonRpcInvalidParams(f"telemetry must be true or false, got {telemetry!r}")
        server.settings = settings.replaced(
            user=user, telemetry=settings.store.telemetry and telemetry
        )
        loop = asyncio.get_running_loop()
        server.feedback_or_none = FeedbackLog(
            server.settings,
            self.recorder if server.settings.store.telemetry else None,
            schedule=loop.call_later,
            metrics=self.metrics,
            fates=self.fates,
        )
        connection.user = user
        ignored = sorted(set(options) - {"token", "user", *CLIENT_SETTINGS})
        if ignored:
            server.window_log_message(
                types.LogMessageParams(
                    type=types.MessageType.Info,
                    message=(
                        f"this team server's admin sets {', '.join(ignored)}; "
                        "the values sent in initializationOptions are ignored"
                    ),
                )
            )
        client = params.client_info
        log.info(
            "connection %s admitted: user=%s client=%s",
            connection.id,
            user,
            client.name if client else "unknown",
        )

    def _user_for(self, connection: Connection, token: str) -> str:
        if self.store is None:
            connection.refused = "no database"
            raise Unauthorized(
                "this server cannot check tokens: its database is unreachable; "
                "tell your Ghostloop admin"
            )
        try:
            user = user_for(self.store, token)
        except Exception as error:  # the database went away: refuse, do not guess
            connection.refused = "token check failed"
            raise Unauthorized(
                f"this server could not check your token ({type(error).__name__}); "
                "try again, or tell your Ghostloop admin"
            ) from None
        if user is None:
            connection.refused = "wrong token"
            raise Unauthorized(
                "the access token is not valid (unknown or revoked); ask your Ghostloop "
                "admin for a new one"
            )
        connection.token_digest = digest(token)
        connection.token_checked_at = time.monotonic()
        return user

    async def check(self, server: GhostloopServer) -> None:
        """Before each completion: the user's rate limit; a revoked token ends here."""
        connection = server.connection
        assert connection is not None
        if (
            connection.token_digest is not None
            and self.store is not None
            and time.monotonic() - connection.token_checked_at > TOKEN_RECHECK_S
        ):
            if not await asyncio.to_thread(self._still_valid, connection.token_digest):
                connection.refused = "token revoked"
                asyncio.get_running_loop().call_later(0.2, connection.writer.close)
                raise Unauthorized("your access token was revoked; ask your admin for a new one")
            connection.token_checked_at = time.monotonic()
        wait_s = self.limiter.take(server.settings.store.stored_user)
        if wait_s:
            server.metrics.request("rate_limited")
            raise RateLimited(
                f"rate limit: {self.settings.team.rate_limit_per_minute} completions a minute "
                f"per user; retry in {wait_s:.1f} s"
            )

    def _still_valid(self, wanted: str) -> bool:
        assert self.store is not None
        try:
            return user_for_digest(self.store, wanted) is not None
        except Exception:  # cannot tell now: keep serving, ask again next time
            log.warning("could not recheck a token; will try again", exc_info=True)
            return True

    def release(self, server: GhostloopServer) -> None:
        """The connection ends (or shut down): its work stops, its documents go."""
        connection = server.connection
        assert connection is not None
        cancelled = self.engine.cancel_queue(connection.id)
        with contextlib.suppress(RuntimeError):  # no workspace: it never initialized
            for uri in list(server.workspace.text_documents):
                if server.feedback_or_none is not None:
                    server.feedback_or_none.closed(uri)
                self.engine.forget(server.job_key(uri))
        if cancelled:
            log.info("connection %s: %d unfinished completions cancelled", connection.id, cancelled)

    def disconnect(self, server: GhostloopServer) -> None:
        connection = server.connection
        assert connection is not None
        if self.connections.pop(connection.id, None) is None:
            return
        self.release(server)
        server.protocol.set_writer(_Dropped())  # type: ignore[arg-type]
        server.protocol._shutdown = True  # late handler results go nowhere
        log.info(
            "connection %s closed%s after %.0f s",
            connection.id,
            f" ({connection.refused})" if connection.refused else "",
            time.monotonic() - connection.opened_at,
        )


async def _serve_connection(
    team: Team, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    connection, server = team.connect(writer)
    settings = team.settings
    limits = FrameLimits(
        settings.team.max_message_bytes,
        message_timeout_s=settings.team.message_timeout_s,
        idle_timeout_s=settings.team.idle_timeout_s or None,
    )
    try:
        async for body in read_messages(reader, limits):
            data = parse_message(body)
            method = data.get("method")
            if method == "exit":
                break  # this client leaves; the server goes on for the others
            if connection.user is None and method != "initialize":
                # nothing but initialize (with its token) is read before admission
                if "id" in data and isinstance(method, str):
                    _answer_error(writer, data["id"], "initialize first, with your token")
                continue
            dispatch(server.protocol, data)
            if connection.refused:
                await asyncio.sleep(0.05)  # let the error response go out first
                break
            await asyncio.sleep(0)  # one message, then the other connections' turn
    except ProtocolViolation as violation:
        connection.refused = str(violation)
        log.warning("connection %s from %s: %s", connection.id, connection.peer, violation)
    except TimeoutError:
        connection.refused = f"idle for idle_timeout_s={team.settings.team.idle_timeout_s:g}"
    except (ConnectionError, ssl.SSLError) as error:
        connection.refused = f"{type(error).__name__}"
    except asyncio.CancelledError:
        # The server stops (SIGINT, SIGTERM): this connection ends with it. Ending the task
        # normally spares asyncio's stream callback a traceback about a cancelled task.
        connection.refused = "the server is stopping"
    finally:
        team.disconnect(server)
        with contextlib.suppress(Exception):
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2)


def _answer_error(writer: asyncio.StreamWriter, message_id: Any, message: str) -> None:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": message_id, "error": {"code": -32002, "message": message}}
    ).encode()
    writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.team.tls_cert is None or settings.team.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.team.tls_cert, settings.team.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise StartRefused(
            f"cannot use tls_cert={settings.team.tls_cert} with tls_key={settings.team.tls_key}: "
            f"{error}; both must be PEM files and the key must match the certificate"
        ) from None
    return context


def serve_team(settings: Settings, host: str, port: int) -> int:
    """Run the team server until SIGINT/SIGTERM; 2 when it refuses to start."""
    team = Team(settings, host)
    try:
        context = tls_context(settings)
        team.open()
    except StartRefused as error:
        log.error("%s", error)
        print(f"ghostloop serve: {error}", file=__import__("sys").stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        listener = await asyncio.start_server(
            lambda r, w: _serve_connection(team, r, w),
            host,
            port,
            ssl=context,
            ssl_handshake_timeout=settings.team.message_timeout_s if context else None,
            limit=65536,
        )
        where = ", ".join(str(sock.getsockname()) for sock in listener.sockets)
        log.info("team server on %s (%s)", where, "TLS" if context else "plain TCP")
        async with listener:
            await stop.wait()
        log.info("stopping: %d connections open", len(team.connections))

    try:
        asyncio.run(main())
    finally:
        team.close()
    return 0
