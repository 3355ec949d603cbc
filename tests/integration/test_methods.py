"""Each training method lowers its own loss on the training data (tiny model, CPU)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ghostloop.corpus import sample_positions, stdlib_dir
from ghostloop.models import load_model
from ghostloop.postprocess import CursorContext
from ghostloop.settings import Settings
from ghostloop.suggest import prompt_for
from trainer.data import (
    Encoded,
    encode,
    pad_id,
    prompt_once_logprobs,
    sequence_logprobs,
    training_prompt,
)
from trainer.labels import Example
from trainer.methods import (
    METHODS,
    TooLittleData,
    completion_loss,
    peft_model,
    training_arguments,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def stdlib_examples(count: int) -> list[Example]:
    """Rejected suggestions where the developer typed the real rest of the line."""
    path = stdlib_dir() / "shlex.py"
    text = path.read_text(encoding="utf-8")
    examples = []
    for index, sample in enumerate(sample_positions(path, count, seed=3)):
        examples.append(
            Example(
                completion_id=f"{index:032d}",
                created_at=T0 + timedelta(seconds=index),
                user="alice",
                template="prefix-only",
                prefix=text[: sample.offset][-1500:],
                suffix=text[sample.offset :][:300],
                suggestion="pass",
                kept=sample.true_line_rest,
                chars_saved=0,
                outcome="rejected",
                event_ids=(),
            )
        )
    return examples


@pytest.fixture
def settings(tiny_model_dir: Path, isolated_data_dir: Path) -> Settings:
    return Settings.of(
        model=str(tiny_model_dir),
        data_dir=isolated_data_dir,
        learning_rate=5e-3,
        rrhf_learning_rate=5e-3,
        epochs=2,
        threads=1,
    )


@pytest.mark.parametrize("method", ["sft", "dpo", "rrhf"])
def test_each_method_lowers_its_loss_on_the_training_data(
    settings: Settings, method: str, tmp_path: Path
):
    loaded = load_model(settings)
    model = peft_model(loaded, settings, None)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    outcome = METHODS[method](loaded, settings, model, stdlib_examples(12), tmp_path / "work")
    assert outcome.loss_after < outcome.loss_before, outcome.history
    assert outcome.examples == 24 and outcome.tokens > 0 and outcome.seconds > 0
    # as TRL's own tests check: every LoRA parameter moved, and the base model did not
    after = dict(model.named_parameters())
    lora = [name for name in before if "lora_" in name]
    assert lora and all(after[name].requires_grad for name in lora)
    unmoved = [name for name in lora if after[name].detach().equal(before[name])]
    assert not unmoved, unmoved
    moved_base = [
        name
        for name in before
        if "lora_" not in name and not after[name].detach().equal(before[name])
    ]
    assert not moved_base, moved_base


def test_targets_are_built_as_the_server_prompts_with_healing_and_no_end_token(
    settings: Settings,
):
    loaded = load_model(settings)
    after_indent = Example(
        **{
            **dataclasses.asdict(stdlib_examples(1)[0]),
            "prefix": "def f(values):\n    total = sum(values)\n    ",
            "suffix": "\n",
            "kept": "return total",
        }
    )
    encoded = encode(loaded, settings, after_indent)
    assert encoded.healed == " "  # one space of the indentation is generated again
    target = loaded.tokenizer.decode_ids(encoded.chosen_ids)
    assert target == " return total\n"  # the line ends with its newline, not an end token
    assert loaded.tokenizer.hf.eos_token_id not in encoded.chosen_ids
    prompt = loaded.tokenizer.decode_ids(encoded.prompt_ids)
    assert prompt.endswith("total = sum(values)\n   ")


def test_sampled_candidates_write_a_partial_name_again_first(settings: Settings):
    """RRHF's samples start as the server's suggestions do: with the healed text, a
    partial name of several tokens written again (unconstrained, most were thrown away)."""
    from trainer.methods import sample_candidates

    loaded = load_model(settings)
    example = Example(
        **{
            **dataclasses.asdict(stdlib_examples(1)[0]),
            "prefix": "def f(order):\n    return order.zorvex_shipping_surch",
            "suffix": "\n",
            "kept": "arge_cents",
        }
    )
    assert encode(loaded, settings, example).healed == "zorvex_shipping_surch"
    samples = sample_candidates(loaded, settings, loaded.model, example, 6, seed=1)
    assert len(samples) == 6


def test_a_prompt_served_with_repository_snippets_is_trained_on_with_them(settings: Settings):
    """The night trains on the prompt as it was sent: its repository part first."""
    loaded = load_model(settings)
    repository = "# Path: shipping.py\n# def zorvex_rate():\n"
    plain = stdlib_examples(1)[0]
    with_snippets = dataclasses.replace(plain, repository=repository)
    encoded, alone = encode(loaded, settings, with_snippets), encode(loaded, settings, plain)
    assert encoded.prompt_ids == loaded.tokenizer.encode_text(repository) + alone.prompt_ids
    assert encoded.chosen_ids == alone.chosen_ids


def test_a_line_ends_with_the_newline_token_the_document_has_there(settings: Settings):
    # the newline is tokenized with the next line's indentation, as in the document: a
    # target cut after a bare newline teaches a token the model almost never writes at a
    # line end, and training on it shortened every suggestion
    loaded = load_model(settings)
    tokenizer = loaded.tokenizer
    # the file as the server sees it after a reject: the true rest of the line typed later
    cut = [dataclasses.replace(e, suffix=e.suffix[len(e.kept) :]) for e in stdlib_examples(12)]
    examples = [e for e in cut if e.suffix.startswith("\n")]
    assert len(examples) >= 8
    bare = tokenizer.encode_text("\n")
    ends = []
    for example in examples:
        encoded = encode(loaded, settings, example)
        for ids, text in ((encoded.chosen_ids, example.kept), (encoded.rejected_ids, "pass")):
            in_document = tokenizer.encode_text(encoded.healed + text + example.suffix)
            assert ids == in_document[: len(ids)]
            pieces = [tokenizer.decode_ids([i]) for i in ids]
            assert "\n" in pieces[-1] and not any("\n" in p for p in pieces[:-1]), pieces
            assert tokenizer.decode_ids(ids).startswith(encoded.healed + text)
            ends.append(ids[-1:])
    assert any(end != bare for end in ends)  # indentation rides on the newline token


def test_dpo_without_pairs_says_so(settings: Settings, tmp_path: Path):
    loaded = load_model(settings)
    same = [dataclasses.replace(e, suggestion=e.kept) for e in stdlib_examples(4)]
    with pytest.raises(TooLittleData, match="0 of 4 examples"):
        METHODS["dpo"](loaded, settings, peft_model(loaded, settings, None), same, tmp_path)


def test_training_prompts_are_the_served_prompts_nearest_part_with_the_same_end(
    settings: Settings,
):
    loaded = load_model(settings)
    long = dataclasses.replace(
        stdlib_examples(1)[0], prefix=(stdlib_dir() / "shlex.py").read_text()[:6000]
    )
    context = CursorContext(long.prefix, long.suffix)
    served = prompt_for(loaded, settings.replaced(context_tokens=512), context)
    cut = settings.replaced(context_tokens=512, train_context_tokens=64)
    trained = training_prompt(loaded, cut, context)
    assert len(trained.input_ids) <= 64 < len(served.input_ids)
    # a line start of the same document, ending where the served prompt ends
    assert served.prefix.endswith(trained.prefix) and long.prefix.endswith(trained.prefix)
    assert long.prefix[-len(trained.prefix) - 1] == "\n"
    assert trained.healed == served.healed
    assert encode(loaded, cut, long).prompt_ids == list(trained.input_ids)
    # 0, or a budget as large as the served one, trains on the served prompt itself
    for budget in (0, 512):
        same = cut.replaced(train_context_tokens=budget)
        assert training_prompt(loaded, same, context) == served


def padded_batch(rows: list[Encoded]) -> dict[str, Any]:
    """Prompt plus kept text per row, right-padded: ids, mask, the kept text's labels and
    the prompt tokens' (context) labels, -100 elsewhere."""
    import torch

    width = max(len(r.prompt_ids) + len(r.chosen_ids) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    context = torch.full((len(rows), width), -100)
    for index, row in enumerate(rows):
        tokens = row.prompt_ids + row.chosen_ids
        ids[index, : len(tokens)] = torch.tensor(tokens)
        mask[index, : len(tokens)] = 1
        labels[index, len(row.prompt_ids) : len(tokens)] = torch.tensor(row.chosen_ids)
        context[index, : len(row.prompt_ids)] = torch.tensor(row.prompt_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "context_labels": context}


def test_the_completion_loss_equals_the_full_loss_on_a_padded_batch(settings: Settings):
    """Logits only where a label follows: the same loss and gradients as computing them all."""
    import torch

    loaded = load_model(settings)
    model = peft_model(loaded, settings, None)
    model.eval()  # no LoRA dropout: both passes see the same network
    inputs = padded_batch([encode(loaded, settings, e) for e in stdlib_examples(3)])
    del inputs["context_labels"]
    width = inputs["input_ids"].shape[1]
    full = model(**inputs).loss
    full.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss, outputs = completion_loss(model, inputs)
    loss.backward()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    assert outputs.logits.shape[1] < width // 2  # most positions skipped
    assert torch.allclose(loss, full, atol=1e-5)
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, expected, strict=True))


