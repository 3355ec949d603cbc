"""Greedy decoding shared by the server and the trainer's evaluation gate.

Our own loop rather than ``model.generate``: it checks cancellation and the deadline
between tokens, constrains the first token for token healing, and stops on the
completion's own rules (end of line, end of block). Backends only supply ``Forward``.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ghostloop.models import LoadedModel
from ghostloop.postprocess import CompletionMode, cut_block
from ghostloop.prompts import Prompt


class Forward(Protocol):
    """One backend's forward pass over a growing sequence; returns next-token logits."""

    def prefill(self, input_ids: Sequence[int]) -> torch.Tensor: ...

    def step(self, token_id: int) -> torch.Tensor: ...


@dataclass
class CachedPrefix:
    """The KV cache of ``token_ids``: one document's last prompt and the tokens generated
    after it, kept so that the next keystroke's prompt prefills only what changed."""

    token_ids: list[int]
    cache: Any  # a DynamicCache (torch) or a list of OrtValues (onnxruntime)
    nbytes: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable(cached: CachedPrefix | None, input_ids: Sequence[int]) -> int:
    """How many of ``input_ids`` the cache holds already. One token is always fed, since
    the logits after the prompt come from a forward pass."""
    if cached is None:
        return 0
    return max(0, min(common_prefix(cached.token_ids, input_ids), len(input_ids) - 1))


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    evictions: int = 0


@dataclass
class PrefixCaches:
    """The last KV cache per document (and the weights that made it), least recently used
    first out once their bytes pass ``cap_bytes``. A cache is taken out while a
    completion extends it and put back after, so two jobs never share one."""

    cap_bytes: int
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _entries: OrderedDict[Hashable, CachedPrefix] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: Hashable) -> CachedPrefix | None:
        with self._lock:
            return self._entries.pop(key, None)

    def put(self, key: Hashable, entry: CachedPrefix | None) -> None:
        if entry is None or entry.nbytes > self.cap_bytes:
            return
        with self._lock:
            self._entries[key] = entry
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.cap_bytes:
                _, evicted = self._entries.popitem(last=False)
                total -= evicted.nbytes
                self.stats.evictions += 1

    def record(self, reused: int, prefilled: int) -> None:
        with self._lock:
            self.stats.hits += reused > 0
            self.stats.misses += reused == 0
            self.stats.reused_tokens += reused
            self.stats.prefilled_tokens += prefilled

    def drop(self, matches: Callable[[Hashable], bool]) -> None:
        """Forget the caches whose key ``matches`` (a closed document, retired weights)."""
        with self._lock:
            for key in [k for k in self._entries if matches(k)]:
                del self._entries[key]

    def describe(self) -> dict[str, Any]:
        with self._lock:
            entries, total = len(self._entries), sum(e.nbytes for e in self._entries.values())
            return {
                "documents": entries,
                "mb": round(total / 2**20, 1),
                "cap_mb": round(self.cap_bytes / 2**20, 1),
                **vars(self.stats),
            }


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class TorchForward:
    """A transformers causal LM with its KV cache kept between steps, and across requests
    when given the document's previous cache (``reuse``): cropped to the common prefix,
    so only the tokens after it are prefilled."""

    def __init__(self, model: Any, device: str, reuse: CachedPrefix | None = None) -> None:
        self._model = model
        self._device = device
        self._cache: Any = None
        self._reuse = reuse
        self._fed: list[int] = []
        self.reused = 0
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
        self._fed.extend(ids)
        return out.logits[0, -1].float()

    def prefill(self, input_ids: Sequence[int]) -> torch.Tensor:
        from transformers import DynamicCache

        reuse, self._reuse = self._reuse, None
        common = reusable(reuse, input_ids)
        if reuse is not None and common > 0:
            surplus = len(reuse.token_ids) - common
            if surplus:
                # negative: "remove this many", which every transformers 5.x accepts
                reuse.cache.crop(-surplus)
            self._cache, self._fed, self.reused = reuse.cache, list(input_ids[:common]), common
            return self._run(input_ids[common:])
        self._cache, self._fed, self.reused = DynamicCache(), [], 0
        return self._run(input_ids)

    def step(self, token_id: int) -> torch.Tensor:
        return self._run([token_id])

    def keep(self) -> CachedPrefix | None:
        """The cache as it stands (every token fed so far), to reuse for the next prompt."""
        if self._cache is None or not self._fed:
            return None
        return CachedPrefix(self._fed, self._cache, _cache_bytes(self._cache))


@dataclass(frozen=True)
class Generation:
    """What the model wrote after the prompt, minus the healed text, and why it stopped."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    prompt_tokens: int
    prefill_ms: float
    total_ms: float
    reused_tokens: int = 0  # prompt tokens whose KV cache came from the previous request


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
    reused = int(getattr(forward, "reused", 0))
    return Generation(body, tuple(generated), reason or "", len(ids), prefill_ms, total_ms, reused)
