"""What a hot-swap costs the developer typing through it.

A live ``ghostloop serve`` (SmolLM2 by default) answers back-to-back inline completions at
real positions of a stdlib file, from one run:

1. steady state on the base model, then steady state on a rank-16 adapter (the cost of
   serving LoRA unmerged);
2. ``--swaps`` publications of a new rank-16 adapter while the stream goes on: latency of
   the requests in flight from 1 s before each publication to 2 s after it (and two
   requests past the first one the new adapter served), the time the server took to read
   and check the adapter (``last_read_ms``; inference never waits for it), and the time
   from publication until the first completion served by it (includes the poll interval).

With ``--backend onnxruntime`` (``--int8`` for its int8 copy) the server serves the base
export with LoRA slots and each publication carries its adapter file, as the nightly job
writes it on that backend; the bench also prints the disk each published adapter takes,
the server's resident memory on the base model and after the swaps, and, in a process of
its own, the resident memory of the base export alone and holding three of the published
adapter files at once (each bound for a forward pass), as a server holds the active
adapter, a canary and one being read.

    python bench/swap.py [--model PATH] [--requests 60] [--swaps 5] [--poll 0.5]
                         [--backend torch|onnxruntime] [--int8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy.orm import Session

from evaluation.client import GhostloopClient
from feedback import adapter_rows
from feedback.database import open_engine, upgrade
from feedback.metrics import percentile
from ghostloop import registry
from ghostloop.corpus import stdlib_dir
from ghostloop.models import resolve_model
from ghostloop.settings import Settings

RANK = 16
SOURCE = "argparse.py"


def positions(text: str, count: int) -> list[tuple[int, int]]:
    lines = text.splitlines()
    found = [
        (n, len(line) - len(line.lstrip()))
        for n, line in enumerate(lines)
        if line.strip() and not line.lstrip().startswith(("#", '"', "'")) and n > 50
    ]
    step = max(1, len(found) // count)
    return found[::step][:count]


def make_adapter(source: str, directory: Path, seed: int) -> None:
    """A rank-16 LoRA on q/k/v/o whose factors are small random values (a trained adapter's
    size and cost without a night of training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(source)
    config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 1e-3)
    peft_model.save_pretrained(str(directory), safe_serialization=True)


