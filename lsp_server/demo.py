"""``ghostloop demo``: the real server completing real files, suggestions and latencies printed.

At each sampled cursor the document holds the file with the rest of that line removed,
as if the developer were about to type it; the suggestion is printed beside the real code.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

from ghostloop.corpus import CursorSample, sample_positions, stdlib_dir
from ghostloop.settings import Settings
from lsp_server.client import GhostloopClient

DEFAULT_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py")


def document_at(sample: CursorSample, source: str) -> str:
    """The file as it stands while the developer is about to type the rest of the line."""
    return source[: sample.offset] + source[sample.offset + len(sample.true_line_rest) :]


def server_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["GHOSTLOOP_DATA_DIR"] = str(settings.data_dir)
    env["GHOSTLOOP_MODEL"] = settings.model
    env["GHOSTLOOP_LOG_LEVEL"] = "WARNING"
    return env


def _short(text: str, width: int = 48) -> str:
    line = text.split("\n", 1)[0]
    return repr(line if len(line) <= width else line[: width - 1] + "…")


async def run_demo(settings: Settings, *, files: list[str], positions: int) -> int:
    paths = [Path(f) for f in files] or [stdlib_dir() / f for f in DEFAULT_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"ghostloop demo: no such file: {', '.join(missing)}")
        return 2
    logging.getLogger("pygls").setLevel(logging.WARNING)
    print(f"starting ghostloop serve (model: {settings.model or 'embedded SmolLM2-135M'}) ...")
    started = time.perf_counter()
    client = await GhostloopClient.start(env=server_env(settings))
    try:
        status = await client.wait_ready()
        print(
            f"ready in {time.perf_counter() - started:.1f} s: model={status['model']} "
            f"device={status['device']} template={status['template']}\n"
        )
        latencies, exact = [], 0
        per_file = max(1, positions // len(paths))
        for path in paths:
            source = path.read_text(encoding="utf-8")
            uri = path.resolve().as_uri()
            client.open(uri, source)
            for sample in sample_positions(path, per_file, seed=0):
                client.replace(uri, document_at(sample, source))
                got = await client.inline(uri, sample.line, sample.character)
                latencies.append(got.latency_ms)
                first_line = got.text.split("\n", 1)[0]
                exact += bool(first_line) and first_line.strip() == sample.true_line_rest.strip()
                print(
                    f"{path.name}:{sample.line + 1:<5} {sample.kind:10} {got.latency_ms:7.0f} ms"
                    f"  suggested {_short(got.text)}\n{'':39}actual    "
                    f"{_short(sample.true_line_rest)}"
                )
        latencies.sort()
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        print(
            f"\n{len(latencies)} completions: p50 {statistics.median(latencies):.0f} ms, "
            f"p95 {p95:.0f} ms, exact line matches {exact}/{len(latencies)}"
        )
    finally:
        await client.stop()
    return 0
