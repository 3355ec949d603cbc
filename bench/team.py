"""A team on one server: N simulated developers type real files over TCP at once.

Each developer is a client with its own access token (the server runs with
``tcp_auth=required``, as a team's would), types lines of a stdlib module that no test,
replay or training corpus uses, word by word (``ghostloop.corpus.typing_pauses``), and at
each pause sends the document and asks for an inline completion, waits for it, then
types on for ``--think-ms`` (closed loop: a developer does not ask again before the
answer). For N = 1, 10, 50 (``--clients``) for ``--seconds`` each against one
``ghostloop serve --tcp`` it prints completions/s, p50/p99 latency over all completions,
each client's p50 against the fleet's median (fairness: goal at most 1.5x), errors, and
the server's resident and peak memory. ``--batch-sizes 1,4`` runs the whole series once
per server ``batch_size`` (1: one completion at a time; more: the documents waiting at
once decoded together), a fresh server each, so the two are compared in one run.

    PYTHONPATH=. python bench/team.py --model tiny [--clients 1,10,50] [--seconds 120] \
        [--last-seconds 300] [--think-ms 250]
    PYTHONPATH=. python bench/team.py --model smollm2 --seconds 120
    PYTHONPATH=. python bench/team.py --model smollm2 --clients 1,4,10 --batch-sizes 1,4

``--model tiny`` is the tests' tiny random Llama; ``smollm2`` the embedded default; any
other value is passed to the server as GHOSTLOOP_MODEL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.client import GhostloopClient
from feedback.database import open_engine, upgrade
from feedback.metrics import percentile
from feedback.tokens import add_token
from ghostloop.corpus import stdlib_dir, typing_pauses
from ghostloop.settings import load_settings
from lsp_server.positions import code_units

# (module, first line typed): outside every test, replay and training corpus
FILES = (
    ("calendar.py", 560),
    ("heapq.py", 300),
    ("ipaddress.py", 1303),
    ("textwrap.py", 240),
    ("fractions.py", 600),
    ("difflib.py", 700),
    ("shlex.py", 130),
    ("statistics.py", 500),
)
LINES_TYPED = 12


@dataclass
class Developer:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) of ``pid`` in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def type_along(
    developer: Developer,
    port: int,
    token: str,
    index: int,
    ready: asyncio.Event,
    start: asyncio.Event,
    stop_at: list[float],
    think_s: float,
) -> None:
    module, first_line = FILES[index % len(FILES)]
    pauses = typing_pauses(
        stdlib_dir() / module, first_line + 3 * (index // len(FILES)), LINES_TYPED
    )
    if not pauses:
        raise RuntimeError(f"{module} has no code lines after line {first_line} here")
    client = await GhostloopClient.connect("127.0.0.1", port, token=token, name=developer.name)
    await client.wait_ready()
    uri = f"file:///team/{developer.name}/{module}"
    opened = False
    ready.set()
    await start.wait()
    step = 0
    while time.monotonic() < stop_at[0]:
        prefix, suffix = pauses[step % len(pauses)]
        step += 1
        if opened:
            client.replace(uri, prefix + suffix)
        else:
            client.open(uri, prefix + suffix)
            opened = True
        line = prefix.count("\n")
        character = code_units(prefix[prefix.rfind("\n") + 1 :], "utf-16")
        try:
            suggestion = await client.inline(uri, line, character)
        except Exception as error:  # every failure is a figure here
            developer.errors.append(f"{type(error).__name__}: {error}"[:200])
        else:
            developer.latencies_ms.append(suggestion.latency_ms)
        await asyncio.sleep(think_s)
    await client.stop()


async def one_round(
    port: int, tokens: list[str], seconds: float, think_s: float
) -> list[Developer]:
    developers = [Developer(f"dev{i:02d}") for i in range(len(tokens))]
    ready = [asyncio.Event() for _ in tokens]
    start = asyncio.Event()
    stop_at = [float("inf")]
    tasks = [
        asyncio.create_task(type_along(d, port, t, i, ready[i], start, stop_at, think_s))
        for i, (d, t) in enumerate(zip(developers, tokens, strict=True))
    ]
    # everyone connects first; the clock starts when all are in
    waiting = [asyncio.create_task(event.wait()) for event in ready]
    await asyncio.wait([*waiting, *tasks], return_when=asyncio.ALL_COMPLETED, timeout=0)
    while not all(event.is_set() for event in ready):
        failed = [task for task in tasks if task.done() and task.exception()]
        if failed:
            raise RuntimeError(f"a developer could not connect: {failed[0].exception()}")
        await asyncio.sleep(0.1)
    for task in waiting:
        task.cancel()
    stop_at[0] = time.monotonic() + seconds
    start.set()
    await asyncio.gather(*tasks)
    return developers


async def server_stats(port: int, token: str) -> dict[str, int]:
    """The server's counters (ghostloop/status), through a connection of its own."""
    client = await GhostloopClient.connect("127.0.0.1", port, token=token, name="monitor")
    status = await client.status()
    await client.stop()
    stats = status["stats"]
    return {
        "completed": stats["completed"],
        "deadline": stats["deadline"],
        "empty": stats["empty"],
        "tokens": stats["tokens_generated"],
        "batched": stats.get("batched", 0),
    }


