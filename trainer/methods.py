"""The three ways a night of feedback becomes a LoRA adapter: sft, dpo and rrhf.

- sft: likelihood on the kept text only, through TRL's SFTTrainer (the control, and the
  only recipe that lifted held-out acceptance in the lab run, docs/architecture.md).
- dpo: TRL's DPOTrainer with an NLL term on the kept text (``loss_type=["sigmoid",
  "sft"]``); with a peft model and no reference model, the reference is the same model
  with its adapter off.
- rrhf: our own Trainer subclass, because no maintained library implements RRHF.

Every method trains on token ids from ``trainer.data``; runs on CPU or GPU (bf16), and
under ``accelerate launch`` on several processes, through transformers' Trainer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from feedback.metrics import judge
from ghostloop.models import LoadedModel
from ghostloop.postprocess import CursorContext, completion_mode, finish_suggestion
from ghostloop.settings import Settings
from trainer.data import (
    Encoded,
    encode,
    encode_target,
    pad_id,
    sequence_logprobs,
    training_prompt,
)
from trainer.labels import Example

log = logging.getLogger(__name__)


class TooLittleData(RuntimeError):
    """The method has nothing (or too little) to learn from; the message gives the counts."""


@dataclass
class TrainOutcome:
    model: Any  # the peft model, adapter "default" trained
    method: str
    loss_before: float
    loss_after: float
    history: list[float]
    examples: int
    tokens: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def peft_model(loaded: LoadedModel, settings: Settings, start_from: Path | None) -> Any:
    """The base model with a trainable LoRA: a fresh one, or the active adapter's weights."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed

    set_seed(settings.seed)  # the LoRA's initial weights: a run can be repeated exactly
    base = loaded.model
    if start_from is not None:
        return PeftModel.from_pretrained(base, str(start_from), is_trainable=True)
    config = LoraConfig(
        r=settings.training.lora_rank,
        lora_alpha=settings.training.lora_alpha,
        target_modules=settings.training.lora_target_modules,
        lora_dropout=0.05,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(base, config)
    except ValueError as error:  # e.g. a target module the model does not have
        raise ValueError(
            f"cannot put a LoRA on {settings.training.lora_targets!r} of {loaded.name}: {error} — "
            "set GHOSTLOOP_LORA_TARGETS to modules the model has"
        ) from None


def training_arguments(
    settings: Settings, loaded: LoadedModel, work_dir: Path, learning_rate: float, **extra: Any
) -> dict[str, Any]:
    on_gpu = loaded.device.startswith("cuda")
    return {
        "output_dir": str(work_dir),
        "per_device_train_batch_size": settings.training.batch_size,
        "per_device_eval_batch_size": settings.training.batch_size,
        "num_train_epochs": settings.training.epochs,
        "learning_rate": learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": settings.seed,
        "use_cpu": not on_gpu,
        "bf16": on_gpu and loaded.dtype == "bfloat16",
        "dataloader_num_workers": 0,
        "disable_tqdm": False,  # the progress bar with its ETA
        # TRL turns activation checkpointing on by default: it trades compute for memory,
        # and a small model on a CPU has memory to spare but no compute.
        **activation_checkpointing(on_gpu),
        **extra,
    }


def activation_checkpointing(on: bool) -> dict[str, Any]:
    """The training option that turns activation checkpointing on or off, by the name the
    installed transformers takes: ``activation_checkpointing`` since 5.2x (where
    ``gradient_checkpointing`` is a deprecated alias, removed in v6), the old name before."""
    if "activation_checkpointing" in _argument_names():
        return {"activation_checkpointing": on}
    return {"gradient_checkpointing": on}


def _argument_names() -> set[str]:
    """The options the installed transformers' TrainingArguments takes."""
    import dataclasses

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def by_length() -> dict[str, Any]:
    """Batches of examples of about the same length (transformers' LengthGroupedSampler:
    shuffled, then sorted within groups of up to a quarter of the data). Batched at random,
    15 % of the tokens a demo's night computed were padding (prompts of 28 to 512 tokens,
    404 on average, in batches of 4); older transformers call the option group_by_length."""
    if "train_sampling_strategy" in _argument_names():
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _losses(trainer: Trainer) -> list[float]:
    return [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def _ensure_pad_token(loaded: LoadedModel) -> None:
    hf = loaded.tokenizer.hf
    if hf.pad_token is None:
        hf.pad_token = hf.eos_token or hf.convert_ids_to_tokens(0)


# -- sft -------------------------------------------------------------------------------
def completion_loss(
    model: Any, inputs: dict[str, Any], context_weight: float = 0.0
) -> tuple[torch.Tensor, Any]:
    """Mean cross-entropy of the labelled tokens, with logits computed only where a label
    follows. A line completion labels ~10 of ~270 tokens, and the output layer (28M of
    SmolLM2's 135M weights, then a 49k-wide softmax) run on every prompt token was about a
    fifth of each training step's work.

    With ``context_weight`` and ``context_labels`` in the batch (the prompt's own tokens),
    the mean cross-entropy of those is added with that weight: the kept text and the code
    around it each count as one term, however many tokens each has."""
    targets = inputs["labels"][:, 1:]
    context = inputs.get("context_labels") if context_weight else None
    labelled = targets != -100
    if context is not None:
        context = context[:, 1:]
        labelled = labelled | (context != -100)
    keep = labelled.any(dim=0).nonzero().flatten()
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        logits_to_keep=keep,
    )
    logits = outputs.logits.flatten(0, 1).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[:, keep].flatten(), ignore_index=-100)
    if context is not None:
        around = torch.nn.functional.cross_entropy(
            logits, context[:, keep].flatten(), ignore_index=-100
        )
        loss = loss + context_weight * around
    return loss, outputs