def publish(
    settings: Settings,
    made: Path,
    base_model: str,
    version: str,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> float:
    """Copy the adapter made beforehand into the registry and publish it as ``version``
    (what the nightly job does at its end; with ``shapes``, the onnxruntime base export's
    LoRA inputs, its adapter file written too); returns the moment its row is committed."""

    def copy(directory: Path) -> None:
        for name in registry.ADAPTER_FILES:
            shutil.copyfile(made / name, directory / name)
        if shapes is not None:
            from ghostloop import onnx_backend
            from ghostloop.lora import read_factors

            checksum = registry.checksum(directory)
            weights = read_factors(directory, version=version, expected_checksum=checksum)
            onnx_backend.write_adapter(
                weights, directory / registry.EXPORT_DIR, shapes, model_name=base_model
            )

    path, digest = registry.write_atomically(settings.store.adapters_dir, version, copy)
    engine = open_engine(settings.store.database_url)
    with Session(engine) as session, session.begin():
        adapter_rows.publish(
            session,
            version=version,
            base_model=base_model,
            run_id=None,
            path=path,
            checksum=digest,
            evidence={"bench": True},
        )
    committed = time.monotonic()
    engine.dispose()
    return committed


def slot_shapes(source: str, settings: Settings) -> dict[str, tuple[int, int]]:
    """The LoRA inputs of the base export the server makes (the nightly job's slots)."""
    from transformers import AutoModelForCausalLM

    from ghostloop import onnx_backend

    model = AutoModelForCausalLM.from_pretrained(source)
    return onnx_backend.slot_shapes(model, onnx_backend.slots_for(settings))


def rss_mb(pid: int | None) -> float:
    """Resident memory of process ``pid`` now, MB (Linux)."""
    if pid is None:
        return float("nan")
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def held_at_once(
    settings: Settings, base_model: str, versions: list[str], int8: bool
) -> tuple[float, float]:
    """Resident memory (MB) of this process with the server's base export loaded and run
    once, then with the adapter files of ``versions`` read and each run once too."""
    import numpy as np

    from ghostloop import onnx_backend

    [path] = (settings.store.model_cache_dir / "onnx").glob(f"*/{onnx_backend.ONNX_FILE}")
    model = onnx_backend.load(
        onnx_backend.quantized(path) if int8 else path, model_name=base_model, threads=0
    )
    prompt = np.arange(1, 200).tolist()
    onnx_backend.OnnxForward(model).prefill(prompt)
    alone = rss_mb(os.getpid())
    held = []
    for version in versions:
        directory = settings.store.adapters_dir / version
        held.append(
            onnx_backend.adapter_file(
                directory, model, version=version, checksum=registry.checksum(directory)
            )
        )
        onnx_backend.OnnxForward(model, adapter=held[-1]).prefill(prompt)
    return alone, rss_mb(os.getpid())


def disk_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6


def line(label: str, values: list[float]) -> str:
    return (
        f"{label:34} n={len(values):4d}  p50 {statistics.median(values):7.1f} ms  "
        f"p99 {percentile(values, 0.99):7.1f} ms"
    )


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="ghostloop-swap-"))
    database = f"sqlite:///{data_dir / 'ghostloop.db'}"
    settings = Settings.of(model=args.model, data_dir=data_dir, database_url=database)
    base_model, source = resolve_model(settings)
    upgrade(open_engine(database))
    env = {
        **os.environ,
        "GHOSTLOOP_MODEL": args.model,
        "GHOSTLOOP_DATA_DIR": str(data_dir),
        "GHOSTLOOP_DATABASE_URL": database,
        "GHOSTLOOP_ADAPTER_POLL_S": str(args.poll),
        "GHOSTLOOP_MAX_NEW_TOKENS": "16",
        "GHOSTLOOP_DEADLINE_MS": "60000",  # no cut-off: p99 must be the real tail
        "GHOSTLOOP_LOG_LEVEL": "WARNING",
        "GHOSTLOOP_BACKEND": args.backend,
        "GHOSTLOOP_ONNX_INT8": str(args.int8).lower(),
    }
    made = []
    for seed in range(args.swaps + 1):  # made before the stream: only publishing is timed
        made.append(data_dir / "made" / str(seed))
        make_adapter(source, made[-1], seed)
    shapes = slot_shapes(source, settings) if args.backend == "onnxruntime" else None
    client = await GhostloopClient.start(env=env)
    try:
        await client.wait_ready()
        text = (stdlib_dir() / SOURCE).read_text(encoding="utf-8")
        uri = f"file:///bench/{SOURCE}"
        client.open(uri, text)
        spots = positions(text, 40)
        served: list[tuple[float, float]] = []  # (finished at, latency ms)

        async def stream(until: float) -> None:
            while time.monotonic() < until:
                spot = spots[len(served) % len(spots)]
                got = await client.inline(uri, *spot)
                served.append((time.monotonic(), got.latency_ms))

        for _ in range(3):  # warm up
            await client.inline(uri, *spots[0])

        async def steady_state() -> list[float]:
            started = len(served)
            while len(served) - started < args.requests:
                spot = spots[len(served) % len(spots)]
                got = await client.inline(uri, *spot)
                served.append((time.monotonic(), got.latency_ms))
            return [ms for _, ms in served[started:]]

        base = await steady_state()
        memory = {"base model": rss_mb(client.pid)}
        await asyncio.to_thread(publish, settings, made[0], base_model, "bench-0", shapes)
        while (await client.status())["adapter"] != "bench-0":
            await asyncio.sleep(0.05)
        steady = await steady_state()

        around: list[float] = []
        reads: list[float] = []
        visible: list[float] = []
        for index in range(1, args.swaps + 1):
            version = f"bench-{index}"
            first = len(served)
            window_start = time.monotonic()
            await stream(window_start + 1.0)
            committed = await asyncio.to_thread(
                publish, settings, made[index], base_model, version, shapes
            )
            seen_at: float | None = None
            after_seen = 0
            while seen_at is None or after_seen < 2 or time.monotonic() - committed < 2.0:
                spot = spots[len(served) % len(spots)]
                got = await client.inline(uri, *spot)
                served.append((time.monotonic(), got.latency_ms))
                if seen_at is None:
                    status = await client.status()
                    if status["adapter"] == version:
                        seen_at = time.monotonic()
                else:
                    after_seen += 1
            status = await client.status()
            reads.append(float(status["adapters"]["last_read_ms"]))
            visible.append((seen_at - committed) * 1000)
            # every request in flight from 1 s before the publication until 2 s after it,
            # and at least until two requests after the new adapter served
            end = max(committed + 2.0, seen_at)
            around += [
                ms for at, ms in served[first:] if at >= committed - 1.0 and at - ms / 1000 <= end
            ]
        memory["after the swaps"] = rss_mb(client.pid)
    finally:
        await client.stop()
    if args.backend == "onnxruntime":
        versions = [f"bench-{index}" for index in range(max(0, args.swaps - 2), args.swaps + 1)]
        memory["one process, base"], memory["one process, base + 3"] = held_at_once(
            settings, base_model, versions, args.int8
        )

    backend = args.backend + (" int8" if args.int8 and args.backend == "onnxruntime" else "")
    print(
        f"model {base_model} on {backend}, rank-{RANK} LoRA on q/k/v/o, 16 new tokens, "
        f"poll {args.poll} s"
    )
    print(line("steady, base model", base))
    print(line("steady, adapter", steady))
    print(line("in flight from -1 s to +2 s of a swap", around))
    ratio = percentile(around, 0.99) / percentile(steady, 0.99)
    print(f"p99 around swaps / p99 steady (adapter): {ratio:.2f}  (goal <= 1.2)")
    print(
        f"p50 adapter / p50 base model: {statistics.median(steady) / statistics.median(base):.2f}"
    )
    print(
        f"swap: read and check the adapter, median {statistics.median(reads):.1f} ms "
        f"(max {max(reads):.1f}) beside inference (goal < 100 ms); switching is one "
        "reference assignment"
    )
    print(
        f"publication to first completion served by it: median "
        f"{statistics.median(visible):.0f} ms (poll interval {args.poll * 1000:.0f} ms)"
    )
    published = settings.store.adapters_dir / "bench-0"
    onnx_file = published / registry.EXPORT_DIR
    print(
        f"disk per published adapter: {disk_mb(published):.1f} MB"
        + (f" (the adapter file {disk_mb(onnx_file):.1f} MB)" if onnx_file.is_dir() else "")
    )
    print(
        f"server memory: {memory['base model']:.0f} MB on the base model, "
        f"{memory['after the swaps']:.0f} MB after {args.swaps + 1} adapters were swapped in "
        f"({memory['after the swaps'] / memory['base model']:.2f}x)"
    )
    if "one process, base" in memory:
        alone, held = memory["one process, base"], memory["one process, base + 3"]
        print(
            f"one process: {alone:.0f} MB with the base export, {held:.0f} MB holding 3 "
            f"adapters at once ({held / alone:.2f}x; goal <= 1.2)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model to serve ('' = embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=60, help="requests per steady state")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    parser.add_argument("--int8", action="store_true", help="onnxruntime: the int8 copy")
    parser.add_argument("--swaps", type=int, default=5, help="adapters published mid-stream")
    parser.add_argument("--poll", type=float, default=0.5, help="server's adapter poll, s")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
