"""One suggestion from a document cut at the cursor: prompt, decoding, post-processing.

The server, the nightly gate and the replay all call this, so the trainer's held-out
evaluation sees exactly the suggestions users would see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ghostloop.decoding import Forward, Generation, TorchForward, generate
from ghostloop.lora import LoraWeights, serving
from ghostloop.models import LoadedModel
from ghostloop.postprocess import (
    CompletionMode,
    CursorContext,
    completion_mode,
    finish_suggestion,
)
from ghostloop.prompts import Prompt, build_prompt
from ghostloop.settings import Settings


@dataclass(frozen=True)
class Suggestion:
    text: str
    prompt: Prompt
    mode: CompletionMode
    generation: Generation


def prompt_for(loaded: LoadedModel, settings: Settings, context: CursorContext) -> Prompt:
    """The prompt the server sends for ``context`` (trimmed to the budget, healed)."""
    return build_prompt(
        loaded.tokenizer,
        loaded.template,
        context.prefix,
        context.suffix,
        context_tokens=settings.context_tokens,
        suffix_share=settings.suffix_share,
        marker_ids=loaded.marker_ids,
    )


def suggest(
    loaded: LoadedModel,
    settings: Settings,
    context: CursorContext,
    *,
    model: Any = None,
    adapter: LoraWeights | None = None,
    forward: Forward | None = None,
    should_stop: Callable[[], str | None] = lambda: None,
) -> Suggestion:
    """Greedy suggestion at ``context``. ``adapter`` is put in force on the served model
    for this call (the server); ``model`` replaces ``loaded.model`` (the gate's peft model);
    ``forward`` replaces the torch forward pass altogether (the onnxruntime backend)."""
    mode = completion_mode(context, settings.max_lines)
    prompt = prompt_for(loaded, settings, context)
    if forward is None:
        forward = TorchForward(loaded.model if model is None else model, loaded.device)
    with serving(loaded.model).applied(adapter):
        generation = generate(
            loaded,
            forward,
            prompt,
            mode,
            max_new_tokens=settings.max_new_tokens,
            should_stop=should_stop,
        )
    text = finish_suggestion(generation.text, context, mode)
    return Suggestion(text, prompt, mode, generation)
