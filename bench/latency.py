"""End-to-end completion latency over LSP, against raw ``model.generate`` for the same tokens.

Replays N inline-completion requests at real positions of real stdlib files through a
running ``ghostloop serve``, then (server stopped, so nothing competes for the CPU) times
``model.generate`` on the very prompts the server built, forced to produce the same number
of tokens. Prints p50/p95 latency, tokens/s, time to first result and the ratio.

    python bench/latency.py [--requests 40] [--model PATH] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass

from ghostloop.corpus import CursorSample, document_at, sample_positions, stdlib_dir
from ghostloop.settings import Settings, load_settings
from lsp_server.client import GhostloopClient

FILES = ("json/decoder.py", "textwrap.py", "shlex.py", "csv.py", "fnmatch.py")


@dataclass
class Measured:
    sample: CursorSample
    document: str
    latency_ms: float
    tokens: int


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def samples(count: int) -> list[tuple[CursorSample, str]]:
    per_file = max(1, count // len(FILES))
    chosen = []
    for name in FILES:
        path = stdlib_dir() / name
        source = path.read_text(encoding="utf-8")
        for sample in sample_positions(path, per_file, seed=7):
            chosen.append((sample, document_at(sample, source)))
    return chosen[:count]


async def run_server(
    settings: Settings, chosen: list[tuple[CursorSample, str]]
) -> tuple[list[Measured], float, dict[str, object]]:
    env = dict(os.environ)
    env.update(
        GHOSTLOOP_MODEL=settings.model,
        GHOSTLOOP_DATA_DIR=str(settings.data_dir),
        GHOSTLOOP_THREADS=str(settings.torch_threads),
        GHOSTLOOP_DEVICE=settings.device,
        GHOSTLOOP_LOG_LEVEL="WARNING",
        GHOSTLOOP_DEADLINE_MS="600000",  # measure whole generations, not the deadline
    )
    started = time.perf_counter()
    client = await GhostloopClient.start(env=env)
    measured: list[Measured] = []
    first_result_s = 0.0
    try:
        status = await client.wait_ready()
        tokens_before = 0
        for index, (sample, document) in enumerate(chosen):
            uri = f"file:///bench/{index}/{sample.path.name}"
            client.open(uri, document)
            got = await client.inline(uri, sample.line, sample.character)
            if index == 0:
                first_result_s = time.perf_counter() - started
            stats = (await client.status())["stats"]
            tokens = int(stats["tokens_generated"]) - tokens_before
            tokens_before = int(stats["tokens_generated"])
            measured.append(Measured(sample, document, got.latency_ms, tokens))
    finally:
        await client.stop()
    return measured, first_result_s, status


def run_raw_generate(settings: Settings, measured: list[Measured]) -> list[float]:
    import torch

    from ghostloop.models import load_model
    from ghostloop.prompts import build_prompt

    loaded = load_model(settings)
    times = []
    for item in measured:
        offset = item.sample.offset
        prompt = build_prompt(
            loaded.tokenizer,
            loaded.template,
            item.document[:offset],
            item.document[offset:],
            context_tokens=settings.context_tokens,
            suffix_share=settings.suffix_share,
            marker_ids=loaded.marker_ids,
        )
        ids = torch.tensor([list(prompt.input_ids)], device=loaded.device)
        tokens = max(1, item.tokens)
        started = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
        if loaded.device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--threads", type=int, default=0, help="default: physical cores")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides: dict[str, object] = {"threads": args.threads, "device": args.device}
    if args.model is not None:
        overrides["model"] = args.model
    settings = load_settings(overrides=overrides)
    chosen = samples(args.requests)
    measured, first_result_s, status = asyncio.run(run_server(settings, chosen))
    raw = run_raw_generate(settings, measured)

    lsp = [m.latency_ms for m in measured]
    tokens = [m.tokens for m in measured]
    ratios = [m.latency_ms / r for m, r in zip(measured, raw, strict=True) if r > 0]
    load = os.getloadavg()[0]
    print(
        f"model {status['model']} on {status['device']}, threads {settings.torch_threads}, "
        f"{platform.processor() or platform.machine()}, load avg {load:.2f}"
    )
    print(f"{len(measured)} requests at real positions of {', '.join(FILES)}")
    print(
        f"tokens generated per request: median {statistics.median(tokens):.0f}, total {sum(tokens)}"
    )
    print(f"{'':28}{'p50 ms':>10}{'p95 ms':>10}{'tokens/s':>10}")
    for name, values in (("ghostloop over LSP", lsp), ("raw model.generate", raw)):
        rate = sum(tokens) / (sum(values) / 1000)
        print(
            f"{name:28}{statistics.median(values):10.1f}{percentile(values, 0.95):10.1f}"
            f"{rate:10.1f}"
        )
    print(f"time to first result (server start to first completion): {first_result_s:.1f} s")
    print(
        f"ratio LSP / raw generate, same prompt and tokens: median "
        f"{statistics.median(ratios):.2f}, p50-ratio "
        f"{statistics.median(lsp) / statistics.median(raw):.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