def test_the_context_term_adds_the_prompt_tokens_own_loss_with_its_weight(settings: Settings):
    """With context labels, the loss is the kept text's mean cross-entropy plus the weight
    times the prompt tokens' mean cross-entropy, each as the model's own loss computes it."""
    import torch

    loaded = load_model(settings)
    model = peft_model(loaded, settings, None)
    model.eval()
    inputs = padded_batch([encode(loaded, settings, e) for e in stdlib_examples(3)])
    context = inputs.pop("context_labels")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        kept = model(**inputs).loss
        around = model(input_ids=ids, attention_mask=mask, labels=context).loss
        alone, _ = completion_loss(model, {**inputs, "context_labels": context}, 0.0)
        both, _ = completion_loss(model, {**inputs, "context_labels": context}, 0.5)
    assert torch.allclose(alone, kept, atol=1e-5)  # weight 0: the context is not looked at
    assert torch.allclose(both, kept + 0.5 * around, atol=1e-5)
    assert around > 0 and not torch.allclose(both, kept, atol=1e-3)


def test_sft_trains_on_the_context_term_when_it_is_weighted(settings: Settings, tmp_path: Path):
    """The collated batches carry the context labels to the loss, in training and in the
    loss probe: weighted, every logged loss holds the prompt tokens' term (about the
    random model's ln(vocabulary) again), and training lowers it."""
    loaded = load_model(settings)
    outcomes = {}
    for weight in (0.0, 1.0):
        outcomes[weight] = METHODS["sft"](
            loaded,
            settings.replaced(context_loss_weight=weight),
            peft_model(load_model(settings), settings, None),
            stdlib_examples(12),
            tmp_path / f"work-{weight}",
        )
    alone, both = outcomes[0.0], outcomes[1.0]
    assert both.loss_after < both.loss_before, both.history
    assert both.loss_before > alone.loss_before + 3.0, (alone.loss_before, both.loss_before)
    assert min(both.history) > max(alone.history) + 3.0, (alone.history, both.history)


