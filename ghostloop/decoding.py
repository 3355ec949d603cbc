"""Greedy decoding shared by the server and the trainer's evaluation gate.

Our own loop rather than ``model.generate``: it checks cancellation and the deadline
between tokens, constrains the first token for token healing, and stops on the
completion's own rules (end of line, end of block). Backends only supply ``Forward``.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ghostloop.models import LoadedModel
from ghostloop.postprocess import CompletionMode, cut_block
from ghostloop.prompts import Prompt


def cache_keyword(model: Any) -> str:
    """The keyword a transformers model takes its KV cache by: ``cache`` since 5.2x, where
    ``past_key_values`` is deprecated (removed in 5.40), ``past_key_values`` before it (the
    GPU image has 5.17). A peft model is asked through the model it wraps, whose signature
    its own ``**kwargs`` hides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(base.__class__)


@functools.cache
def _cache_keyword_of(model_type: Any) -> str:
    """Per model class, read once: ``TorchForward`` asks for every request."""
    parameters = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


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
        self.model = model
        self._device = device
        self._cache: Any = None
        self._reuse = reuse
        self._fed: list[int] = []
        self.reused = 0
        self.cache_arg = cache_keyword(model)

    def _run(self, ids: Sequence[int]) -> torch.Tensor:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self._device)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_arg: self._cache},  # a DynamicCache, updated in place
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

    def handover(self) -> tuple[Any, list[int]]:
        """The cache and the tokens fed so far, for a batch to go on with (``take_back``)."""
        cache, fed = self._cache, self._fed
        self._cache, self._fed = None, []
        return cache, fed

    def take_back(self, cache: Any, fed: list[int]) -> None:
        """Go on from where a batch left this sequence."""
        self._cache, self._fed = cache, fed

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