def _with_context_labels(collate: Any) -> Any:
    """``collate`` (TRL's, which pads the input ids and the labels and knows nothing of a
    third column) with each row's ``context_labels`` taken out before it and padded as the
    labels are: -100 on the right."""

    def collate_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
        context = [torch.tensor(row["context_labels"]) for row in rows]
        batch = collate([{k: v for k, v in row.items() if k != "context_labels"} for row in rows])
        padded = torch.nn.utils.rnn.pad_sequence(context, batch_first=True, padding_value=-100)
        if padded.shape != batch["labels"].shape:
            raise RuntimeError(
                f"context labels {tuple(padded.shape)} do not line up with the labels "
                f"{tuple(batch['labels'].shape)}: the collator pads differently than expected"
            )
        batch["context_labels"] = padded
        return batch

    return collate_rows


def _sft_only(settings: Settings, method: str) -> None:
    if settings.training.sft.context_loss_weight:
        log.warning(
            "context_loss_weight=%s is for sft only: %s trains without the context term",
            settings.training.sft.context_loss_weight,
            method,
        )


def _completion_sft_trainer() -> type:
    from trl import SFTTrainer

    class CompletionSFTTrainer(SFTTrainer):  # type: ignore[misc]
        """SFTTrainer (data, collation, devices) with ``completion_loss``: TRL computes the
        logits of every prompt token and has no switch for labelled positions only."""

        context_weight = 0.0

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            loss, outputs = completion_loss(model, inputs, self.context_weight)
            return (loss, outputs) if return_outputs else loss

    return CompletionSFTTrainer


def train_sft(
    loaded: LoadedModel, settings: Settings, model: Any, examples: Sequence[Example], work: Path
) -> TrainOutcome:
    from trl import SFTConfig

    sft = settings.training.sft
    weight = sft.context_loss_weight
    rows = []
    for example in examples:
        encoded = encode(loaded, settings, example)
        row = {
            "input_ids": encoded.prompt_ids + encoded.chosen_ids,
            "labels": [-100] * len(encoded.prompt_ids) + encoded.chosen_ids,
        }
        if weight:
            row["context_labels"] = encoded.prompt_ids + [-100] * len(encoded.chosen_ids)
        rows.append(row)
    if not rows:
        raise TooLittleData("sft has no examples")
    dataset = Dataset.from_list(rows)
    _ensure_pad_token(loaded)
    config = SFTConfig(
        **training_arguments(settings, loaded, work, sft.learning_rate),
        **by_length(),
        max_length=None,
        packing=False,
        prediction_loss_only=True,  # the loss probe needs no logits kept
        # the context labels reach the loss only if the trainer keeps their column
        remove_unused_columns=not weight,
    )
    trainer = _completion_sft_trainer()(
        model=model, args=config, train_dataset=dataset, processing_class=loaded.tokenizer.hf
    )
    if weight:
        trainer.context_weight = weight
        trainer.data_collator = _with_context_labels(trainer.data_collator)
    return _run(trainer, "sft", model, dataset, sum(len(r["input_ids"]) for r in rows))


# training examples the loss is measured on before and after (64 took 80 s each time on a
# 2-core CPU, about 5 % of the demo's time)
LOSS_PROBE = 16


