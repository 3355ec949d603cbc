"""LSP messages off a byte stream, for ``ghostloop serve`` on stdio and on TCP alike.

pygls reads stdio itself, but it trusts whatever Content-Length it is sent (an absurd one
ended the process) and offers every JSON object it parses to the protocol as a possible
message (an object inside ``params`` that looked like JSON-RPC was handled as one). Both
transports read here instead: a frame's length is checked before its body is read, a body
is one JSON-RPC message structured from its top level only, and a message that cannot be
handled is answered with an error (a request) or logged as a warning (a notification),
never fatal to the server and never shown to the user as a pop-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import cattrs
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.protocol import JsonRPCProtocol

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 8192
HEADER_END = b"\r\n\r\n"
_RESYNC_MARK = b"content-length:"


class ProtocolViolation(Exception):
    """The bytes a client sent are not LSP messages within the server's limits."""


@dataclass(frozen=True)
class FrameLimits:
    """How large a message may be and how long the stream may take (None: no limit)."""

    max_message_bytes: int
    message_timeout_s: float | None = None  # a message must arrive whole within this
    idle_timeout_s: float | None = None  # silence between messages


async def read_messages(
    reader: asyncio.StreamReader, limits: FrameLimits, *, resync: bool = False
) -> AsyncIterator[bytes]:
    """LSP message bodies as they arrive whole.

    A frame that breaks the rules raises ProtocolViolation, or with ``resync`` (stdio,
    where the stream cannot be closed without ending the server) is logged and skipped:
    reading goes on at the next ``Content-Length`` header. A stalled message or an idle
    stream raises TimeoutError once the limits say so.
    """
    buffer = bytearray()
    started = 0.0
    while True:
        timeout = limits.idle_timeout_s or None
        if buffer and limits.message_timeout_s is not None:  # a message has begun
            timeout = limits.message_timeout_s - (time.monotonic() - started)
        try:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
        except TimeoutError:
            if buffer:
                raise ProtocolViolation(
                    f"a message did not arrive whole within message_timeout_s="
                    f"{limits.message_timeout_s:g}"
                ) from None
            raise
        if not chunk:
            if buffer.strip():
                log.info("the stream closed in the middle of a message")
            return
        if not buffer:
            started = time.monotonic()
        buffer += chunk
        while buffer:
            try:
                body = _take_message(buffer, limits.max_message_bytes)
            except ProtocolViolation as violation:
                if not resync:
                    raise
                skipped = _skip_to_next_header(buffer)
                log.warning("%s; skipped %d bytes to the next message", violation, skipped)
                continue
            if body is None:
                break
            started = time.monotonic()
            yield body


def _take_message(buffer: bytearray, max_message_bytes: int) -> bytes | None:
    """The first whole message's body, removed from ``buffer``; None until it is whole."""
    end = buffer.find(HEADER_END)
    if end < 0:
        if len(buffer) > MAX_HEADER_BYTES:
            raise ProtocolViolation("message headers longer than 8 KiB (not LSP?)")
        return None
    length = content_length(bytes(buffer[:end]), max_message_bytes)
    total = end + len(HEADER_END) + length
    if len(buffer) < total:
        return None
    body = bytes(buffer[end + len(HEADER_END) : total])
    del buffer[:total]
    return body


def _skip_to_next_header(buffer: bytearray) -> int:
    """Drop the bytes before the next Content-Length header (after the first byte); keep
    a tail that may be the start of one. How many bytes went."""
    found = buffer.lower().find(_RESYNC_MARK, 1)
    if found < 0:
        found = max(1, len(buffer) - len(_RESYNC_MARK) + 1)
    del buffer[:found]
    return found


