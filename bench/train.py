"""Training throughput per method, and the wall time of one nightly run.

1. examples/s and tokens/s of sft, dpo and rrhf on the same logged examples (one epoch,
   the configured model; SmolLM2-135M by default, CPU here, GPU in bf16 when there is one),
   and of sft with the likelihood term on the prompt's tokens (``context_loss_weight``),
   with its time per example as a ratio to plain sft's measured in the same run;
2. the wall time of ``ghostloop train`` (the configured method, sft by default) over N
   logged completions (default 1,000) including the gate, which generates on the
   held-out fifth with both the base model and the candidate.

The logged completions are real positions in the stdlib ``email`` package, rejected, with
the true rest of the line typed instead (what a developer keeps). Everything lives in a
temporary data directory with its own SQLite store.

    PYTHONPATH=. python bench/train.py [--examples 32] [--completions 1000] [--threads N]
        [--methods sft,dpo,rrhf]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from ghostloop.corpus import sample_positions, stdlib_dir
from ghostloop.models import load_model
from ghostloop.settings import Settings, load_settings
from tests.training_data import write_rejections
from trainer.labels import Example
from trainer.methods import METHODS, peft_model
from trainer.nightly import run_nightly


def logged_positions(count: int) -> list[tuple[str, str, str]]:
    """(prefix, suffix, kept) at real positions of the email package."""
    files = sorted((stdlib_dir() / "email").rglob("*.py"))
    per_file = max(1, -(-count // len(files)))
    chosen = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        for sample in sample_positions(path, per_file, seed=11):
            chosen.append(
                (
                    source[: sample.offset][-4000:],
                    source[sample.offset :][:1000],
                    sample.true_line_rest,
                )
            )
    return [c for c in chosen if c[2].strip()][:count]


def method_throughput(settings: Settings, count: int, work: Path, methods: list[str]) -> None:
    positions = logged_positions(count)
    examples = [
        Example(
            completion_id=f"{i:032d}",
            created_at=datetime.now(UTC),
            user="dev",
            template="",
            prefix=prefix,
            suffix=suffix,
            suggestion="pass",
            kept=kept,
            chars_saved=0,
            outcome="rejected",
            event_ids=(),
        )
        for i, (prefix, suffix, kept) in enumerate(positions)
    ]
    one_epoch = settings.replaced(epochs=1, context_loss_weight=0.0)
    runs = [(method, method, one_epoch) for method in methods]
    if "sft" in methods:
        weighted = one_epoch.replaced(context_loss_weight=1.0)
        runs.append(("sft+context", "sft", weighted))
    seconds: dict[str, float] = {}
    for name, method, chosen in runs:
        loaded = load_model(chosen)
        model = peft_model(loaded, chosen, None)
        outcome = METHODS[method](loaded, chosen, model, examples, work / name)
        seconds[name] = outcome.seconds
        print(
            f"{name:11} {outcome.examples_per_s:7.2f} examples/s {outcome.tokens_per_s:8.1f} "
            f"tokens/s ({outcome.examples} examples, {outcome.tokens} tokens, "
            f"{outcome.seconds:.1f} s; loss {outcome.loss_before:.3f} -> {outcome.loss_after:.3f})",
            flush=True,
        )
    if "sft+context" in seconds:
        print(
            f"sft+context / sft training time: {seconds['sft+context'] / seconds['sft']:.2f}x "
            "(the output layer on every prompt token)"
        )


def nightly(settings: Settings, completions: int) -> None:
    url = f"sqlite:///{settings.store.data_dir / 'ghostloop.db'}"
    settings = settings.replaced(database_url=url)
    loaded = load_model(settings)
    write_rejections(url, loaded.name, logged_positions(completions), users=7)
    del loaded
    started = time.perf_counter()
    result = run_nightly(settings)
    wall = time.perf_counter() - started
    training = result.training
    print(f"nightly run over {completions} logged completions: {wall:.0f} s wall, gate included")
    if training is not None:
        print(
            f"  training {training.seconds:.0f} s ({training.examples_per_s:.2f} examples/s), "
            f"gate and the rest {wall - training.seconds:.0f} s"
        )
    print(f"  {result.message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=32, help="examples per method")
    parser.add_argument("--completions", type=int, default=1000, help="for the nightly run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: cores)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="methods to time, e.g. sft (default: all)"
    )
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--skip-nightly", action="store_true")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        known = ", ".join(METHODS)
        parser.error(f"--methods: {', '.join(unknown) or 'none given'}; known: {known}")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_settings()
        settings = base.replaced(data_dir=Path(tmp), threads=args.threads, database_url="")
        loaded = load_model(settings)
        print(
            f"model {loaded.name} on {loaded.device} ({loaded.dtype}), "
            f"{settings.inference.torch_threads} threads, load avg {os.getloadavg()[0]:.2f}, "
            f"context {settings.serving.context_tokens} tokens, "
            f"LoRA r{settings.training.lora_rank} on {settings.training.lora_targets}, "
            f"batch {settings.training.batch_size}",
            flush=True,
        )
        del loaded
        if not args.skip_methods:
            method_throughput(settings, args.examples, Path(tmp) / "work", methods)
        if not args.skip_nightly:
            nightly(settings, args.completions)


if __name__ == "__main__":
    main()