def _run(trainer: Trainer, method: str, model: Any, dataset: Dataset, tokens: int) -> TrainOutcome:
    # the same fixed sample of the training data before and after: the loss must fall
    probe = dataset.select(range(min(LOSS_PROBE, len(dataset))))
    before = float(trainer.evaluate(eval_dataset=probe)["eval_loss"])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    after = float(trainer.evaluate(eval_dataset=probe)["eval_loss"])
    model.eval()
    return TrainOutcome(
        model=model,
        method=method,
        loss_before=before,
        loss_after=after,
        history=_losses(trainer),
        examples=len(dataset) * int(trainer.args.num_train_epochs),
        tokens=tokens * int(trainer.args.num_train_epochs),
        seconds=seconds,
    )


# -- dpo -------------------------------------------------------------------------------
def _tokenized_dpo_trainer() -> type:
    from trl import DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):  # type: ignore[misc]
        """DPOTrainer on rows that are token ids already.

        TRL appends an end token to every completion of a plain-text dataset and has no
        switch to turn that off; for line completions that teaches an end token after the
        newline (docs/architecture.md, "TRL and transformers 5"). Our rows are built as the
        server builds its prompts, so they are used as they are.
        """

        def _prepare_dataset(self, dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
            return dataset

    return TokenizedDPOTrainer


def train_dpo(
    loaded: LoadedModel, settings: Settings, model: Any, examples: Sequence[Example], work: Path
) -> TrainOutcome:
    from trl import DPOConfig

    _sft_only(settings, "dpo")
    dpo = settings.training.dpo
    rows = []
    for example in examples:
        encoded = encode(loaded, settings, example)
        if encoded.rejected_ids and encoded.rejected_ids != encoded.chosen_ids:
            rows.append(
                {
                    "prompt_ids": encoded.prompt_ids,
                    "chosen_ids": encoded.chosen_ids,
                    "rejected_ids": encoded.rejected_ids,
                }
            )
    if len(rows) < 2:
        raise TooLittleData(
            f"dpo needs pairs whose suggestion differs from the kept text: {len(rows)} of "
            f"{len(examples)} examples have one"
        )
    dataset = Dataset.from_list(rows)
    _ensure_pad_token(loaded)
    config = DPOConfig(
        **training_arguments(settings, loaded, work, dpo.learning_rate),
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, dpo.nll_weight],
        beta=dpo.beta,
        max_length=None,
    )
    trainer = _tokenized_dpo_trainer()(
        model=model, args=config, train_dataset=dataset, processing_class=loaded.tokenizer.hf
    )
    tokens = sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )
    return _run(trainer, "dpo", model, dataset, tokens)


# -- rrhf ------------------------------------------------------------------------------
def rrhf_loss(
    model: Any, rows: Sequence[dict[str, Any]], pad_id: int, nll_weight: float
) -> torch.Tensor:
    """RRHF (Yuan et al., 2023) for one batch of prompts.

    Per prompt: length-normalised log-probabilities of its candidates; a hinge ranking
    loss AVERAGED over the ordered pairs (a sum over a prompt's pairs swamped the NLL term
    in the lab run, docs/architecture.md); plus the NLL of the best candidate. The batch
    loss is the mean.
    """
    losses = []
    for row in rows:
        candidates, scores = row["candidates"], row["scores"]
        summed, lengths = sequence_logprobs(model, row["prompt_ids"], candidates, pad_id)
        normalised = summed / lengths.clamp(min=1)
        pairs = [
            normalised[j] - normalised[i]
            for i in range(len(scores))
            for j in range(len(scores))
            if scores[i] > scores[j]
        ]
        ranking = torch.relu(torch.stack(pairs)).mean() if pairs else normalised.sum() * 0
        best = max(range(len(scores)), key=lambda index: scores[index])
        losses.append(ranking - nll_weight * normalised[best])
    return torch.stack(losses).mean()


