"""A tiny random Llama with a BPE tokenizer trained in milliseconds on a few stdlib files.

Small enough that the whole server runs in seconds; real enough that every code path
(tokenizer, KV cache, token healing, stop tokens) is the one SmolLM2 takes.
"""

from __future__ import annotations

from pathlib import Path

from ghostloop.corpus import stdlib_dir

TRAINING_FILES = ("textwrap.py", "json/decoder.py", "json/encoder.py", "shlex.py")


def build_tiny_model(path: Path, *, with_eos: bool = True, seed: int = 0) -> Path:
    """Write a tokenizer and a 2-layer, 64-wide Llama to ``path``; returns ``path``.

    ``with_eos=False`` gives a model that never emits an end token, so generation runs
    until something stops it (cancellation, deadline, token limit).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = "<|endoftext|>" if with_eos else "<pad>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [(stdlib_dir() / name).read_text(encoding="utf-8") for name in TRAINING_FILES]
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=special if with_eos else None,
        pad_token=special,
    )
    fast.save_pretrained(path)
    special_id = fast.convert_tokens_to_ids(special)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=special_id if with_eos else None,
        bos_token_id=None,
        pad_token_id=special_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
