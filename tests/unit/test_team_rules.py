"""The team server's rules on their own: rate limits, message framing and its limits,
fair turns across connections."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from feedback.database import open_engine, upgrade
from feedback.tokens import add_token, digest, revoke
from ghostloop.postprocess import CursorContext
from ghostloop.settings import Settings
from lsp_server.engine import CompletionEngine
from lsp_server.fair_queue import FairQueue
from lsp_server.team import ProtocolViolation, RateLimiter, Team, is_loopback, read_messages

LIMITS = dataclasses.replace(
    Settings(), max_message_bytes=2048, message_timeout_s=0.3, idle_timeout_s=0.0
)


def test_rate_limit_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(per_minute=60)  # one a second, bursts of ten
    assert [limiter.take("ann", now=0.0) for _ in range(10)] == [0.0] * 10
    assert limiter.take("ann", now=0.0) == pytest.approx(1.0)
    assert limiter.take("bob", now=0.0) == 0.0  # per user
    assert limiter.take("ann", now=0.5) == pytest.approx(0.5)
    assert limiter.take("ann", now=1.0) == 0.0
    assert RateLimiter(per_minute=0).take("ann", now=0.0) == 0.0


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.5.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.2", "::", "example.com"))


def frame(body: bytes) -> bytes:
    return (
        b"Content-Length: %d\r\nContent-Type: application/vscode-jsonrpc\r\n\r\n" % len(body) + body
    )


async def collect(*pieces: bytes, pause_s: float = 0.0, settings: Settings = LIMITS) -> list[bytes]:
    reader = asyncio.StreamReader()

    async def feed() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(pause_s)
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    try:
        return [body async for body in read_messages(reader, settings)]
    finally:
        feeding.cancel()


async def test_messages_split_and_joined_arbitrarily_come_out_whole() -> None:
    stream = frame(b'{"a":1}') + frame(b'{"b":"\xc3\xa9"}') + frame(b"{}")
    pieces = [stream[i : i + 5] for i in range(0, len(stream), 5)]
    assert await collect(*pieces) == [b'{"a":1}', b'{"b":"\xc3\xa9"}', b"{}"]
    assert await collect(stream) == [b'{"a":1}', b'{"b":"\xc3\xa9"}', b"{}"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"Content-Length: 4096\r\n\r\n{", "over max_message_bytes=2048"),
        (b"GET / HTTP/1.1\r\n\r\n", "not an LSP header line"),
        (b"Content-Length: many\r\n\r\n", "bad Content-Length"),
        (b"Content-Type: x\r\n\r\n{}", "without a Content-Length"),
        (b"\x00" * 9000, "headers longer than 8 KiB"),
    ],
)
async def test_bad_framing_is_a_violation(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation, match=reason):
        await collect(frame(b"{}"), data)


async def test_a_message_that_never_completes_times_out() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"Content-Length: 10\r\n\r\n{")
    with pytest.raises(ProtocolViolation, match=r"within message_timeout_s=0\.3"):
        async for _ in read_messages(reader, LIMITS):
            pass


async def test_silence_between_messages_ends_at_the_idle_timeout() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(frame(b"{}"))
    settings = dataclasses.replace(LIMITS, idle_timeout_s=0.2)
    bodies = []
    with pytest.raises(TimeoutError):
        async for body in read_messages(reader, settings):
            bodies.append(body)
    assert bodies == [b"{}"]


def test_connections_take_turns_whatever_their_number_of_documents() -> None:
    engine = CompletionEngine(Settings())  # never started: only its queue is used
    for i in range(4):
        engine.submit(f"c1 doc{i}", CursorContext("x", ""), queue="c1")
    engine.submit("c2 doc", CursorContext("y", ""), queue="c2")
    queue: FairQueue = engine._queue
    order = [queue.get().key for _ in range(5)]
    assert order == ["c1 doc0", "c2 doc", "c1 doc1", "c1 doc2", "c1 doc3"]


def test_cancelling_a_connection_cancels_only_its_jobs() -> None:
    engine = CompletionEngine(Settings())
    mine = [engine.submit(f"c1 doc{i}", CursorContext("x", ""), queue="c1") for i in range(3)]
    theirs = engine.submit("c2 doc", CursorContext("y", ""), queue="c2")
    assert engine.cancel_queue("c1") == 3
    assert all(job.cancelled and job.cancel_reason == "disconnected" for job in mine)
    assert not theirs.cancelled


def test_an_open_connection_loses_a_revoked_token(tmp_path: Path) -> None:
    store = open_engine(f"sqlite:///{tmp_path / 'team.db'}")
    upgrade(store)
    _, token = add_token(store, "ann")
    team = Team(Settings(data_dir=tmp_path), "127.0.0.1")  # nothing started: rules only
    team.store = store
    assert team._still_valid(digest(token))
    assert not team._still_valid(digest(token + "x"))
    revoke(store, "ann")
    assert not team._still_valid(digest(token))
