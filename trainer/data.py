"""Examples as token ids, built exactly as the server builds its prompts.

The prompt is the server's (trimmed to ``train_context_tokens``, token-healed at its end
exactly as served); the target is the healed text plus what the developer kept, tokenized
on its own from that token boundary, so training sees the split the model sees when it
serves (docs/architecture.md, "Token healing": a prompt cut after indentation broke every
fine-tune when done wrong).
No end token is appended: a line completion ends with the newline that follows it, as the
model writes it there (``encode_target``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ghostloop.decoding import cache_keyword
from ghostloop.models import LoadedModel
from ghostloop.postprocess import CursorContext
from ghostloop.prompts import Prompt
from ghostloop.settings import Settings
from ghostloop.suggest import prompt_for
from trainer.labels import Example


@dataclass(frozen=True)
class Encoded:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the kept text
    rejected_ids: list[int]  # the logged suggestion; empty when it equals the kept text
    healed: str


def ends_line(example: Example) -> bool:
    """Whether a completion at ``example``'s cursor runs to the end of the line."""
    return example.suffix == "" or example.suffix.startswith("\n")


def target_text(example: Example, kept: str) -> str:
    """``kept`` as a completion: one that ends the line is followed by the newline."""
    if ends_line(example) and not kept.endswith("\n"):
        return kept + "\n"
    return kept


def encode_target(loaded: LoadedModel, healed: str, example: Example, kept: str) -> list[int]:
    """``kept`` as token ids after the prompt, ending the line with the token the model
    writes there.

    In running code a line end is one token with the next line's indentation ("\\n" and
    eight spaces) in 93 % of the line ends of the ``email`` package; a bare "\\n" has a
    probability of about 0.005 there under SmolLM2. A target cut after the newline ends
    in that rare bare token, the costliest token of every example: training then raises it
    everywhere and the model ends its lines early. So the newline is tokenized with what
    follows it in the document (the next line's indentation and first character) and the
    target keeps the one token that holds the newline.
    """
    body = healed + kept
    if not ends_line(example) or kept.endswith("\n") or not example.suffix:
        return encode_completion(loaded, healed, target_text(example, kept))
    # the newline(s), the next line's indentation and its first character
    blank = len(example.suffix) - len(example.suffix.lstrip())
    ids = loaded.tokenizer.encode_text(body + example.suffix[: blank + 1])
    for count in range(1, len(ids) + 1):
        text = loaded.tokenizer.decode_ids(ids[:count])
        if len(text) <= len(body):
            if not body.startswith(text):
                break
            continue
        if text.startswith(body) and "\n" in text[len(body) :]:
            return ids[:count]
        break  # a token across the end of the kept text: tokenize it on its own
    return encode_completion(loaded, healed, target_text(example, kept))


def encode_completion(loaded: LoadedModel, healed: str, text: str) -> list[int]:
    return loaded.tokenizer.encode_text(healed + text)


def training_prompt(loaded: LoadedModel, settings: Settings, context: CursorContext) -> Prompt:
    """The served prompt cut to ``train_context_tokens`` at a line start: the same end (and
    healing) as served, on less context. Training costs grow with the prompt's length; by
    default (0) the served prompt is trained on whole: on the `email` replay, the night
    on the served prompts saved more typing held out than on their nearest 256 tokens
    (docs/results.md)."""
    served = prompt_for(loaded, settings, context)
    budget = settings.training.context_tokens
    if not budget or budget >= settings.serving.context_tokens:
        return served
    # cut from the served prompt's own text, so that it is a part of it whatever the window
    within = CursorContext(served.prefix, served.suffix, served.repository)
    return prompt_for(loaded, settings.replaced(context_tokens=budget), within)


def encode(loaded: LoadedModel, settings: Settings, example: Example) -> Encoded:
    context = CursorContext(example.prefix, example.suffix, example.repository)
    prompt = training_prompt(loaded, settings, context)
    chosen = encode_target(loaded, prompt.healed, example, example.kept)
    rejected: list[int] = []
    if example.rejected is not None:
        rejected = encode_target(loaded, prompt.healed, example, example.rejected)
    return Encoded(list(prompt.input_ids), chosen, rejected, prompt.healed)


def pad_id(loaded: LoadedModel) -> int:
    """The id batches are padded with: the tokenizer's pad, else its end token, else 0."""
    hf = loaded.tokenizer.hf
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    return int(pad if pad is not None else 0)


def sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each completion after the prompt, and its token count.

    One padded batch: every row is the prompt followed by one completion.
    """
    device = next(model.parameters()).device
    rows = [list(prompt_ids) + list(c) for c in completions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, device=device)
        mask[index, : len(row)] = 1
    # logits only from the position that predicts the first completion token on: the
    # prompt's own (most of the row) are never scored
    first = max(len(prompt_ids) - 1, 0)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits
    targets = ids[:, first + 1 :]
    logits = logits[:, : targets.shape[1]].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lengths = torch.tensor([len(c) for c in completions], device=device)
    # with an empty prompt nothing predicts the first token: it is not scored
    scored = lengths - (first - (len(prompt_ids) - 1))
    positions = torch.arange(targets.shape[1], device=device).unsqueeze(0)
    return (token_logps * (positions < scored.unsqueeze(1))).sum(dim=1), lengths


def prompt_once_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logprobs`` without gradients, the prompt run once: its KV cache is
    repeated for the completions instead of the prompt being run again in every row. For
    the gate's likelihood figures, where a ~500-token prompt is scored with two completions
    of ~10 tokens, that halves the work."""
    if not prompt_ids or not completions:
        with torch.no_grad():
            return sequence_logprobs(model, prompt_ids, completions, pad_id)
    device = next(model.parameters()).device
    count = len(completions)
    lengths = torch.tensor([len(c) for c in completions], device=device)
    with torch.no_grad():
        prompt = torch.tensor([list(prompt_ids)], device=device)
        keyword = cache_keyword(model)
        cache = DynamicCache()  # filled in place by the prompt's pass
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{keyword: cache})
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        summed = torch.stack([first[c[0]] if c else first.new_zeros(()) for c in completions])
        fed = int(lengths.max()) - 1  # each token but a completion's last predicts the next
        if fed <= 0:
            return summed, lengths
        cache.batch_repeat_interleave(count)
        ids = torch.full((count, fed), pad_id, dtype=torch.long, device=device)
        targets = torch.full((count, fed), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((count, len(prompt_ids) + fed), dtype=torch.long, device=device)
        mask[:, : len(prompt_ids)] = 1
        for index, completion in enumerate(completions):
            steps = len(completion) - 1
            if steps > 0:
                ids[index, :steps] = torch.tensor(completion[:-1], device=device)
                targets[index, :steps] = torch.tensor(completion[1:], device=device)
                mask[index, len(prompt_ids) : len(prompt_ids) + steps] = 1
        logits = model(input_ids=ids, attention_mask=mask, **{keyword: cache}).logits.float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1))
        positions = torch.arange(fed, device=device).unsqueeze(0)
        scored = token_logps.squeeze(-1) * (positions < (lengths - 1).unsqueeze(1))
        return summed + scored.sum(dim=1), lengths
