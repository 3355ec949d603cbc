"""End-to-end completion latency over LSP per backend, against raw ``model.generate``.

Replays N inline-completion requests at real positions of real stdlib files through a
running ``ghostloop serve`` once per backend (torch, onnxruntime, onnxruntime int8), then
(servers stopped, so nothing competes for the CPU) times ``model.generate`` on the very
prompts the torch server built, forced to produce the same number of tokens, and each
backend's forward pass on the same prompts for exactly 16 new tokens. Prints p50/p95
latency, tokens/s, time to first result and the ratios, all measured in this one run.

    python bench/latency.py [--requests 40] [--backends torch,onnxruntime] [--int8]
                            [--model PATH] [--threads N] [--device cpu|cuda]
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

from evaluation.client import GhostloopClient
from feedback.metrics import percentile
from ghostloop.corpus import CursorSample, document_at, sample_positions, stdlib_dir
from ghostloop.models import served_backend
from ghostloop.settings import Settings, load_settings

FILES = ("json/decoder.py", "textwrap.py", "shlex.py", "csv.py", "fnmatch.py")


@dataclass
class Measured:
    sample: CursorSample
    document: str
    latency_ms: float
    tokens: int


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
        GHOSTLOOP_MODEL=settings.inference.model,
        GHOSTLOOP_DATA_DIR=str(settings.store.data_dir),
        GHOSTLOOP_THREADS=str(settings.inference.torch_threads),
        GHOSTLOOP_DEVICE=settings.inference.device,
        GHOSTLOOP_BACKEND=served_backend(settings),
        GHOSTLOOP_ONNX_INT8=str(settings.inference.onnx_int8).lower(),
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
            context_tokens=settings.serving.context_tokens,
            suffix_share=settings.serving.suffix_share,
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


def read_bandwidth_gbs(device: str, threads: int) -> float:
    """Bytes per second a reduction over 1 GiB reads: what bounds a decode step, which
    reads every weight once."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32, device=device)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        float(data.sum())
        times.append(time.perf_counter() - started)
    return data.numel() * 4 / statistics.median(times) / 1e9


def sixteen_tokens(
    settings: Settings, measured: list[Measured], int8: bool
) -> dict[str, tuple[float, float, float, int]]:
    """Per backend, on the same prompts: p50 ms of 16 new tokens (prefill plus 15 decode
    steps), p50 prefill ms, p50 ms per decode step, and the weight bytes a step reads."""
    from ghostloop import onnx_backend
    from ghostloop.decoding import TorchForward
    from ghostloop.models import load_model
    from ghostloop.postprocess import CursorContext
    from ghostloop.suggest import prompt_for

    loaded = load_model(settings)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    forwards: dict[str, tuple[object, int]] = {
        "torch": (lambda: TorchForward(loaded.model, loaded.device), parameters * 4)
    }
    for name, quantized in (("onnxruntime", False), ("onnxruntime int8", True)):
        if quantized and not int8:
            continue
        model = onnx_backend.base_export(loaded, settings.replaced(onnx_int8=quantized))
        forwards[name] = (
            lambda model=model: onnx_backend.OnnxForward(model),
            parameters * (1 if quantized else 4),
        )
    prompts = [
        prompt_for(loaded, settings, CursorContext(m.document[: m.sample.offset], "")).input_ids
        for m in measured
    ]
    result = {}
    for name, (make, weight_bytes) in forwards.items():
        totals, prefills, steps = [], [], []
        for ids in prompts:
            forward = make()  # type: ignore[operator]
            started = time.perf_counter()
            logits = forward.prefill(ids)
            prefilled = time.perf_counter()
            for _ in range(15):
                logits = forward.step(int(logits.argmax()))
            done = time.perf_counter()
            totals.append((done - started) * 1000)
            prefills.append((prefilled - started) * 1000)
            steps.append((done - prefilled) * 1000 / 15)
        result[name] = (
            statistics.median(totals),
            statistics.median(prefills),
            statistics.median(steps),
            weight_bytes,
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--threads", type=int, default=0, help="default: physical cores")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backends", default="torch,onnxruntime", help="served one after another")
    parser.add_argument("--int8", action="store_true", help="also onnxruntime with int8 weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides: dict[str, object] = {"threads": args.threads, "device": args.device}
    if args.model is not None:
        overrides["model"] = args.model
    settings = load_settings(overrides=overrides)
    chosen = samples(args.requests)
    runs = [(b, False) for b in args.backends.split(",") if b]
    if args.int8:
        runs.append(("onnxruntime", True))
    served = {}
    for backend, int8 in runs:
        name = backend + (" int8" if int8 else "")
        run_settings = settings.replaced(backend=backend, onnx_int8=int8)
        served[name] = asyncio.run(run_server(run_settings, chosen))
    measured, _, status = next(iter(served.values()))
    raw = run_raw_generate(settings, measured)
    fixed = sixteen_tokens(settings, measured, args.int8)

    tokens = [m.tokens for m in measured]
    load = os.getloadavg()[0]
    print(
        f"model {status['model']} on {status['device']}, "
        f"threads {settings.inference.torch_threads}, "
        f"{platform.processor() or platform.machine()}, load avg {load:.2f}"
    )
    print(f"{len(measured)} requests at real positions of {', '.join(FILES)}")
    print(f"tokens per request (first backend): median {statistics.median(tokens):.0f}")
    print(f"{'':32}{'p50 ms':>10}{'p95 ms':>10}{'tokens/s':>10}{'1st result s':>14}")
    rows = [(f"LSP, {name}", run[0], run[1]) for name, run in served.items()]
    for label, run, first_s in rows:
        values = [m.latency_ms for m in run]
        rate = sum(m.tokens for m in run) / (sum(values) / 1000)
        print(
            f"{label:32}{statistics.median(values):10.1f}{percentile(values, 0.95):10.1f}"
            f"{rate:10.1f}{first_s:14.1f}"
        )
    rate = sum(tokens) / (sum(raw) / 1000)
    print(
        f"{'raw model.generate (torch)':32}{statistics.median(raw):10.1f}"
        f"{percentile(raw, 0.95):10.1f}{rate:10.1f}"
    )
    lsp = [m.latency_ms for m in measured]
    print(f"LSP / raw generate, p50: {statistics.median(lsp) / statistics.median(raw):.2f}")
    bandwidth = read_bandwidth_gbs(status["device"] or "cpu", settings.inference.torch_threads)
    print(
        f"16 new tokens on the same prompts (p50), speed-up over torch, and the decode step "
        f"against the memory-bandwidth bound (weights read once per step at the "
        f"{bandwidth:.1f} GB/s a {settings.inference.torch_threads}-thread reduction reads here):"
    )
    torch_total = fixed["torch"][0]
    for name, (total, prefill, step, weight_bytes) in fixed.items():
        bound_ms = weight_bytes / (bandwidth * 1e9) * 1000
        print(
            f"  {name:20}{total:8.1f} ms  x{torch_total / total:.2f}   prefill {prefill:6.1f} ms"
            f"   decode {step:5.1f} ms/token, bound {bound_ms:5.1f} ms ({bound_ms / step:.0%})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
