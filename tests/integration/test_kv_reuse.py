"""KV-cache reuse across keystrokes: the same greedy tokens as a fresh prefill, on the
tiny model and on SmolLM2, for the torch and the onnxruntime backends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ghostloop import onnx_backend
from ghostloop.corpus import stdlib_dir, typing_pauses
from ghostloop.decoding import PrefixCaches, TorchForward
from ghostloop.models import LoadedModel, load_model
from ghostloop.postprocess import CursorContext
from ghostloop.settings import Settings
from ghostloop.suggest import suggest

MakeForward = Callable[[Any], Any]  # reuse -> a Forward


def replay(
    loaded: LoadedModel, settings: Settings, pauses: list[tuple[str, str]], make: MakeForward
) -> tuple[list[tuple[int, ...]], list[int], list[int]]:
    """Suggestions at each pause, each request reusing the previous one's cache."""
    caches = PrefixCaches(cap_bytes=1 << 30)
    tokens, reused, prompts = [], [], []
    for prefix, suffix in pauses:
        forward = make(caches.take("doc"))
        found = suggest(loaded, settings, CursorContext(prefix, suffix), forward=forward)
        caches.put("doc", forward.keep())
        tokens.append(found.generation.token_ids)
        reused.append(found.generation.reused_tokens)
        prompts.append(found.generation.prompt_tokens)
    return tokens, reused, prompts


def fresh(
    loaded: LoadedModel, settings: Settings, pauses: list[tuple[str, str]], make: MakeForward
) -> list[tuple[int, ...]]:
    return [
        suggest(loaded, settings, CursorContext(p, s), forward=make(None)).generation.token_ids
        for p, s in pauses
    ]


def check(
    loaded: LoadedModel, settings: Settings, pauses: list[tuple[str, str]], make: MakeForward
):
    expected = fresh(loaded, settings, pauses, make)
    got, reused, prompts = replay(loaded, settings, pauses, make)
    assert got == expected
    assert sum(len(t) for t in expected) > 3 * len(pauses)  # the model does write
    # every request after the first reuses most of its prompt: the window stays put while
    # typing (trim_prefix), so only the new words are prefilled
    assert all(r > 0 for r in reused[1:]), reused
    assert sum(reused[1:]) >= 0.9 * sum(prompts[1:]), (reused, prompts)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[LoadedModel, Settings]:
    settings = Settings.of(
        model=str(tiny_model_dir), device="cpu", max_new_tokens=12, context_tokens=256
    )
    return load_model(settings), settings


PAUSES_FILE = stdlib_dir() / "shlex.py"


def test_torch_reuse_equals_a_fresh_prefill_on_the_tiny_model(tiny):
    loaded, settings = tiny
    pauses = typing_pauses(PAUSES_FILE, 120, 6)
    check(loaded, settings, pauses, lambda r: TorchForward(loaded.model, "cpu", reuse=r))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "grouped"])
def test_onnx_reuse_equals_a_fresh_prefill_on_the_tiny_model(tiny, tmp_path: Path, fused: bool):
    loaded, settings = tiny
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name, fused=fused)
    model = onnx_backend.load(path, model_name=loaded.name)
    pauses = typing_pauses(PAUSES_FILE, 120, 6)
    check(loaded, settings, pauses, lambda r: onnx_backend.OnnxForward(model, reuse=r))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_an_edit_earlier_in_the_file_reuses_only_up_to_it(tiny, tmp_path: Path, backend: str):
    loaded, settings = tiny
    make: MakeForward = lambda r: TorchForward(loaded.model, "cpu", reuse=r)  # noqa: E731
    if backend == "onnxruntime":  # the fused graph: the positions after the edit overwritten
        path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name)
        model = onnx_backend.load(path, model_name=loaded.name)
        make = lambda r: onnx_backend.OnnxForward(model, reuse=r)  # noqa: E731
    source = PAUSES_FILE.read_text()
    at = len(source) // 3
    first = (source[:at], "")
    edited = (source[: at - 300] + "#" + source[at - 300 : at], "")  # an edit 300 chars back
    caches = PrefixCaches(cap_bytes=1 << 30)
    for prefix, suffix in (first, edited):
        forward = make(caches.take("doc"))
        found = suggest(loaded, settings, CursorContext(prefix, suffix), forward=forward)
        caches.put("doc", forward.keep())
    fresh_one = suggest(loaded, settings, CursorContext(*edited)).generation
    assert found.generation.token_ids == fresh_one.token_ids
    generation = found.generation
    # reused up to the edit, prefilled from it: the 300 characters after it are new
    assert 0 < generation.reused_tokens < generation.prompt_tokens - 50, generation


def test_the_store_evicts_least_recently_used_documents_under_its_cap(tiny):
    loaded, settings = tiny
    pauses = typing_pauses(PAUSES_FILE, 120, 1)[:1]
    forward = TorchForward(loaded.model, "cpu")
    suggest(loaded, settings, CursorContext(*pauses[0]), forward=forward)
    entry = forward.keep()
    assert entry is not None and entry.nbytes > 0
    caches = PrefixCaches(cap_bytes=int(entry.nbytes * 2.5))
    for name in ("a", "b", "c"):
        caches.put(name, entry)
    assert caches.take("a") is None and caches.take("c") is entry
    assert caches.stats.evictions == 1
    caches.put("huge", type(entry)(entry.token_ids, entry.cache, caches.cap_bytes + 1))
    assert caches.take("huge") is None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Settings]:
    directory = tmp_path_factory.mktemp("smollm2-kv")
    settings = Settings.of(device="cpu", max_new_tokens=12, max_lines=1, data_dir=directory)
    return load_model(settings), settings


@pytest.mark.slow
def test_torch_reuse_equals_a_fresh_prefill_on_smollm2(smollm2):
    loaded, settings = smollm2
    pauses = typing_pauses(stdlib_dir() / "fnmatch.py", 40, 3)
    check(loaded, settings, pauses, lambda r: TorchForward(loaded.model, "cpu", reuse=r))


@pytest.mark.slow
def test_onnx_reuse_equals_a_fresh_prefill_on_smollm2(smollm2, tmp_path: Path):
    loaded, settings = smollm2
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name)
    model = onnx_backend.load(
        path, model_name=loaded.name, threads=settings.inference.torch_threads
    )
    pauses = typing_pauses(stdlib_dir() / "fnmatch.py", 40, 3)
    check(loaded, settings, pauses, lambda r: onnx_backend.OnnxForward(model, reuse=r))
