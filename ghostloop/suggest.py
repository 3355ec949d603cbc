"""One suggestion from a document cut at the cursor: prompt, decoding, post-processing.

The server, the nightly gate and the replay all call this, so the trainer's held-out
evaluation sees exactly the suggestions users would see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from ghostloop.decoding import (
    BatchDecoding,
    Decoder,
    Forward,
    Generation,
    StopCheck,
    TorchForward,
    generate,
)
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


Done = Callable[[Suggestion | Exception], None]  # a suggestion, or why it failed alone


def prompt_for(loaded: LoadedModel, settings: Settings, context: CursorContext) -> Prompt:
    """The prompt the server sends for ``context`` (trimmed to the budget, healed)."""
    return build_prompt(
        loaded.tokenizer,
        loaded.template,
        context.prefix,
        context.suffix,
        context_tokens=settings.serving.context_tokens,
        suffix_share=settings.serving.suffix_share,
        marker_ids=loaded.marker_ids,
        repository=context.repository,
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
    mode = completion_mode(context, settings.serving.max_lines)
    prompt = prompt_for(loaded, settings, context)
    if forward is None:
        forward = TorchForward(loaded.model if model is None else model, loaded.device)
    with serving(loaded.model).applied(adapter):
        generation = generate(
            loaded,
            forward,
            prompt,
            mode,
            max_new_tokens=settings.serving.max_new_tokens,
            should_stop=should_stop,
        )
    text = finish_suggestion(generation.text, context, mode)
    return Suggestion(text, prompt, mode, generation)


class SuggestionBatch:
    """Suggestions for several cursors (documents) decoded together (``BatchDecoding``):
    the prompts, stop rules and post-processing of ``suggest``, each suggestion the one
    ``suggest`` gives for it alone, handed to its callback the moment it ends. Cursors join
    between steps. Used as a context manager: ``adapter`` is in force on the served model
    while it is open."""

    def __init__(
        self, loaded: LoadedModel, settings: Settings, *, adapter: LoraWeights | None = None
    ) -> None:
        self._loaded, self._settings, self._adapter = loaded, settings, adapter
        self._parts: dict[int, tuple[CursorContext, Prompt, CompletionMode, Done]] = {}
        self._added = 0
        self._decoding = BatchDecoding(self._finished)
        self._stack = ExitStack()

    def __enter__(self) -> SuggestionBatch:
        self._stack.enter_context(serving(self._loaded.model).applied(self._adapter))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __len__(self) -> int:
        """Suggestions still being decoded."""
        return len(self._decoding)

    @property
    def shared(self) -> int:
        """How many were decoded in one forward pass with others."""
        return self._decoding.shared

    def add(
        self, context: CursorContext, forward: TorchForward, should_stop: StopCheck, done: Done
    ) -> None:
        """Prefill ``context``'s prompt on ``forward``; ``done`` gets its suggestion."""
        mode = completion_mode(context, self._settings.serving.max_lines)
        prompt = prompt_for(self._loaded, self._settings, context)
        decoder = Decoder(
            self._loaded,
            prompt,
            mode,
            max_new_tokens=self._settings.serving.max_new_tokens,
            should_stop=should_stop,
        )
        number = self._added  # join numbers them alike, a join that fails included
        self._parts[number] = (context, prompt, mode, done)
        self._added += 1
        try:
            self._decoding.join(decoder, forward)
        except Exception:  # a cursor that cannot join fails alone (the caller is told)
            self._parts.pop(number, None)
            raise

    def step(self) -> bool:
        """One token for every running suggestion; whether any still runs."""
        return self._decoding.step()

    def _finished(self, number: int, generation: Generation) -> None:
        context, prompt, mode, done = self._parts.pop(number)
        try:
            text = finish_suggestion(generation.text, context, mode)
        except Exception as error:  # its own error, not the batch's
            done(error)
            return
        done(Suggestion(text, prompt, mode, generation))


def suggest_batch(
    loaded: LoadedModel,
    settings: Settings,
    contexts: Sequence[CursorContext],
    forwards: Sequence[TorchForward],
    should_stops: Sequence[StopCheck],
    *,
    adapter: LoraWeights | None = None,
) -> list[Suggestion]:
    """``suggest`` for several cursors at once (``SuggestionBatch``, all added at the
    start). ``forwards`` hold each document's previous cache, if any, and its cache after."""
    found: dict[int, Suggestion] = {}

    def keeper(number: int) -> Done:
        def keep(suggestion: Suggestion | Exception) -> None:
            if isinstance(suggestion, Exception):
                raise suggestion
            found[number] = suggestion

        return keep

    with SuggestionBatch(loaded, settings, adapter=adapter) as batch:
        for number, (context, forward, stop) in enumerate(
            zip(contexts, forwards, should_stops, strict=True)
        ):
            batch.add(context, forward, stop, keeper(number))
        while batch.step():
            pass
    return [found[number] for number in range(len(contexts))]