def content_length(headers: bytes, limit: int) -> int:
    """The Content-Length of a header block, checked against ``limit`` before any body is
    read; raises ProtocolViolation for anything that is not an LSP header block."""
    length: int | None = None
    for line in headers.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name.strip() or not name.isascii():
            raise ProtocolViolation(f"not an LSP header line: {line[:40]!r}")
        if name.strip().lower() == b"content-length":
            digits = value.strip()
            if not digits.isdigit() or len(digits) > 18:
                raise ProtocolViolation(f"bad Content-Length {value[:24]!r}")
            length = int(digits)
    if length is None:
        raise ProtocolViolation("a message without a Content-Length header")
    if length > limit:
        raise ProtocolViolation(f"a message of {length} bytes, over max_message_bytes={limit}")
    return length


def parse_message(body: bytes) -> dict[str, Any]:
    """The JSON-RPC message object in ``body``; raises ProtocolViolation otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ProtocolViolation("a message body that is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolViolation(
            f"a message body that is a JSON {type(data).__name__}, not an object "
            "(LSP has no batches)"
        )
    return data


def dispatch(protocol: JsonRPCProtocol, data: dict[str, Any]) -> None:
    """Hand one parsed message to ``protocol``: its params structured from the top level
    only, a bad request answered with an error, a bad notification logged and dropped."""
    method = data.get("method")
    if data.get("jsonrpc") != "2.0" or ("method" in data and not isinstance(method, str)):
        _refuse(
            protocol,
            data,
            -32600,
            f'not a JSON-RPC 2.0 message (it needs "jsonrpc": "2.0" and a string '
            f'"method"): {json.dumps(data)[:80]}',
        )
        return
    try:
        message = protocol.structure_message(data)
    except JsonRpcException as error:  # pygls calls some of these internal errors: not ours
        _refuse(protocol, data, -32602, f"invalid params for {method}: {_why(error)}")
        return
    try:
        protocol.handle_message(message)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:  # a bug in one handler must not end the others' service
        log.exception("handling %s failed", method or "a response")
        _refuse(protocol, data, -32603, f"{method}: {type(error).__name__}: {error}")


def _why(error: JsonRpcException) -> str:
    """What did not parse, in cattrs's words where it has them."""
    cause = error.__cause__
    if isinstance(cause, cattrs.ClassValidationError):
        return "; ".join(cattrs.transform_error(cause))
    return str(cause or error)


class _QuietStructuring(logging.Filter):
    """pygls logs a traceback at error level for every message whose params do not parse;
    ``dispatch`` answers or logs those in one line, so the traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unable to deserialize message")


logging.getLogger("pygls.protocol.json_rpc").addFilter(_QuietStructuring())


def _refuse(protocol: JsonRPCProtocol, data: dict[str, Any], code: int, problem: str) -> None:
    """Answer a request with error ``code``; a notification or response is only logged
    (a warning in the editor's log, never a pop-up)."""
    if "id" in data and "method" in data and _is_id(data["id"]):
        protocol._send_response(data["id"], error=types.ResponseError(code=code, message=problem))
        return
    log.warning("ignored a message: %s", problem)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def stdin_reader(stream: BinaryIO) -> asyncio.StreamReader:
    """An asyncio reader fed from ``stream`` by a thread: a pipe, a file or a terminal
    alike (the loop's pipe transport takes pipes only)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    fd = stream.fileno()

    def pump() -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            try:
                loop.call_soon_threadsafe(
                    reader.feed_data if chunk else lambda _c: reader.feed_eof(), chunk
                )
            except RuntimeError:  # the loop is closed: nobody reads any more
                return
            if not chunk:
                return

    threading.Thread(target=pump, name="ghostloop-stdin", daemon=True).start()
    return reader


class StdoutWriter:
    """pygls's writer interface over stdout; a client that went away is not an error."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream or sys.stdout.buffer
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._stream.write(data)
            self._stream.flush()
        except (ValueError, OSError):  # a closed file, a broken pipe
            self.closed = True
            log.info("the client stopped reading: nothing more is sent")

    def close(self) -> None:
        self.closed = True
