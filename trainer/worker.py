"""One training step of the nightly job in its own processes, for ``accelerate launch``.

The nightly job stays one process (data, gate, publishing); with ``train_processes`` > 1
it writes the examples to a work directory and runs

    accelerate launch --num_processes N [--cpu | --multi_gpu] \\
        -m trainer.worker WORK METHOD [ADAPTER]

Every process trains (transformers' Trainer runs them as one data-parallel job); the main
process saves the adapter and the outcome to WORK, where the nightly job picks them up.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ghostloop.models import LoadedModel, load_model
from ghostloop.settings import Settings, load_settings
from trainer.labels import Example
from trainer.methods import METHODS, TooLittleData, TrainOutcome, peft_model

EXAMPLES = "examples.jsonl"
OUTCOME = "outcome.json"
ADAPTER = "adapter"


def write_examples(work: Path, examples: Sequence[Example]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    with (work / EXAMPLES).open("w", encoding="utf-8") as handle:
        for example in examples:
            row = dataclasses.asdict(example)
            row["created_at"] = example.created_at.isoformat()
            handle.write(json.dumps(row) + "\n")


def read_examples(work: Path) -> list[Example]:
    examples = []
    for line in (work / EXAMPLES).read_text(encoding="utf-8").splitlines():
        row: dict[str, Any] = json.loads(line)
        row["created_at"] = datetime.fromisoformat(row["created_at"])
        row["event_ids"] = tuple(row["event_ids"])
        examples.append(Example(**row))
    return examples


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(
    settings: Settings,
    loaded: LoadedModel,
    method: str,
    examples: Sequence[Example],
    work: Path,
    start_from: Path | None,
) -> TrainOutcome:
    """Train in ``settings.training.processes`` processes; returns the outcome with the model."""
    from peft import PeftModel

    write_examples(work, examples)
    placement = ["--multi_gpu"]  # torchrun underneath; on CPU the processes talk over gloo
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(settings.training.processes), *placement,
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "trainer.worker", str(work), method, str(start_from or ""),
    ]  # fmt: skip
    finished = subprocess.run(command, check=False)
    if finished.returncode != 0 or not (work / OUTCOME).is_file():
        raise RuntimeError(
            f"training in {settings.training.processes} processes failed (exit "
            f"{finished.returncode}); its output is above"
        )
    figures = json.loads((work / OUTCOME).read_text(encoding="utf-8"))
    if "too_little" in figures:
        raise TooLittleData(figures["too_little"])
    model = PeftModel.from_pretrained(loaded.model, str(work / ADAPTER), is_trainable=False)
    model.eval()
    return TrainOutcome(model=model, **figures)


def main(argv: Sequence[str]) -> int:
    from accelerate import PartialState

    state = PartialState()
    _train(state, argv)
    # Every process ends its process group before the interpreter exits: otherwise gloo's
    # threads can still be running at teardown and abort the process ("terminate called
    # without an active exception", pytorch/pytorch#190489), failing a night that trained
    # and saved its adapter (seen once in CI). Only after success: ending it while another
    # process is still in a collective would hang.
    state.destroy_process_group()
    return 0


def _train(state: Any, argv: Sequence[str]) -> None:
    work, method = Path(argv[0]), argv[1]
    start_from = Path(argv[2]) if len(argv) > 2 and argv[2] else None
    settings = load_settings()
    loaded = load_model(settings)
    model = peft_model(loaded, settings, start_from)
    try:
        outcome = METHODS[method](loaded, settings, model, read_examples(work), work / "trainer")
    except TooLittleData as error:
        if state.is_main_process:
            (work / OUTCOME).write_text(json.dumps({"too_little": str(error)}), encoding="utf-8")
        return
    if state.is_main_process:
        model.save_pretrained(str(work / ADAPTER), safe_serialization=True)
        figures = {
            f.name: getattr(outcome, f.name)
            for f in dataclasses.fields(outcome)
            if f.name not in ("model", "extra")
        }
        figures["extra"] = {"processes": state.num_processes}
        (work / OUTCOME).write_text(json.dumps(figures), encoding="utf-8")
    state.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
