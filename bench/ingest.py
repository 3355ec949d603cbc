"""How fast the feedback store takes events, and what logging costs a completion.

1. Events/s sustained through the Recorder (queue, writer thread, batches) into SQLite
   and PostgreSQL: completions and their events submitted in chunks of half the queue,
   each as fast as possible, timed until the last is committed.
2. Completion p50 over LSP with feedback logging on and off, measured in one run: two
   live servers, requests alternating between them, so drift hits both alike.

    python bench/ingest.py [--events 20000] [--requests 60] [--model PATH]
        [--postgres postgresql://postgres@127.0.0.1:5432/test]

Without --model the completions use the tiny test model (fast completions make the
logging overhead most visible); pass '' for the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from lsprotocol import types
from sqlalchemy import create_engine, text

from evaluation.client import GhostloopClient
from feedback.database import open_engine, upgrade
from feedback.recorder import Recorder, StoreWrite

PER_COMPLETION = 9  # shown, accepted and survival checks: a realistic mix per completion


def writes(count: int) -> list[StoreWrite]:
    out: list[StoreWrite] = []
    while len(out) < count:
        completion_id = uuid.uuid4().hex
        out.append(
            StoreWrite(
                "completion",
                {
                    "id": completion_id,
                    "user": f"dev{len(out) % 50}",
                    "base_model": "SmolLM2-135M-Instruct",
                    "suggestion": "return sum(item.price for item in items)",
                    "prompt_prefix": "def total(items):\n    " * 20,
                    "latency_ms": 40.0,
                },
            )
        )
        for kind in ("shown", "accepted") + ("survival",) * (PER_COMPLETION - 2):
            out.append(
                StoreWrite(
                    "event",
                    {"id": uuid.uuid4().hex, "completion_id": completion_id, "kind": kind},
                )
            )
    return out[:count]


def ingest_rate(url: str, count: int, journal_dir: Path) -> tuple[float, int]:
    engine = open_engine(url)
    upgrade(engine)
    recorder = Recorder(engine=engine, journal_path=journal_dir / f"{uuid.uuid4().hex}.jsonl")
    recorder.start()
    batch = writes(count)
    started = time.perf_counter()
    chunk = recorder.capacity // 2  # as fast as the writer commits, without overflowing
    for start in range(0, len(batch), chunk):
        for write in batch[start : start + chunk]:
            recorder.submit(write)
        recorder.flush(timeout_s=600)
    recorder.close(timeout_s=600)
    elapsed = time.perf_counter() - started
    assert recorder.stats.written == count and recorder.stats.skipped == 0, recorder.stats
    engine.dispose()
    return count / elapsed, recorder.stats.journaled


async def latency_on_off(
    model: str, requests: int, data_dir: Path
) -> tuple[list[float], list[float]]:
    base = dict(
        os.environ,
        GHOSTLOOP_MODEL=model,
        GHOSTLOOP_LOG_LEVEL="WARNING",
        GHOSTLOOP_DATA_DIR=str(data_dir),
    )
    on = await GhostloopClient.start(env={**base, "GHOSTLOOP_TELEMETRY": "true"})
    off = await GhostloopClient.start(env={**base, "GHOSTLOOP_TELEMETRY": "false"})
    source = "def split(self, text):\n    chunks = self.wordsep_re.split(text)\n    return chu"
    times: dict[str, list[float]] = {"on": [], "off": []}
    try:
        await on.wait_ready()
        await off.wait_ready()
        for index in range(requests):
            for name, client in (("on", on), ("off", off))[:: 1 if index % 2 else -1]:
                uri = f"file:///bench/{index}.py"
                client.open(uri, source)
                got = await client.inline(uri, 2, 14)
                times[name].append(got.latency_ms)
                if got.completion_id:
                    await client.lsp.workspace_execute_command_async(
                        types.ExecuteCommandParams(
                            command="ghostloop.accept", arguments=[got.completion_id]
                        )
                    )
    finally:
        await on.stop()
        await off.stop()
    return times["on"], times["off"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--model", default=None)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        print(f"load avg {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
        rate, spilled = ingest_rate(f"sqlite:///{root / 'ingest.db'}", args.events, root)
        print(
            f"SQLite (WAL):  {rate:8.0f} events/s sustained ({args.events} events, "
            f"{spilled} passed through the journal when the queue was full)"
        )
        name = f"ghostloop_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
            rate, spilled = ingest_rate(url, args.events, root)
            print(
                f"PostgreSQL:    {rate:8.0f} events/s sustained ({args.events} events, "
                f"{spilled} passed through the journal when the queue was full)"
            )
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        model = args.model
        if model is None:
            from tests.tiny_model import build_tiny_model

            model = str(build_tiny_model(root / "tiny"))
        on, off = asyncio.run(latency_on_off(model, args.requests, root / "data"))
        p50_on, p50_off = statistics.median(on), statistics.median(off)
        print(
            f"completion p50 over LSP ({model or 'embedded SmolLM2'}, {args.requests} each, "
            f"alternating): logging on {p50_on:.1f} ms, off {p50_off:.1f} ms, "
            f"ratio {p50_on / p50_off:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
