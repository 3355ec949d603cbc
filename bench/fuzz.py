"""A hostile client for long runs: real `ghostloop serve` processes fed mutated LSP traffic.

The property tests (tests/unit/test_handler_fuzz.py and the framing tests) run a few
thousand cases in CI; this drives the real server on stdio and on TCP for as long as you
like, as a hostile or broken editor would, and prints what went wrong:

- crashes: the server process ended;
- hangs: a liveness probe (``ghostloop/status``, every ~100 messages) not answered within
  ``--hang-s``; the slowest liveness reply is printed too;
- internal errors: responses with code -32603;
- unanswered requests: a request with a valid id that got no response by the end, and
  responses to ids never sent (e.g. ids that stood inside params);
- diverged documents: after every edit the client asks ``ghostloop/documentState`` and
  compares the server's text (SHA-256) with its own;
- the store afterwards: SQLite's integrity check, no event without its completion, every
  stored completion one the server answered.

The traffic: documents opened, edited (ranges at the LSP's line breaks, text with form
feeds, U+2028, NEL, lone \\r, astral characters), completed at valid and invalid
positions, accepted, rejected and closed; mutations of each message (fields dropped or
of the wrong type, JSON-RPC objects inside params, absurd numbers, unknown methods, no
id, odd ids); on stdio also framing attacks (absurd Content-Length, garbage between
frames). On TCP every message is well framed (a bad frame closes its connection by
design), and a throwaway connection sends a framing attack now and then while the main
one must stay served.

    python bench/fuzz.py [--messages 100000] [--tcp-messages 10000] [--seed 0]
                         [--model PATH] [--hang-s 30]

Uses the tests' tiny random Llama (built in a second) unless ``--model`` names another:
the protocol is what is fuzzed, not the model's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIECES = ["a", "x = 1", "def f(self):", "    return self.", "é", "😀", " ", "\t", "(", ")", ":"]
PIECES += ["\n", "\r\n", "\r", "\f", "\x0b", "\x1c", "\x85", "\u2028", "\u2029", "# ok"]
LSP_BREAK = re.compile(r"\r\n|\r|\n")
METHODS = [
    "textDocument/inlineCompletion",
    "textDocument/completion",
    "ghostloop/status",
    "ghostloop/documentState",
    "workspace/executeCommand",
    "ghostloop/reloadAdapters",
    "ghostloop/noSuchMethod",
    "initialize",
]
NOTIFICATIONS = [
    "textDocument/didChange",
    "textDocument/didOpen",
    "textDocument/didClose",
    "ghostloop/feedback",
    "$/cancelRequest",
    "$/setTrace",
    "workspace/didChangeConfiguration",
]
ODD_VALUES: list[Any] = [
    None,
    -1,
    2**64,
    10**300,
    1.5,
    True,
    "",
    "x" * 300,
    "\ud800",
    [],
    {},
    {"jsonrpc": "2.0", "id": 424242, "method": "ghostloop/status"},
    {"jsonrpc": "2.0", "method": "exit"},
]


def position_of(text: str, offset: int) -> dict[str, int]:
    """The LSP position of ``offset`` (UTF-16 columns, \\r \\n \\r\\n line breaks)."""
    before = text[:offset]
    breaks = list(LSP_BREAK.finditer(before))
    start = breaks[-1].end() if breaks else 0
    return {"line": len(breaks), "character": len(before[start:].encode("utf-16-le")) // 2}


def boundary(text: str, rng: random.Random) -> int:
    """A random offset a client can name (not inside a \\r\\n)."""
    offset = rng.randint(0, len(text))
    while 0 < offset < len(text) and text[offset - 1 : offset + 1] == "\r\n":
        offset = rng.randint(0, len(text))
    return offset


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Report:
    transport: str
    messages: int = 0
    requests: int = 0
    crashes: int = 0
    hangs: int = 0
    internal_errors: int = 0
    unanswered: int = 0
    unexpected_ids: int = 0
    diverged: int = 0
    completions_served: int = 0
    served_ids: set[str] = field(default_factory=set)
    liveness_ms: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(what[:300])

    def lines(self) -> list[str]:
        slowest = max(self.liveness_ms, default=0.0)
        ordered = sorted(self.liveness_ms)
        median = ordered[len(ordered) // 2] if ordered else 0.0
        return [
            f"{self.transport}: {self.messages} messages ({self.requests} requests, "
            f"{self.completions_served} completions served)",
            f"  crashes {self.crashes}  hangs {self.hangs}  internal errors "
            f"{self.internal_errors}  unanswered requests {self.unanswered}  answers to ids "
            f"never sent {self.unexpected_ids}  diverged documents {self.diverged}",
            f"  liveness replies: {len(ordered)}, median {median:.1f} ms, slowest {slowest:.1f} ms",
            *(f"  e.g. {example}" for example in self.examples),
        ]


class Peer:
    """One connection to a server: framed writes, a reader that files every answer."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: Callable[[bytes], None], report: Report
    ) -> None:
        self.reader, self.write, self.report = reader, writer, report
        self.pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.sent_ids: set[Any] = set()
        self.closed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                length = 0
                while (line := await self.reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                if not line and not length:
                    return
                message = json.loads(await self.reader.readexactly(length))
                if "id" in message and "method" not in message:
                    self._answer(message)
                elif "id" in message and "method" in message:  # a request from the server
                    self.frame({"jsonrpc": "2.0", "id": message["id"], "result": None})
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.closed.set()

    def _answer(self, message: dict[str, Any]) -> None:
        key = json.dumps(message["id"])
        if key not in self.sent_ids:
            self.report.unexpected_ids += 1
            self.report.note(f"answer to an id never sent: {json.dumps(message)[:200]}")
            return
        error = message.get("error")
        if error and error.get("code") == -32603:
            self.report.internal_errors += 1
            self.report.note(f"internal error: {error.get('message')}")
        future = self.pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(message)

    def frame(self, message: dict[str, Any]) -> None:
        body = json.dumps(message).encode("utf-8", "surrogatepass")
        self.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.report.messages += 1

    def request(self, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        key = json.dumps(message["id"])
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.sent_ids.add(key)
        self.pending[key] = future
        self.report.requests += 1
        self.frame(message)
        return future


class Client:
    """A fuzzing editor: an exact model of its documents, and a generator of traffic."""

    def __init__(self, peer: Peer, rng: random.Random, *, framing_attacks: bool) -> None:
        self.peer, self.rng = peer, rng
        self.framing_attacks = framing_attacks
        self.documents: dict[str, str] = {}
        self.versions: dict[str, int] = {}
        self.served: list[tuple[str, int]] = []  # (completion id, length)
        self._ids = 0
        self.inflight: list[asyncio.Future[dict[str, Any]]] = []

    def next_id(self) -> Any:
        self._ids += 1
        return self._ids if self._ids % 3 else f"s{self._ids}"

    def text(self) -> str:
        return "".join(self.rng.choice(PIECES) for _ in range(self.rng.randint(0, 12)))

    # -- well-formed traffic
    def open(self) -> None:
        uri = f"file:///fuzz/doc{len(self.documents)}%20{self.rng.randint(0, 9)}.py"
        text = "def f(self):\n    return self." + self.text()
        self.documents[uri], self.versions[uri] = text, 1
        document = {"uri": uri, "languageId": "python", "version": 1, "text": text}
        self.peer.frame(
            {
                "jsonrpc": "2.0",
                "method": "textDocument/didOpen",
                "params": {"textDocument": document},
            }
        )

    def edit(self, uri: str) -> None:
        text = self.documents[uri]
        start, end = sorted((boundary(text, self.rng), boundary(text, self.rng)))
        new = self.text()
        change = {"range": {"start": position_of(text, start), "end": position_of(text, end)}}
        self.documents[uri] = text[:start] + new + text[end:]
        self.versions[uri] += 1
        self.peer.frame(
            {
                "jsonrpc": "2.0",
                "method": "textDocument/didChange",
                "params": {
                    "textDocument": {"uri": uri, "version": self.versions[uri]},
                    "contentChanges": [{**change, "text": new}],
                },
            }
        )

    def check(self, uri: str) -> None:
        expected = sha(self.documents[uri])
        future = self.peer.request(
            {
                "jsonrpc": "2.0",
                "id": self.next_id(),
                "method": "ghostloop/documentState",
                "params": {"textDocument": {"uri": uri}},
            }
        )

        def compare(done: asyncio.Future[dict[str, Any]]) -> None:
            if done.cancelled():
                return
            result = done.result().get("result") or {}
            if result.get("sha256") != expected:
                self.peer.report.diverged += 1
                self.peer.report.note(f"diverged: {uri} {json.dumps(done.result())[:200]}")

        future.add_done_callback(compare)
        self.inflight.append(future)

    def complete(self, uri: str) -> None:
        text = self.documents[uri]
        method = self.rng.choice(["textDocument/inlineCompletion", "textDocument/completion"])
        position = position_of(text, boundary(text, self.rng))
        if self.rng.random() < 0.1:  # outside the document
            position = {"line": self.rng.choice([999, -1]), "character": 0}
        future = self.peer.request(
            {
                "jsonrpc": "2.0",
                "id": self.next_id(),
                "method": method,
                "params": {
                    "textDocument": {"uri": uri},
                    "position": position,
                    "context": {"triggerKind": 1},
                },
            }
        )

        def keep(done: asyncio.Future[dict[str, Any]]) -> None:
            if done.cancelled():
                return
            result = done.result().get("result") or {}
            for item in result.get("items", []) if isinstance(result, dict) else []:
                command = item.get("command") or {}
                arguments = command.get("arguments") or []
                if len(arguments) == 2:
                    self.served.append((arguments[0], arguments[1]))
                    self.peer.report.completions_served += 1
                    self.peer.report.served_ids.add(arguments[0])

        future.add_done_callback(keep)
        self.inflight.append(future)

    def decide(self) -> None:
        if not self.served:
            return
        completion_id, length = self.rng.choice(self.served)
        if self.rng.random() < 0.5:
            future = self.peer.request(
                {
                    "jsonrpc": "2.0",
                    "id": self.next_id(),
                    "method": "workspace/executeCommand",
                    "params": {
                        "command": "ghostloop.accept",
                        "arguments": [completion_id, self.rng.randint(0, length)],
                    },
                }
            )
            self.inflight.append(future)
        else:
            kind = self.rng.choice(["shown", "rejected", "dismissed"])
            self.peer.frame(
                {
                    "jsonrpc": "2.0",
                    "method": "ghostloop/feedback",
                    "params": {"completionId": completion_id, "kind": kind},
                }
            )

    def close(self, uri: str) -> None:
        del self.documents[uri]
        self.peer.frame(
            {
                "jsonrpc": "2.0",
                "method": "textDocument/didClose",
                "params": {"textDocument": {"uri": uri}},
            }
        )

    # -- hostile traffic
    def mutant(self) -> None:
        """A message of the right shape with something wrong; never on a tracked document
        (its text would no longer be known to this client)."""
        rng = self.rng
        uri = f"file:///fuzz/scratch{rng.randint(0, 3)}.py"
        params: Any = {
            "textDocument": {"uri": uri, "version": rng.choice(ODD_VALUES)},
            "position": {"line": rng.choice(ODD_VALUES), "character": rng.choice(ODD_VALUES)},
            "contentChanges": rng.choice([ODD_VALUES, [{"text": self.text()}], "x", None]),
            "completionId": rng.choice(ODD_VALUES),
            "kind": rng.choice(["shown", "nope", None]),
            "command": rng.choice(["ghostloop.accept", "nope"]),
            "arguments": rng.choice([[rng.choice(ODD_VALUES)], ODD_VALUES, None]),
            "x": rng.choice(ODD_VALUES),
        }
        for name in rng.sample(list(params), rng.randint(0, len(params))):
            del params[name]
        if rng.random() < 0.2:
            params = rng.choice(ODD_VALUES)
        if rng.random() < 0.5:
            message = {"jsonrpc": "2.0", "method": rng.choice(NOTIFICATIONS), "params": params}
        else:
            message = {
                "jsonrpc": "2.0",
                "id": self.next_id(),
                "method": rng.choice(METHODS),
                "params": params,
            }
        if rng.random() < 0.05:
            message["jsonrpc"] = rng.choice(["1.0", None, 2])
        if "id" in message:  # a request, or one with a bad "jsonrpc": answered either way
            self.inflight.append(self.peer.request(message))
        else:
            self.peer.frame(message)

    def framing_attack(self) -> None:
        attack = self.rng.choice(
            [
                b"Content-Length: 73786976294838206464\r\n\r\n",
                b"Content-Length: 1000000000000\r\n\r\n",
                b"Content-Length: -1\r\n\r\n",
                b"Content-Length: 5\r\n\r\n[1,2]",
                b"Content-Length: 9\r\n\r\nnot json!",
                b"\x00\xff garbage \r\n\r\n",
                bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 200))),
            ]
        )
        self.peer.write(attack)
        self.peer.report.messages += 1

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        if not self.documents or (roll < 0.03 and len(self.documents) < 20):
            self.open()
            return
        uri = rng.choice(list(self.documents))
        if roll < 0.35:
            self.edit(uri)
            self.check(uri)
        elif roll < 0.50:
            self.complete(uri)
        elif roll < 0.58:
            self.decide()
        elif roll < 0.60 and len(self.documents) > 1:
            self.close(uri)
        elif roll < 0.63 and self.framing_attacks:
            self.framing_attack()
        else:
            self.mutant()


