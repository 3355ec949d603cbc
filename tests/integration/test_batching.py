"""Completions of several documents decoded together (one forward pass per step for all):
each gets the tokens it gets alone, with and without an adapter, with a cache kept for its
next keystroke, and a cancelled one leaves the others as they were; the engine batches what
waits at once."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from feedback.canary import arm_for
from ghostloop.corpus import stdlib_dir
from ghostloop.decoding import (
    BatchDecoding,
    Decoder,
    Generation,
    PrefixCaches,
    TorchForward,
)
from ghostloop.lora import LoraWeights, read_adapter
from ghostloop.models import LoadedModel, load_model
from ghostloop.postprocess import CursorContext, completion_mode
from ghostloop.settings import Settings
from ghostloop.suggest import prompt_for, suggest, suggest_batch
from lsp_server.engine import CompletionEngine, JobCancelled, ServingState
from tests.publishing import save_adapter

# cursors in four files, so the prompts differ in length and content (left padding)
CURSORS = [
    ("shlex.py", 120, 40),
    ("fnmatch.py", 1, 0),  # a short prompt: the others' rows are padded by hundreds
    ("textwrap.py", 300, 200),
    ("colorsys.py", 60, 0),
]


def contexts() -> list[CursorContext]:
    found = []
    for name, line, column in CURSORS:
        lines = (stdlib_dir() / name).read_text().splitlines(keepends=True)
        text = lines[line]
        indent = len(text) - len(text.lstrip())
        cut = min(len(text.rstrip("\n")), indent + column)
        found.append(CursorContext("".join(lines[:line]) + text[:cut], text[cut:]))
    return found


def alone(
    loaded: LoadedModel, settings: Settings, adapter: LoraWeights | None = None
) -> list[tuple[int, ...]]:
    return [
        suggest(loaded, settings, context, adapter=adapter).generation.token_ids
        for context in contexts()
    ]


def together(
    loaded: LoadedModel, settings: Settings, adapter: LoraWeights | None = None
) -> tuple[list[tuple[int, ...]], list[TorchForward]]:
    cursors = contexts()
    forwards = [TorchForward(loaded.model, "cpu") for _ in cursors]
    found = suggest_batch(
        loaded, settings, cursors, forwards, [lambda: None] * len(cursors), adapter=adapter
    )
    return [s.generation.token_ids for s in found], forwards


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[LoadedModel, Settings]:
    settings = Settings.of(  # torch batches; auto would switch to onnxruntime midway
        model=str(tiny_model_dir),
        backend="torch",
        device="cpu",
        max_new_tokens=12,
        context_tokens=256,
    )
    return load_model(settings), settings


def test_a_batch_gives_each_document_the_tokens_it_gets_alone(tiny):
    loaded, settings = tiny
    expected = alone(loaded, settings)
    got, _ = together(loaded, settings)
    assert got == expected
    lengths = sorted(len(t) for t in expected)
    assert lengths[-1] > 3  # the model does write
    assert len({len(c.prefix) for c in contexts()}) == len(CURSORS)  # rows are padded


class Recording(Decoder):
    """A decoder that keeps the logits it was given at each step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def advance(self, logits: torch.Tensor) -> int | None:
        if not self.done:
            self.seen.append(logits.clone())
        return super().advance(logits)


