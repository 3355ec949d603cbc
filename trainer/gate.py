"""The evaluation gate: publish only an adapter whose suggestions save more typing.

Candidate and baseline (the active adapter, or the base model) GENERATE on the held-out
logged prompts with the server's decoding and post-processing; each suggestion is judged
against what the developer kept (feedback.metrics). The candidate passes only when
characters saved per completion rise by the configured margin with a paired 95% interval
above zero, and exact-line acceptance does not fall. Preference accuracy and likelihood
margins are measured beside it and stored, never used alone: DPO raises them while the
suggestions get worse (FIELD-NOTES).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from feedback.metrics import Interval, Outcome, Summary, judge, paired_interval, summarise
from ghostloop.models import LoadedModel
from ghostloop.postprocess import CursorContext
from ghostloop.settings import Settings
from ghostloop.suggest import suggest
from trainer.data import Encoded, encode, pad_id, sequence_logprobs
from trainer.labels import Example

BASELINE = "baseline"


@dataclass
class GateResult:
    passed: bool
    reason: str
    baseline: str  # "base model" or the active adapter's version
    before: Summary
    after: Summary
    chars_saved_lift: Interval
    relative_lift: float
    exact_line_lift: Interval
    likelihood: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "baseline": self.baseline,
            "before": asdict(self.before),
            "after": asdict(self.after),
            "paired_lift": {
                "chars_saved_per_completion": self.chars_saved_lift.as_list(),
                "exact_line_acceptance": self.exact_line_lift.as_list(),
            },
            "relative_lift": self.relative_lift,
            "likelihood": self.likelihood,
        }


@contextlib.contextmanager
def _arm(model: Any, baseline_adapter: Path | None, use_baseline: bool) -> Iterator[Any]:
    """The plain transformers model with the wanted adapter in force."""
    if not use_baseline:
        model.set_adapter("default")
        yield model.get_base_model()
    elif baseline_adapter is None:
        with model.disable_adapter():
            yield model.get_base_model()
    else:
        if BASELINE not in model.peft_config:
            model.load_adapter(str(baseline_adapter), adapter_name=BASELINE)
        model.set_adapter(BASELINE)
        try:
            yield model.get_base_model()
        finally:
            model.set_adapter("default")


def generate_outcomes(
    loaded: LoadedModel, settings: Settings, model: Any, examples: Sequence[Example], label: str
) -> list[Outcome]:
    outcomes = []
    for example in tqdm(examples, desc=f"gate: {label}", unit="prompt"):
        context = CursorContext(example.prefix, example.suffix)
        text = suggest(loaded, settings, context, model=model).text
        outcomes.append(judge(text, example.kept))
    return outcomes


def likelihood_figures(model: Any, pairs: Sequence[Encoded], pad: int) -> tuple[float, float, int]:
    """(preference accuracy, mean length-normalised margin, pairs) of kept over suggested."""
    wins, margins = 0, []
    with torch.no_grad():
        for encoded in pairs:
            summed, lengths = sequence_logprobs(
                model, encoded.prompt_ids, [encoded.chosen_ids, encoded.rejected_ids], pad
            )
            normalised = (summed / lengths.clamp(min=1)).tolist()
            margins.append(normalised[0] - normalised[1])
            wins += normalised[0] > normalised[1]
    if not margins:
        return 0.0, 0.0, 0
    return wins / len(margins), sum(margins) / len(margins), len(margins)


def run_gate(
    loaded: LoadedModel,
    settings: Settings,
    model: Any,
    held_out: Sequence[Example],
    *,
    baseline_adapter: Path | None,
    baseline_name: str,
) -> GateResult:
    model.eval()
    encoded = [encode(loaded, settings, example) for example in held_out]
    pairs, pad = [e for e in encoded if e.rejected_ids], pad_id(loaded)
    with _arm(model, baseline_adapter, use_baseline=True) as plain:
        before = generate_outcomes(loaded, settings, plain, held_out, baseline_name)
        accuracy_before, margin_before, pair_count = likelihood_figures(plain, pairs, pad)
    with _arm(model, baseline_adapter, use_baseline=False) as plain:
        after = generate_outcomes(loaded, settings, plain, held_out, "candidate")
        accuracy_after, margin_after, _ = likelihood_figures(plain, pairs, pad)
    saved_before = [float(o.retained) for o in before]
    saved_after = [float(o.retained) for o in after]
    lift = paired_interval(saved_before, saved_after, settings.seed)
    exact_lift = paired_interval(
        [float(o.exact) for o in before], [float(o.exact) for o in after], settings.seed
    )
    summary_before, summary_after = summarise(before), summarise(after)
    base = summary_before.chars_saved_per_completion
    relative = (
        (summary_after.chars_saved_per_completion - base) / base
        if base
        else (1.0 if summary_after.chars_saved_per_completion > 0 else 0.0)
    )
    if lift.low <= 0:
        passed, reason = (
            False,
            (
                f"characters saved per completion {base:.2f} -> "
                f"{summary_after.chars_saved_per_completion:.2f}: the paired 95% interval "
                f"[{lift.low:+.2f}, {lift.high:+.2f}] does not exclude zero"
            ),
        )
    elif relative < settings.gate_min_lift:
        passed, reason = (
            False,
            (
                f"characters saved per completion rose {relative:+.1%}, less than the required "
                f"{settings.gate_min_lift:.1%}"
            ),
        )
    elif summary_after.exact_line_acceptance < summary_before.exact_line_acceptance:
        passed, reason = (
            False,
            (
                f"exact-line acceptance fell {summary_before.exact_line_acceptance:.3f} -> "
                f"{summary_after.exact_line_acceptance:.3f}"
            ),
        )
    else:
        passed, reason = (
            True,
            (
                f"characters saved per completion {base:.2f} -> "
                f"{summary_after.chars_saved_per_completion:.2f} ({relative:+.1%}, paired 95% "
                f"interval [{lift.low:+.2f}, {lift.high:+.2f}]); exact-line acceptance "
                f"{summary_before.exact_line_acceptance:.3f} -> "
                f"{summary_after.exact_line_acceptance:.3f}"
            ),
        )
    return GateResult(
        passed=passed,
        reason=reason,
        baseline=baseline_name,
        before=summary_before,
        after=summary_after,
        chars_saved_lift=lift,
        relative_lift=relative,
        exact_line_lift=exact_lift,
        likelihood={
            "pairs": pair_count,
            "preference_accuracy_before": accuracy_before,
            "preference_accuracy_after": accuracy_after,
            "margin_before": margin_before,
            "margin_after": margin_after,
        },
    )