async def probe(peer: Peer, client: Client, hang_s: float) -> bool:
    """One liveness request; False when it was not answered in time (a hang)."""
    started = time.monotonic()
    future = peer.request(
        {"jsonrpc": "2.0", "id": client.next_id(), "method": "ghostloop/status", "params": None}
    )
    try:
        await asyncio.wait_for(asyncio.shield(future), hang_s)
    except TimeoutError:
        peer.report.hangs += 1
        peer.report.note(f"no liveness reply within {hang_s:g} s")
        return False
    peer.report.liveness_ms.append((time.monotonic() - started) * 1000)
    return True


async def drive(
    peer: Peer, client: Client, count: int, hang_s: float, alive: Callable[[], bool]
) -> None:
    sent_before = peer.report.messages
    while peer.report.messages - sent_before < count:
        if not alive():
            peer.report.crashes += 1
            peer.report.note("the server process ended")
            return
        for _ in range(100):
            client.step()
        client.inflight = [f for f in client.inflight if not f.done()]
        if len(client.inflight) > 64:  # an editor does not queue hundreds of requests
            await asyncio.wait(client.inflight[:32], timeout=hang_s)
        if not await probe(peer, client, hang_s):
            return
    await asyncio.wait(
        [f for f in client.inflight if not f.done()] or [asyncio.sleep(0)], timeout=hang_s
    )
    unanswered = [key for key, future in peer.pending.items() if not future.done()]
    peer.report.unanswered += len(unanswered)
    if unanswered:
        peer.report.note(f"unanswered request ids: {unanswered[:5]}")