class RRHFTrainer(Trainer):
    """transformers' Trainer (devices, accelerate, progress bar) with the RRHF loss."""

    def __init__(self, *args: Any, pad_id: int, nll_weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pad_id = pad_id
        self.nll_weight = nll_weight

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        loss = rrhf_loss(model, inputs["rows"], self.pad_id, self.nll_weight)
        return (loss, None) if return_outputs else loss

    def evaluate(  # type: ignore[override]
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """The mean RRHF loss over ``eval_dataset`` without gradients."""
        model = self.model
        assert model is not None
        was_training = model.training
        model.eval()
        batch = self.args.per_device_eval_batch_size
        rows = list(eval_dataset if eval_dataset is not None else [])
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(rows), batch):
                chunk = rows[start : start + batch]
                total += float(rrhf_loss(model, chunk, self.pad_id, self.nll_weight)) * len(chunk)
        model.train(was_training)
        return {f"{metric_key_prefix}_loss": total / max(1, len(rows))}


def sample_candidates(
    loaded: LoadedModel, settings: Settings, model: Any, example: Example, count: int, seed: int
) -> list[str]:
    """``count`` suggestions sampled from the model being trained, post-processed as served."""
    if count <= 0:
        return []
    context = CursorContext(example.prefix, example.suffix, example.repository)
    prompt = training_prompt(loaded, settings, context)
    mode = completion_mode(context, settings.serving.max_lines)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt.input_ids)], device=device)
    anything = list(range(len(loaded.tokenizer)))
    start = ids.shape[1]

    def healing(_row: int, so_far: torch.Tensor) -> list[int]:
        # the healed text first, as the server writes it (a partial name can take
        # several tokens): a sample that does not start with it is thrown away
        written = loaded.tokenizer.decode_ids([int(t) for t in so_far[start:]])
        allowed = loaded.prefix_index.while_healing(prompt.healed, written)
        return list(allowed) if allowed else anything

    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            prefix_allowed_tokens_fn=healing if prompt.healed else None,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=settings.serving.max_new_tokens,
            num_return_sequences=count,
            pad_token_id=pad_id(loaded),
        )
    samples = []
    for row in output[:, ids.shape[1] :]:
        text = loaded.tokenizer.decode_ids([int(t) for t in row if int(t) not in loaded.stop_ids])
        if text.startswith(prompt.healed):
            samples.append(finish_suggestion(text[len(prompt.healed) :], context, mode))
    return samples


def rrhf_rows(
    loaded: LoadedModel,
    settings: Settings,
    model: Any,
    examples: Sequence[Example],
) -> list[dict[str, Any]]:
    """Per prompt: the kept text, the logged suggestion and any samples, each scored by the
    characters it saves against the kept text (never the retained/suggested ratio, which
    pays for stopping early)."""
    rng = random.Random(settings.seed)
    rows = []
    for example in examples:
        encoded: Encoded = encode(loaded, settings, example)
        texts = {example.kept: float(judge(example.kept, example.kept).retained)}
        if example.suggestion.strip():
            texts.setdefault(
                example.suggestion, float(judge(example.suggestion, example.kept).retained)
            )
        samples = sample_candidates(
            loaded, settings, model, example, settings.training.rrhf.samples, rng.randrange(2**31)
        )
        for sample in samples:
            if sample.strip():
                texts.setdefault(sample, float(judge(sample, example.kept).retained))
        candidates = [encode_target(loaded, encoded.healed, example, text) for text in texts]
        rows.append(
            {
                "prompt_ids": encoded.prompt_ids,
                "candidates": candidates,
                "scores": list(texts.values()),
                "texts": list(texts),
            }
        )
    return rows


def train_rrhf(
    loaded: LoadedModel, settings: Settings, model: Any, examples: Sequence[Example], work: Path
) -> TrainOutcome:
    _sft_only(settings, "rrhf")
    rows = rrhf_rows(loaded, settings, model, examples)
    ranked = [r for r in rows if len(set(r["scores"])) > 1]
    if len(ranked) < 2:
        raise TooLittleData(
            f"rrhf needs prompts with candidates of different worth: {len(ranked)} of "
            f"{len(rows)} have them"
        )
    dataset = Dataset.from_list(
        [{k: r[k] for k in ("prompt_ids", "candidates", "scores")} for r in rows]
    )
    rrhf = settings.training.rrhf
    config = TrainingArguments(
        **training_arguments(
            settings, loaded, work, rrhf.learning_rate, remove_unused_columns=False
        )
    )
    trainer = RRHFTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=lambda batch: {"rows": batch},
        pad_id=pad_id(loaded),
        nll_weight=rrhf.nll_weight,
    )
    tokens = sum(
        len(r["prompt_ids"]) * len(r["candidates"]) + sum(map(len, r["candidates"])) for r in rows
    )
    outcome = _run(trainer, "rrhf", model, dataset, tokens)
    outcome.extra["rankings"] = [{"texts": r["texts"], "scores": r["scores"]} for r in rows]
    return outcome


METHODS = {"sft": train_sft, "dpo": train_dpo, "rrhf": train_rrhf}
