"""Greedy decoding shared by the server and the trainer's evaluation gate.

Our own loop rather than ``model.generate``: it checks cancellation and the deadline
between tokens, constrains the first token for token healing, and stops on the
completion's own rules (end of line, end of block). Backends only supply ``Forward``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ghostloop.models import LoadedModel
from ghostloop.postprocess import CompletionMode, cut_block
from ghostloop.prompts import Prompt


class Forward(Protocol):
    """One backend's forward pass over a growing sequence; returns next-token logits."""

    def prefill(self, input_ids: Sequence[int]) -> torch.Tensor: ...

    def step(self, token_id: int) -> torch.Tensor: ...


class TorchForward:
    """A transformers causal LM with its KV cache kept between steps."""

    def __init__(self, model: Any, device: str) -> None:
        self._model = model
        self._device = device
        self._cache: Any = None
        # transformers renamed past_key_values to cache (5.2x); the GPU image has 5.17.
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def _run(self, ids: Sequence[int]) -> torch.Tensor:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self._device)
        with torch.inference_mode():
            out = self._model(
                input_ids=input_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: self._cache},  # a DynamicCache, updated in place
            )
        return out.logits[0, -1].float()

    def prefill(self, input_ids: Sequence[int]) -> torch.Tensor:
        from transformers import DynamicCache

        self._cache = DynamicCache()
        return self._run(input_ids)

    def step(self, token_id: int) -> torch.Tensor:
        return self._run([token_id])


@dataclass(frozen=True)
class Generation:
    """What the model wrote after the prompt, minus the healed text, and why it stopped."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    prompt_tokens: int
    prefill_ms: float
    total_ms: float


StopCheck = Callable[[], str | None]


def _first_token(logits: torch.Tensor, allowed: Sequence[int] | None) -> int:
    if not allowed:
        return int(torch.argmax(logits))
    index = torch.tensor(allowed, dtype=torch.long, device=logits.device)
    return int(index[torch.argmax(logits[index])])


def generate(
    loaded: LoadedModel,
    forward: Forward,
    prompt: Prompt,
    mode: CompletionMode,
    *,
    max_new_tokens: int,
    should_stop: StopCheck = lambda: None,
) -> Generation:
    """Greedy continuation of ``prompt``, stopped early by ``should_stop`` or the mode's rules.

    ``should_stop`` returns a reason ("cancelled", "deadline") to end generation now; what
    was generated so far is returned either way.
    """
    started = time.perf_counter()
    ids = list(prompt.input_ids)
    if not ids and loaded.bos_id is not None:
        ids = [loaded.bos_id]
    if not ids:
        return Generation("", (), "empty_prompt", 0, 0.0, 0.0)
    allowed = loaded.prefix_index.starting_with(prompt.healed) if prompt.healed else None
    generated: list[int] = []
    reason = should_stop()
    prefill_ms = 0.0
    body = ""
    if reason is None:
        logits = forward.prefill(ids)
        prefill_ms = (time.perf_counter() - started) * 1000
        reason = "max_tokens"
        for index in range(max_new_tokens):
            if (stop := should_stop()) is not None:
                reason = stop
                break
            token = _first_token(logits, allowed) if index == 0 else int(torch.argmax(logits))
            if token in loaded.stop_ids:
                reason = "stop_token"
                break
            generated.append(token)
            text = loaded.tokenizer.decode_ids(generated)
            if not text.startswith(prompt.healed):
                reason = "healing_mismatch"
                break
            body = text[len(prompt.healed) :]
            if cut_block(body, mode)[1]:
                reason = "block_end"
                break
            if index + 1 < max_new_tokens:
                logits = forward.step(token)
    total_ms = (time.perf_counter() - started) * 1000
    return Generation(body, tuple(generated), reason or "", len(ids), prefill_ms, total_ms)
