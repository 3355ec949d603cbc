from pathlib import Path

import pytest

from ghostloop.decoding import TorchForward, generate
from ghostloop.models import LoadedModel, load_model
from ghostloop.postprocess import CompletionMode, CursorContext, completion_mode
from ghostloop.prompts import build_prompt
from ghostloop.settings import Settings

SOURCE = "def split(self, text):\n    chunks = self.wordsep_re.split(text)\n    return chu"


@pytest.fixture(scope="module")
def endless(endless_model_dir: Path) -> LoadedModel:
    return load_model(Settings.of(model=str(endless_model_dir), device="cpu"))


def _prompt(loaded: LoadedModel, prefix: str):
    return build_prompt(
        loaded.tokenizer,
        loaded.template,
        prefix,
        "",
        context_tokens=256,
        suffix_share=0.25,
        marker_ids=loaded.marker_ids,
    )


def test_first_token_extends_the_healed_text(endless: LoadedModel):
    prompt = _prompt(endless, SOURCE)
    assert prompt.healed
    generation = generate(
        endless,
        TorchForward(endless.model, "cpu"),
        prompt,
        CompletionMode(True, 0, 99),
        max_new_tokens=3,
    )
    first = endless.tokenizer.decode_ids(generation.token_ids[:1])
    assert first.startswith(prompt.healed)


def test_a_partial_name_is_written_again_before_the_suggestion_counts(endless: LoadedModel):
    prefix = "def f(order):\n    return order.zorvex_shipping_surch"
    prompt = _prompt(endless, prefix)
    assert prompt.healed == "zorvex_shipping_surch"
    generation = generate(
        endless,
        TorchForward(endless.model, "cpu"),
        prompt,
        CompletionMode(True, 0, 10_000),
        max_new_tokens=2,
    )
    written = endless.tokenizer.decode_ids(generation.token_ids)
    assert generation.stop_reason in ("max_tokens", "block_end", "stop_token")
    assert written.startswith(prompt.healed)
    healing = len(generation.token_ids) - 2
    assert healing >= 1  # the name took tokens of its own, not counted against the two
    assert written[len(prompt.healed) :] == generation.text


def test_generation_stops_when_asked_and_keeps_what_it_has(endless: LoadedModel):
    calls = {"n": 0}

    def stop_after_five() -> str | None:
        # asked once before the prefill, then once before each token
        calls["n"] += 1
        return "cancelled" if calls["n"] > 6 else None

    generation = generate(
        endless,
        TorchForward(endless.model, "cpu"),
        _prompt(endless, SOURCE),
        CompletionMode(True, 0, 10_000),
        max_new_tokens=1000,
        should_stop=stop_after_five,
    )
    assert generation.stop_reason == "cancelled"
    assert len(generation.token_ids) == 5


def test_token_limit_ends_generation(endless: LoadedModel):
    context = CursorContext(SOURCE, "")
    generation = generate(
        endless,
        TorchForward(endless.model, "cpu"),
        _prompt(endless, SOURCE),
        completion_mode(context, 10_000),
        max_new_tokens=7,
    )
    assert generation.stop_reason in ("max_tokens", "block_end")
    assert len(generation.token_ids) <= 7