def report(n: int, developers: list[Developer], seconds: float, pid: int) -> dict[str, float]:
    latencies = [ms for d in developers for ms in d.latencies_ms]
    errors = sum(len(d.errors) for d in developers)
    client_p50s = [statistics.median(d.latencies_ms) for d in developers if d.latencies_ms]
    fleet = statistics.median(client_p50s) if client_p50s else float("nan")
    worst = max(client_p50s) if client_p50s else float("nan")
    rss, peak = memory_mb(pid)
    figures = {
        "clients": n,
        "completions": len(latencies),
        "per_s": len(latencies) / seconds,
        "p50": percentile(latencies, 0.5) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"),
        "fleet_p50": fleet,
        "worst_client_p50": worst,
        "errors": errors,
        "rss_mb": rss,
        "peak_mb": peak,
    }
    print(
        f"{n:>4} {len(latencies):>8} {figures['per_s']:>8.2f} {figures['p50']:>8.0f} "
        f"{figures['p99']:>8.0f} {figures['p99'] / figures['p50']:>8.2f} {fleet:>9.0f} "
        f"{worst / fleet:>10.2f} {errors:>7} {rss:>8.0f} {peak:>8.0f}",
        flush=True,
    )
    for d in developers:
        for error in d.errors[:2]:
            print(f"      {d.name}: {error}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a GHOSTLOOP_MODEL")
    parser.add_argument("--clients", default="1,10,50", help="fleet sizes, e.g. 1,10,50")
    parser.add_argument("--seconds", type=float, default=120.0, help="per fleet size")
    parser.add_argument(
        "--last-seconds", type=float, help="the largest fleet runs this long instead"
    )
    parser.add_argument("--think-ms", type=float, default=250.0, help="typing between asks")
    parser.add_argument(
        "--deadline-ms", type=int, default=3000, help="the server's deadline_ms (its default)"
    )
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    parser.add_argument("--int8", action="store_true", help="onnxruntime: int8 weights")
    parser.add_argument("--database-url", default="", help="default: SQLite in a temp dir")
    parser.add_argument(
        "--batch-sizes", default="", help="server batch_size values, e.g. 1,4 (default: its own)"
    )
    args = parser.parse_args()
    sizes = [int(n) for n in args.clients.split(",")]
    batch_sizes: list[int | None] = [int(b) for b in args.batch_sizes.split(",") if b] or [None]

    work = Path(tempfile.mkdtemp(prefix="ghostloop-team-"))
    model = args.model
    if model == "tiny":
        from tests.tiny_model import build_tiny_model  # the tests' model, built in a second

        model = str(build_tiny_model(work / "tiny-model"))
    elif model == "smollm2":
        model = ""  # the embedded default
    # the embedded model's converted copy lives in the data dir: reuse the usual one
    data_dir = load_settings().store.data_dir if model == "" else work / "data"
    url = args.database_url or f"sqlite:///{work / 'team.db'}"
    store = open_engine(url)
    upgrade(store)
    tokens = [add_token(store, f"dev{i:02d}", note="bench/team.py")[1] for i in range(max(sizes))]
    store.dispose()

    for batch_size in batch_sizes:
        code = serve_and_measure(args, sizes, tokens, model, data_dir, url, work, batch_size)
        if code:
            return code
    return 0


def serve_and_measure(
    args: argparse.Namespace,
    sizes: list[int],
    tokens: list[str],
    model: str,
    data_dir: Path,
    url: str,
    work: Path,
    batch_size: int | None,
) -> int:
    """One server (``batch_size``: its setting, None for its default), every fleet size."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GHOSTLOOP_")},
        "GHOSTLOOP_MODEL": model,
        "GHOSTLOOP_DATA_DIR": str(data_dir),
        "GHOSTLOOP_DATABASE_URL": url,
        "GHOSTLOOP_TCP_AUTH": "required",
        "GHOSTLOOP_DEADLINE_MS": str(args.deadline_ms),
        "GHOSTLOOP_BACKEND": args.backend,
        "GHOSTLOOP_ONNX_INT8": "true" if args.int8 else "false",
        "GHOSTLOOP_LOG_LEVEL": "WARNING",
    }
    if batch_size is not None:
        env["GHOSTLOOP_BATCH_SIZE"] = str(batch_size)
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "ghostloop", "serve", "--tcp", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print((work / "server.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.2)
        print(
            f"team server: model {args.model} on {args.backend}{' int8' if args.int8 else ''}, "
            f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, think {args.think_ms:.0f} ms, clients in this process, "
            f"batch_size {batch_size if batch_size is not None else 'default'}"
        )
        print(
            f"{'N':>4} {'done':>8} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>8} "
            f"{'fleet p50':>9} {'worst/fl':>10} {'errors':>7} {'rss MiB':>8} {'peak MiB':>8}"
        )
        for n in sizes:
            seconds = args.last_seconds if args.last_seconds and n == max(sizes) else args.seconds
            before = asyncio.run(server_stats(port, tokens[0]))
            developers = asyncio.run(one_round(port, tokens[:n], seconds, args.think_ms / 1000))
            after = asyncio.run(server_stats(port, tokens[0]))
            report(n, developers, seconds, server.pid)
            done = max(1, after["completed"] - before["completed"])
            cut = after["deadline"] - before["deadline"]
            print(
                f"      server: {done} completed, {100 * cut / done:.1f} % cut at the "
                f"{args.deadline_ms} ms deadline, "
                f"{100 * (after['empty'] - before['empty']) / done:.1f} % empty, "
                f"{(after['tokens'] - before['tokens']) / seconds:.0f} tokens/s, "
                f"{100 * (after['batched'] - before['batched']) / done:.0f} % decoded in a batch",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