def test_each_row_of_a_batch_sees_the_logits_it_sees_alone(tiny):
    """Stronger than equal tokens (a random model's argmax barely depends on positions):
    every step's logits match the unbatched ones, so padding, masks and positions are right."""
    loaded, settings = tiny

    def decoders() -> list[Recording]:
        return [
            Recording(
                loaded,
                prompt_for(loaded, settings, context),
                completion_mode(context, settings.serving.max_lines),
                max_new_tokens=settings.serving.max_new_tokens,
            )
            for context in contexts()
        ]

    single = decoders()
    for decoder in single:  # as ``generate`` drives one
        forward = TorchForward(loaded.model, "cpu")
        logits = forward.prefill(decoder.input_ids)
        while (token := decoder.advance(logits)) is not None:
            logits = forward.step(token)
    batched = decoders()
    batch = BatchDecoding()
    for decoder in batched:
        batch.join(decoder, TorchForward(loaded.model, "cpu"))
    while batch.step():
        pass
    steps = 0
    for alone_one, in_batch in zip(single, batched, strict=True):
        assert len(in_batch.seen) == len(alone_one.seen)
        for a, b in zip(alone_one.seen, in_batch.seen, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            steps += 1
    assert steps > 3 * len(CURSORS)


def test_a_batch_with_an_adapter_gives_what_the_adapter_gives_alone(tiny, tmp_path: Path):
    loaded, settings = tiny
    save_adapter(Path(settings.inference.model), tmp_path / "a", seed=3)
    weights = read_adapter(tmp_path / "a", loaded.model, version="a")
    expected = alone(loaded, settings, weights)
    assert expected != alone(loaded, settings)  # the adapter changes what is written
    got, _ = together(loaded, settings, weights)
    assert got == expected


def test_each_document_keeps_its_own_cache_for_the_next_keystroke(tiny):
    loaded, settings = tiny
    _, forwards = together(loaded, settings)
    caches = PrefixCaches(cap_bytes=1 << 30)
    for number, forward in enumerate(forwards):
        entry = forward.keep()
        assert entry is not None
        # the cache holds what was fed: the prompt and the tokens generated after it
        assert entry.cache.get_seq_length() == len(entry.token_ids)
        caches.put(number, entry)
    for number, context in enumerate(contexts()):
        typed = CursorContext(context.prefix + "x", context.suffix)  # the next keystroke
        forward = TorchForward(loaded.model, "cpu", reuse=caches.take(number))
        reused = suggest(loaded, settings, typed, forward=forward).generation
        fresh = suggest(loaded, settings, typed).generation
        assert reused.token_ids == fresh.token_ids
        assert reused.reused_tokens > 0.8 * reused.prompt_tokens


def test_a_cancelled_completion_leaves_the_others_as_they_were(endless_model_dir: Path):
    settings = Settings.of(
        model=str(endless_model_dir), device="cpu", max_new_tokens=16, max_lines=1
    )
    loaded = load_model(settings)
    expected = alone(loaded, settings)
    calls = 0

    def cancel_soon() -> str | None:
        nonlocal calls
        calls += 1
        return "cancelled" if calls > 3 else None  # a call at the start and at each token

    cursors = contexts()
    stops = [lambda: None, lambda: None, cancel_soon, lambda: None]
    forwards = [TorchForward(loaded.model, "cpu") for _ in cursors]
    found = suggest_batch(loaded, settings, cursors, forwards, stops)
    assert found[2].generation.stop_reason == "cancelled"
    assert 0 < len(found[2].generation.token_ids) < len(expected[2])
    for number in (0, 1, 3):
        assert found[number].generation.token_ids == expected[number]


def held_engine(
    loaded: LoadedModel, settings: Settings
) -> tuple[CompletionEngine, threading.Event, Settings]:
    """A started engine (batches of 8) that serves nothing until the event is set, so
    every request submitted before is queued before the first is served."""
    settings = settings.replaced(batch_size=8)
    release = threading.Event()

    def load_later(_settings: Settings) -> LoadedModel:
        release.wait(30)
        return loaded

    engine = CompletionEngine(settings, loader=load_later)
    engine.start()
    return engine, release, settings


def test_the_engine_decodes_documents_that_wait_at_once_together(tiny):
    engine, release, settings = held_engine(*tiny)
    loaded = tiny[0]
    cursors = contexts()
    jobs = [engine.submit(f"doc{n}", context) for n, context in enumerate(cursors)]
    jobs.append(engine.submit("doc0", cursors[0]))  # supersedes the first job of doc0
    release.set()
    errors = [job.future.exception(30) for job in jobs]
    engine.stop()
    assert isinstance(errors[0], JobCancelled) and errors[1:] == [None] * 4
    results = [job.future.result() for job in jobs[1:]]
    assert [r.text for r in results] == [
        suggest(loaded, settings, c).text for c in cursors[1:] + cursors[:1]
    ]
    assert any(r.text for r in results)
    # one batch: every completion that needed a second token took it with the others (the
    # short fnmatch one ends at its first token, straight after its prefill)
    assert engine.stats.batched == sum(r.generated_tokens > 1 for r in results) >= 3
    assert engine.stats.completed == 4 and engine.stats.superseded == 1
    assert engine.prefix_caches.describe()["documents"] == 4


def test_completions_that_join_between_steps_see_what_they_see_alone(tiny):
    """Continuous batching: two start, two join later (one with a longer prompt than any
    row so far, which pads every row further; one shorter), each is reported the moment it
    ends, and every step's logits match the completion decoded alone."""
    loaded, settings = tiny
    cursors = contexts()

    def decoder(context: CursorContext) -> Recording:
        return Recording(
            loaded,
            prompt_for(loaded, settings, context),
            completion_mode(context, settings.serving.max_lines),
            max_new_tokens=settings.serving.max_new_tokens,
        )

    single = [decoder(context) for context in cursors]
    for one in single:
        forward = TorchForward(loaded.model, "cpu")
        logits = forward.prefill(one.input_ids)
        while (token := one.advance(logits)) is not None:
            logits = forward.step(token)
    steps = 0
    ended: dict[int, tuple[int, Generation]] = {}
    batch = BatchDecoding(lambda number, generation: ended.__setitem__(number, (steps, generation)))
    joined = [decoder(context) for context in cursors]
    forwards = [TorchForward(loaded.model, "cpu") for _ in cursors]
    order = [3, 1, 2, 0]  # the batch's members: 3 and 1 first, 2 (longest prompt), 0 later
    prompt_lengths = [len(one.input_ids) for one in joined]
    assert prompt_lengths[2] > prompt_lengths[3] + 3 and prompt_lengths[0] < prompt_lengths[2]
    for index in order[:2]:
        batch.join(joined[index], forwards[index])
    while steps < 3:
        batch.step()
        steps += 1
    for index in order[2:]:
        batch.join(joined[index], forwards[index])
    while batch.step():
        steps += 1
    for number, index in enumerate(order):
        alone_one, in_batch = single[index], joined[index]
        assert in_batch.generated == alone_one.generated
        assert len(in_batch.seen) == len(alone_one.seen)
        for a, b in zip(alone_one.seen, in_batch.seen, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        # reported during the step that gave it its last logits, not when the batch ended:
        # its first logits come from its prefill when it joins, one more at each step after
        at, generation = ended[number]
        assert generation.token_ids == tuple(alone_one.generated)
        joined_at = 0 if number < 2 else 3
        assert at == joined_at + max(len(alone_one.seen) - 2, 0)
    assert batch.shared  # some steps were shared


def running_long(model_dir: Path) -> tuple[Settings, LoadedModel]:
    """Completions of up to 160 tokens (a model without an end token): long enough for a
    request to arrive while they run."""
    settings = Settings.of(
        model=str(model_dir),
        backend="torch",
        device="cpu",
        max_new_tokens=160,
        max_lines=8,
        deadline_ms=60_000,  # a busy machine must not cut them short
    )
    return settings, load_model(settings)


def test_a_request_that_arrives_during_a_batch_joins_it(endless_model_dir: Path):
    settings, loaded = running_long(endless_model_dir)
    cursors = contexts()
    engine = CompletionEngine(settings, loader=lambda _settings: loaded)
    engine.start()
    assert engine.wait_ready(30)
    first = engine.submit("doc0", cursors[0])
    while not engine.stats.requests:  # the worker has taken it on
        time.sleep(0.001)
    second = engine.submit("doc2", cursors[2])
    results = [first.future.result(60), second.future.result(60)]
    engine.stop()
    assert [r.text for r in results] == [suggest(loaded, settings, c).text for c in cursors[::2]]
    assert results[0].generated_tokens > 40 and results[1].generated_tokens > 40
    assert engine.stats.batched == 2  # the second joined the first between two tokens


def test_a_request_for_other_weights_waits_for_the_batch_and_is_served_after(
    endless_model_dir: Path, tmp_path: Path
):
    """A canary splits users between two sets of weights: a request served by the other
    set does not join the running batch (its rows share one adapter) but runs right after."""
    settings, loaded = running_long(endless_model_dir)
    save_adapter(endless_model_dir, tmp_path / "c", seed=5)
    canary = read_adapter(tmp_path / "c", loaded.model, version="c")
    users = {arm_for(f"user{n}", "c", 0.5): f"user{n}" for n in range(40)}
    cursors = contexts()
    engine = CompletionEngine(settings, loader=lambda _settings: loaded)
    engine.serving = ServingState(active=None, canary=canary, canary_share=0.5)
    engine.start()
    assert engine.wait_ready(30)
    first = engine.submit("doc0", cursors[0], user=users["canary"])
    while not engine.stats.requests:
        time.sleep(0.001)
    other = engine.submit("doc2", cursors[2], user=users["active"])
    same = engine.submit("doc3", cursors[3], user=users["canary"])
    results = [job.future.result(60) for job in (first, other, same)]
    engine.stop()
    assert [r.adapter_version for r in results] == ["c", None, "c"]
    assert [r.arm for r in results] == ["canary", "active", "canary"]
    assert [r.text for r in results] == [
        suggest(loaded, settings, cursors[0], adapter=canary).text,
        suggest(loaded, settings, cursors[2]).text,
        suggest(loaded, settings, cursors[3], adapter=canary).text,
    ]
    assert engine.stats.batched == 2  # the canary's two, together


@pytest.mark.slow
def test_a_batch_on_smollm2_gives_each_document_the_tokens_it_gets_alone(
    tmp_path_factory: pytest.TempPathFactory,
):
    directory = tmp_path_factory.mktemp("smollm2-batch")
    settings = Settings.of(device="cpu", max_new_tokens=16, max_lines=1, data_dir=directory)
    loaded = load_model(settings)
    expected = alone(loaded, settings)
    got, forwards = together(loaded, settings)
    assert got == expected
    assert sum(len(t) for t in expected) > 2 * len(CURSORS)  # it does write
    assert all(f.keep() is not None for f in forwards)


def test_a_batch_lets_go_of_each_completion_as_it_ends(tiny):
    """Under steady load a batch never ends (requests keep joining): an ended completion's
    forward and cache must not stay referenced by it."""
    loaded, settings = tiny
    ended: list[Generation] = []
    batch = BatchDecoding(lambda number, generation: ended.append(generation))
    refs = []
    for context in contexts()[:2]:
        forward = TorchForward(loaded.model, "cpu")
        refs.append(weakref.ref(forward))
        decoder = Decoder(
            loaded,
            prompt_for(loaded, settings, context),
            completion_mode(context, settings.serving.max_lines),
            max_new_tokens=settings.serving.max_new_tokens,
        )
        batch.join(decoder, forward)
    del forward, decoder
    while batch.step():
        pass
    gc.collect()
    assert len(ended) == 2 and len(batch) == 0
    assert [ref() for ref in refs] == [None, None]


def test_a_bad_document_in_a_batch_fails_alone_and_every_job_is_answered(tiny):
    """A cursor the tokenizer cannot read (a lone surrogate) joins a batch, at its start
    and between steps: it gets its own error, the others their suggestions, and no job
    taken from the queue goes unanswered."""
    engine, release, settings = held_engine(*tiny)
    loaded = tiny[0]
    cursors = contexts()
    bad = CursorContext("def f():\n    return '\ud800", "")
    jobs = [engine.submit("bad-first", bad)]
    jobs += [engine.submit(f"doc{n}", context) for n, context in enumerate(cursors)]
    jobs.append(engine.submit("bad-last", bad))
    release.set()
    errors = [job.future.exception(30) for job in jobs]  # times out if one is never answered
    later = [engine.submit("bad-again", bad), engine.submit("good-again", cursors[2])]
    later_errors = [job.future.exception(30) for job in later]
    engine.stop()
    assert all(job.future.done() for job in jobs + later)
    assert errors[0] is not None and errors[-1] is not None and later_errors[0] is not None
    assert errors[1:-1] == [None] * len(cursors) and later_errors[1] is None
    assert [job.future.result().text for job in jobs[1:-1]] == [
        suggest(loaded, settings, c).text for c in cursors
    ]