class Decoder:
    """One completion's greedy decoding, whatever runs its forward passes: picks each token
    from the logits it is given and applies the completion's stop rules (a stop token, the
    healed text not matching, the end of the block, ``max_new_tokens``, ``should_stop``).

    ``generate`` drives one with a single ``Forward``; ``BatchDecoding`` drives several
    with one forward pass per step for all of them."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompt: Prompt,
        mode: CompletionMode,
        *,
        max_new_tokens: int,
        should_stop: StopCheck = lambda: None,
    ) -> None:
        self._loaded, self._prompt, self._mode = loaded, prompt, mode
        self._max_new_tokens, self._should_stop = max_new_tokens, should_stop
        self.started = time.perf_counter()
        ids = list(prompt.input_ids)
        if not ids and loaded.bos_id is not None:
            ids = [loaded.bos_id]
        self.input_ids = ids
        self.generated: list[int] = []
        # the healed text is written again first, maybe over several tokens (a partial
        # name); those tokens do not count against max_new_tokens
        self._healed = not prompt.healed
        self._healing = 0
        self._written = ""  # the text of the tokens generated so far, while healing
        self.body = ""
        self.prefill_ms = 0.0
        self.reason: str | None = "empty_prompt" if not ids else should_stop()
        self.done = self.reason is not None

    def prefilled(self) -> None:
        self.prefill_ms = (time.perf_counter() - self.started) * 1000

    def advance(self, logits: torch.Tensor) -> int | None:
        """The next token to feed after ``logits`` (the model's last output), or None when
        the completion has ended (``done`` is then set, ``reason`` says why)."""
        if not self.done:
            token, reason = self._next(logits)
            if reason is None:
                return token
            self.reason, self.done = reason, True
        return None

    def _next(self, logits: torch.Tensor) -> tuple[int, str | None]:
        """The token ``logits`` choose, and why decoding stops here (None: it goes on)."""
        if (stop := self._should_stop()) is not None:
            return -1, stop
        index = len(self.generated) - self._healing
        if index >= self._max_new_tokens:
            return -1, "max_tokens"
        healed = self._prompt.healed
        allowed = (
            None if self._healed else self._loaded.prefix_index.while_healing(healed, self._written)
        )
        token = _first_token(logits, allowed)
        if token in self._loaded.stop_ids:
            return token, "stop_token"
        self.generated.append(token)
        text = self._loaded.tokenizer.decode_ids(self.generated)
        if not self._healed:
            if len(text) < len(healed) and healed.startswith(text):
                self._healing += 1  # a part of the typed name, not a token of the suggestion
                self._written = text
                return token, None
            if not text.startswith(healed):
                return token, "healing_mismatch"
            self._healed = True
        self.body = text[len(healed) :]
        if cut_block(self.body, self._mode)[1]:
            return token, "block_end"
        if index + 1 >= self._max_new_tokens:
            return token, "max_tokens"
        return token, None

    def result(self, reused: int = 0) -> Generation:
        total_ms = (time.perf_counter() - self.started) * 1000
        return Generation(
            self.body,
            tuple(self.generated),
            self.reason or "",
            len(self.input_ids),
            self.prefill_ms,
            total_ms,
            reused,
        )


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
    decoder = Decoder(loaded, prompt, mode, max_new_tokens=max_new_tokens, should_stop=should_stop)
    if decoder.done:
        return decoder.result()
    logits = forward.prefill(decoder.input_ids)
    decoder.prefilled()
    while (token := decoder.advance(logits)) is not None:
        logits = forward.step(token)
    return decoder.result(int(getattr(forward, "reused", 0)))


class _Batch:
    """The KV caches of several sequences of different lengths as one batch: left-padded
    to the longest, the padding masked out, each sequence at its own positions, so a row
    sees what it would alone."""

    def __init__(self, model: Any, cache_arg: str, parts: Sequence[tuple[Any, list[int]]]) -> None:
        from transformers import DynamicCache

        self._model, self._cache_arg = model, cache_arg
        self.fed = [list(fed) for _, fed in parts]
        width = max(len(fed) for fed in self.fed)
        self.pads = [width - len(fed) for fed in self.fed]
        device = parts[0][0].layers[0].keys.device
        self.mask = torch.tensor(
            [[0] * pad + [1] * len(fed) for pad, fed in zip(self.pads, self.fed, strict=True)],
            dtype=torch.long,
            device=device,
        )
        self.cache: Any = DynamicCache()
        for index in range(len(parts[0][0].layers)):
            keys, values = (
                torch.cat(
                    [
                        nn.functional.pad(getattr(cache.layers[index], name), (0, 0, pad, 0))
                        for (cache, _), pad in zip(parts, self.pads, strict=True)
                    ]
                )
                for name in ("keys", "values")
            )
            self.cache.update(keys, values, index)

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to each row; the next-token logits, one row each."""
        device = self.mask.device
        self.mask = torch.cat(
            [self.mask, torch.ones((len(tokens), 1), dtype=torch.long, device=device)], dim=1
        )
        positions = torch.tensor([[len(fed)] for fed in self.fed], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = self._model(
                input_ids=torch.tensor([[t] for t in tokens], dtype=torch.long, device=device),
                attention_mask=self.mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: self.cache},
            )
        for fed, token in zip(self.fed, tokens, strict=True):
            fed.append(token)
        return out.logits[:, -1].float()

    def add(self, cache: Any, fed: list[int]) -> None:
        """A new row at the end: ``cache`` holds the KV of ``fed``."""
        width = self.mask.shape[1]
        if len(fed) > width:  # longer than every row: they all get more padding
            extra = len(fed) - width
            for layer in self.cache.layers:
                layer.keys = nn.functional.pad(layer.keys, (0, 0, extra, 0))
                layer.values = nn.functional.pad(layer.values, (0, 0, extra, 0))
            self.mask = nn.functional.pad(self.mask, (extra, 0))
            self.pads = [pad + extra for pad in self.pads]
            width = len(fed)
        pad = width - len(fed)
        for index, layer in enumerate(self.cache.layers):
            joining = cache.layers[index]
            layer.keys = torch.cat([layer.keys, nn.functional.pad(joining.keys, (0, 0, pad, 0))])
            layer.values = torch.cat(
                [layer.values, nn.functional.pad(joining.values, (0, 0, pad, 0))]
            )
        row = torch.tensor([[0] * pad + [1] * len(fed)], dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, row])
        self.pads.append(pad)
        self.fed.append(list(fed))

    def row(self, index: int) -> tuple[Any, list[int]]:
        """Row ``index`` as a cache of its own, without the padding."""
        from transformers import DynamicCache

        cache: Any = DynamicCache()
        pad = self.pads[index]
        for number, layer in enumerate(self.cache.layers):
            cache.update(
                layer.keys[index : index + 1, :, pad:],
                layer.values[index : index + 1, :, pad:],
                number,
            )
        return cache, self.fed[index]

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Go on with ``rows`` only, and without the padding they all have."""
        trim = min(self.pads[row] for row in rows)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]
        self.mask = self.mask[index, trim:]
        self.fed = [self.fed[row] for row in rows]
        self.pads = [self.pads[row] - trim for row in rows]


Finished = Callable[[int, Generation], None]


class BatchDecoding:
    """Completions decoded together on one model with the same weights: each prompt is
    prefilled on its own forward when it joins (after its document's cache, if it has one),
    then each ``step`` is one forward pass for every completion still running (on a CPU as
    on a GPU a decoding step costs about as much for a few rows as for one: reading the
    weights dominates). Completions join between steps and leave as they end, each one
    reported to ``finished`` at once (a short suggestion does not wait for a long one).
    Each generation is what ``generate`` gives for it alone, and each forward ends holding
    its own cache (``keep``)."""

    def __init__(self, finished: Finished = lambda number, generation: None) -> None:
        self._finished = finished
        # the running members: an ended one is dropped at once (a batch that others keep
        # joining may run for as long as the server is busy)
        self._members: dict[int, tuple[Decoder, TorchForward]] = {}
        self._joined = 0
        self._next: dict[int, int] = {}  # running member -> the token to feed it next
        self._batch: _Batch | None = None
        self._order: list[int] = []  # the member in each row of the batch
        self.shared = 0  # completions decoded in one forward pass with others
        self._sharing: set[int] = set()  # the running ones among them

    def __len__(self) -> int:
        """Completions still running."""
        return len(self._next)

    def join(self, decoder: Decoder, forward: TorchForward) -> int:
        """Prefill ``decoder``'s prompt on ``forward`` and decode it with the others from the
        next step on; its number (the ``finished`` callback's first argument)."""
        number = self._joined
        self._joined += 1
        self._members[number] = (decoder, forward)
        token = None
        if not decoder.done:
            try:
                logits = forward.prefill(decoder.input_ids)
            except Exception:  # this prompt fails alone; the batch goes on without it
                del self._members[number]
                raise
            decoder.prefilled()
            token = decoder.advance(logits)
        if token is None:
            self._end(number)
            return number
        self._next[number] = token
        if self._batch is not None:
            self._batch.add(*forward.handover())
            self._order.append(number)
        return number

    def step(self) -> bool:
        """One forward pass for every running completion; whether any is still running."""
        if len(self._next) == 1 and self._batch is None:  # alone: no padding, no mask
            number, token = next(iter(self._next.items()))
            decoder, forward = self._members[number]
            self._advance(number, decoder.advance(forward.step(token)))
            return bool(self._next)
        if not self._next:
            return False
        if self._batch is None:
            self._order = list(self._next)
            first = self._members[self._order[0]][1]
            parts = [self._members[number][1].handover() for number in self._order]
            self._batch = _Batch(first.model, first.cache_arg, parts)
        batch = self._batch
        logits = batch.step([self._next[number] for number in self._order])
        for number in self._order:
            if number not in self._sharing:
                self._sharing.add(number)
                self.shared += 1
        rows: list[int] = []
        ended: list[int] = []
        for row, number in enumerate(self._order):
            following = self._members[number][0].advance(logits[row])
            if following is None:
                self._members[number][1].take_back(*batch.row(row))
                ended.append(number)
            else:
                self._next[number] = following
                rows.append(row)
        if len(rows) <= 1:  # one left goes on alone
            for row in rows:
                self._members[self._order[row]][1].take_back(*batch.row(row))
            self._batch = None
        elif len(rows) < len(self._order):
            batch.keep_rows(rows)
        self._order = [self._order[row] for row in rows]
        for number in ended:
            self._advance(number, None)
        return bool(self._next)

    def _advance(self, number: int, token: int | None) -> None:
        if token is not None:
            self._next[number] = token
            return
        self._next.pop(number, None)
        self._end(number)

    def _end(self, number: int) -> None:
        decoder, forward = self._members.pop(number)
        self._sharing.discard(number)
        self._finished(number, decoder.result(forward.reused))
