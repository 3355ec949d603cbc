"""Message framing for stdio and TCP (lsp_server.transport): whole messages out of any
split of the stream, violations named, and on stdio a bad frame skipped, not fatal."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lsp_server.transport import FrameLimits, ProtocolViolation, read_messages

LIMITS = FrameLimits(2048, message_timeout_s=0.3, idle_timeout_s=None)


def frame(body: bytes) -> bytes:
    return (
        b"Content-Length: %d\r\nContent-Type: application/vscode-jsonrpc\r\n\r\n" % len(body) + body
    )


async def collect(
    *pieces: bytes, pause_s: float = 0.0, limits: FrameLimits = LIMITS
) -> list[bytes]:
    reader = asyncio.StreamReader()

    async def feed() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(pause_s)
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    try:
        return [body async for body in read_messages(reader, limits)]
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
    limits = dataclasses.replace(LIMITS, idle_timeout_s=0.2)
    bodies = []
    with pytest.raises(TimeoutError):
        async for body in read_messages(reader, limits):
            bodies.append(body)
    assert bodies == [b"{}"]


async def collect_resync(*pieces: bytes) -> list[bytes]:
    reader = asyncio.StreamReader()
    for piece in pieces:
        reader.feed_data(piece)
    reader.feed_eof()
    return [body async for body in read_messages(reader, FrameLimits(2048), resync=True)]


@pytest.mark.parametrize(
    "bad",
    [
        b"Content-Length: 73786976294838206464\r\n\r\n",  # ended pygls's reader: OverflowError
        b"Content-Length: 1000000000000\r\n\r\n",  # and MemoryError
        b"Content-Length: -5\r\n\r\n",
        b"Content-Length: 4096\r\n\r\n{",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00" * 9000,
        b"\r\n\r\n",
    ],
)
async def test_on_stdio_a_bad_frame_is_skipped_and_the_next_message_read(bad: bytes) -> None:
    assert await collect_resync(frame(b'{"a":1}'), bad, frame(b'{"b":2}')) == [
        b'{"a":1}',
        b'{"b":2}',
    ]


_frames = st.lists(st.binary(max_size=300), max_size=6)


@settings(max_examples=300, deadline=None)
@given(bodies=_frames, cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=40))
def test_any_split_of_a_stream_of_frames_gives_back_its_messages(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame(body) for body in bodies)
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(stream[at : at + cut])
        at += cut
    pieces.append(stream[at:])
    assert asyncio.run(collect(*pieces)) == bodies


@settings(max_examples=500, deadline=None)
@given(
    garbage=st.binary(max_size=200).filter(lambda g: b"content-length" not in g.lower()),
    bodies=st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=3),
)
def test_on_stdio_any_garbage_before_frames_is_skipped(garbage: bytes, bodies: list[bytes]) -> None:
    stream = garbage + b"".join(frame(body) for body in bodies)
    assert asyncio.run(collect_resync(stream)) == bodies