@pytest.mark.parametrize("prompt_length", [0, 1, 40])
def test_sequence_logprobs_score_each_completion_token_after_the_prompt(
    settings: Settings, prompt_length: int
):
    import torch

    loaded = load_model(settings)
    model = loaded.model
    row = encode(loaded, settings, stdlib_examples(1)[0])
    prompt = row.prompt_ids[-prompt_length:] if prompt_length else []
    completions = [row.chosen_ids, row.chosen_ids[:3], [7, 8, 9, 10, 11]]
    summed, lengths = sequence_logprobs(model, prompt, completions, pad_id(loaded))
    assert lengths.tolist() == [len(c) for c in completions]
    for index, completion in enumerate(completions):
        tokens = torch.tensor([list(prompt) + list(completion)])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=tokens).logits[0, :-1].float(), dim=-1)
        # each completion token after the first position, scored by the logits before it
        expected = sum(
            float(logps[at - 1, tokens[0, at]])
            for at in range(max(len(prompt), 1), tokens.shape[1])
        )
        assert abs(float(summed[index]) - expected) < 1e-3


@pytest.mark.parametrize("prompt_length", [0, 1, 40])
def test_the_prompt_run_once_scores_as_the_prompt_run_per_completion(
    settings: Settings, prompt_length: int
):
    """The gate's likelihood figures run the prompt once and repeat its cache: the same
    figures as ``sequence_logprobs``, with completions of different lengths (one token
    and empty included) on the adapter being trained."""
    import torch

    loaded = load_model(settings)
    model = peft_model(loaded, settings, None)
    model.eval()
    with torch.no_grad():  # a LoRA that is not zero, so the adapter counts in both
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    row = encode(loaded, settings, stdlib_examples(1)[0])
    prompt = row.prompt_ids[-prompt_length:] if prompt_length else []
    completions = [row.chosen_ids, [row.chosen_ids[0]], [7, 8, 9, 10, 11], []]
    with torch.no_grad():
        expected, expected_lengths = sequence_logprobs(model, prompt, completions, pad_id(loaded))
    summed, lengths = prompt_once_logprobs(model, prompt, completions, pad_id(loaded))
    assert lengths.tolist() == expected_lengths.tolist() == [len(c) for c in completions]
    assert torch.allclose(summed, expected, atol=1e-4), (summed, expected)
    assert float(summed[3]) == 0.0  # nothing to score
    assert (float(summed[1]) < 0.0) == bool(prompt)  # without a prompt the first is not scored


@pytest.mark.parametrize("method", ["dpo", "rrhf"])
def test_the_context_term_is_named_as_ignored_by_the_ranking_methods(
    settings: Settings, method: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    loaded = load_model(settings)
    weighted = settings.replaced(context_loss_weight=1.0)
    with pytest.raises(TooLittleData):  # one example: nothing to rank, after the warning
        METHODS[method](
            loaded, weighted, peft_model(loaded, weighted, None), stdlib_examples(1), tmp_path
        )
    assert f"context_loss_weight=1.0 is for sft only: {method} trains without" in caplog.text


def test_a_cpu_night_trains_without_activation_checkpointing(settings: Settings, tmp_path: Path):
    """TRL turns activation checkpointing on by default; on a CPU it only costs compute.
    Turned off by the option's current name (the old one warns, an error in these tests)."""
    from trl import DPOConfig, SFTConfig

    loaded = load_model(settings)
    for config in (SFTConfig, DPOConfig):
        args = config(**training_arguments(settings, loaded, tmp_path, 1e-4))
        assert args.gradient_checkpointing is False, config.__name__