async def shutdown(peer: Peer, client: Client) -> None:
    future = peer.request({"jsonrpc": "2.0", "id": client.next_id(), "method": "shutdown"})
    await asyncio.wait_for(future, 120)
    peer.frame({"jsonrpc": "2.0", "method": "exit"})


async def fuzz_stdio(env: dict[str, str], count: int, seed: int, hang_s: float) -> Report:
    report = Report("stdio")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ghostloop", "serve",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env=env, limit=2**24,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    stdin = process.stdin
    peer = Peer(process.stdout, stdin.write, report)
    client = Client(peer, random.Random(seed), framing_attacks=True)
    await initialize(peer, client)
    await drive(peer, client, count, hang_s, lambda: process.returncode is None)
    if process.returncode is None and not report.hangs:
        try:
            await shutdown(peer, client)
            code = await asyncio.wait_for(process.wait(), 120)
        except TimeoutError:
            report.hangs += 1
            report.note("shutdown and exit were not answered")
        else:
            if code != 0:
                report.crashes += 1
                report.note(f"exit code {code} after shutdown and exit")
    if process.returncode is None:
        process.kill()
        await process.wait()
    return report


async def fuzz_tcp(env: dict[str, str], count: int, seed: int, hang_s: float) -> Report:
    report = Report("tcp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ghostloop", "serve", "--tcp", "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    reader, writer = await connect(port)
    peer = Peer(reader, writer.write, report)
    client = Client(peer, random.Random(seed), framing_attacks=False)
    await initialize(peer, client)
    rng = random.Random(seed + 1)
    sent = 0
    while sent < count and process.returncode is None and not peer.closed.is_set():
        chunk = min(1000, count - sent)
        await drive(peer, client, chunk, hang_s, lambda: process.returncode is None)
        sent += chunk
        _, attacker = await connect(port)  # another client's bad frame: its own loss only
        attacker.write(
            rng.choice([b"Content-Length: 99999999999\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"])
        )
        await attacker.drain()
        attacker.close()
    if peer.closed.is_set():
        report.crashes += 1
        report.note("the server closed the main connection")
    if process.returncode is not None:
        report.crashes += 1
        report.note(f"the team server ended with {process.returncode}")
    else:
        process.send_signal(2)  # SIGINT, as an admin's ctrl-c
        try:
            code = await asyncio.wait_for(process.wait(), 120)
        except TimeoutError:
            report.hangs += 1
            report.note("the team server did not stop on SIGINT")
            process.kill()
            await process.wait()
        else:
            if code != 0:
                report.crashes += 1
                report.note(f"the team server ended with {code} on SIGINT")
    return report


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = time.monotonic() + 120
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port, limit=2**24)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def initialize(peer: Peer, client: Client) -> None:
    await asyncio.wait_for(
        peer.request(
            {
                "jsonrpc": "2.0",
                "id": client.next_id(),
                "method": "initialize",
                "params": {"processId": None, "capabilities": {}},
            }
        ),
        120,
    )
    peer.frame({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    while True:
        status = await peer.request(
            {"jsonrpc": "2.0", "id": client.next_id(), "method": "ghostloop/status"}
        )
        if status.get("result", {}).get("state") != "starting":
            return
        await asyncio.sleep(0.1)


def store_problems(database: Path, served: set[str]) -> list[str]:
    """What is wrong with the store the fuzzed servers left (empty: nothing)."""
    if not database.exists():
        return ["no store was written"] if served else []
    with sqlite3.connect(database) as connection:
        problems = [
            row[0] for row in connection.execute("PRAGMA integrity_check") if row[0] != "ok"
        ]
        orphans = connection.execute(
            "SELECT count(*) FROM events e LEFT JOIN completions c "
            "ON c.id = e.completion_id WHERE c.id IS NULL"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} events without their completion")
        stored = {row[0] for row in connection.execute("SELECT id FROM completions")}
    if stored - served:
        problems.append(f"{len(stored - served)} stored completions no client was served")
    if served - stored:
        problems.append(f"{len(served - stored)} served completions not stored")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="over stdio")
    parser.add_argument("--tcp-messages", type=int, default=10_000, help="over TCP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model path (default: the tests' tiny random Llama)")
    parser.add_argument("--hang-s", type=float, default=30.0, help="a probe slower is a hang")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ghostloop-fuzz-") as work:
        root = Path(work)
        model = args.model
        if not model:
            from tests.tiny_model import build_tiny_model  # the tests' model, built in a second

            model = str(build_tiny_model(root / "tiny-model"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTLOOP_")}
        env.update(
            GHOSTLOOP_MODEL=model,
            GHOSTLOOP_DATA_DIR=str(root / "data"),
            GHOSTLOOP_SURVIVAL_WINDOWS_S="1,3",
            GHOSTLOOP_ADAPTER_POLL_S="0",
            GHOSTLOOP_RATE_LIMIT_PER_MINUTE="0",
            PYTHONPATH=str(ROOT),
        )
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, seed {args.seed}"
        )
        reports: list[Report] = []
        started = time.monotonic()
        for name, run, count in (
            ("stdio", fuzz_stdio, args.messages),
            ("tcp", fuzz_tcp, args.tcp_messages),
        ):
            if count <= 0:
                continue
            began = time.monotonic()
            report = asyncio.run(run(env, count, args.seed, args.hang_s))
            reports.append(report)
            print("\n".join(report.lines()))
            print(f"  {name}: {time.monotonic() - began:.0f} s")
        served = set().union(*(r.served_ids for r in reports))
        problems = store_problems(root / "data" / "ghostloop.db", served)
        if problems:
            print(f"store: {'; '.join(problems)}")
        else:
            print(
                f"store: consistent (integrity ok, every event's completion there, the "
                f"{len(served)} completions served stored and nothing else)"
            )
        print(f"total {time.monotonic() - started:.0f} s")
        bad = sum(
            r.crashes + r.hangs + r.internal_errors + r.unanswered + r.unexpected_ids + r.diverged
            for r in reports
        )
        raise SystemExit(1 if bad or problems else 0)


if __name__ == "__main__":
    main()
