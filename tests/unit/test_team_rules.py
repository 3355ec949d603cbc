"""The team server's rules on their own: rate limits, who is admitted, fair turns across
connections (its message framing: test_transport)."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback.database import open_engine, upgrade
from feedback.tokens import add_token, digest, revoke
from ghostloop.postprocess import CursorContext
from ghostloop.settings import Settings
from lsp_server.engine import CompletionEngine
from lsp_server.fair_queue import FairQueue
from lsp_server.team import RateLimiter, Team, is_loopback


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
    team = Team(Settings.of(data_dir=tmp_path), "127.0.0.1")  # nothing started: rules only
    team.store = store
    assert team._still_valid(digest(token))
    assert not team._still_valid(digest(token + "x"))
    revoke(store, "ann")
    assert not team._still_valid(digest(token))
