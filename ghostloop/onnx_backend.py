"""The onnxruntime backend: the served model (base, or base with an adapter merged in)
exported to ONNX with its KV cache as inputs and outputs, and the forward step that runs
it. Prompts, decoding, stop rules and post-processing are the torch backend's
(ghostloop.decoding.generate); only ``Forward`` differs.

Export: ``torch.onnx.export`` (TorchScript tracing, opset 17) of a wrapper returning the
last position's logits and the present keys and values, in one of two kinds (the side
file's ``attention``):

- ``fused`` (Llama-type models served on a CPU): each layer's attention is onnxruntime's
  GroupQueryAttention, rotary embedding included, over a KV buffer that the graph's past
  and present share. The inputs are ``input_ids``, ``seqlens_k`` (tokens in the cache
  after this step, minus one), ``total_sequence_length`` and the buffers; a step writes
  its keys and values into the buffer in place instead of copying the whole cache to
  append one token, and cutting the cache back to a shared prefix costs nothing.
- ``grouped`` (other models, and CUDA, where onnxruntime has GroupQueryAttention in
  16-bit floats only): transformers' eager attention with ``input_ids``,
  ``attention_mask``, ``position_ids`` and the past keys and values as flat tensors.

It is
exported without constant folding, which would store the output layer's transpose of a
tied embedding as a second copy of the largest weight; onnxruntime folds constants itself
when it loads the graph. A side file ``model.onnx.json`` records the file's SHA-256, the
cache geometry and what was exported (model, adapter version and registry checksum); a
file that does not match it is refused.
optimum-onnx is not used: it pins transformers < 4.58.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostloop.adapters import AdapterError
from ghostloop.decoding import CachedPrefix, cache_keyword, reusable
from ghostloop.lora import LoraWeights

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INT8_BLOCK = 128  # weights per int8 scale (see quantized)
INT8_SCHEME = f"matmul-nbits-8bit-block{INT8_BLOCK}"  # what the int8 copy is; another is made again
META_SUFFIX = ".json"
OPSET = 17
EXPORT_FORMAT = 3  # bump when the graph changes (2: grouped attention, 3: fused attention)
GROUPED_ATTENTION = "ghostloop_grouped"
FUSED_ATTENTION = "ghostloop_fused"
FUSED, GROUPED = "fused", "grouped"  # the two kinds of exported attention
BUFFER_STEP = 128  # positions a fused KV buffer grows by (rounded up)


class OnnxExportError(AdapterError):
    """An export is missing, corrupt or made for another model; the message says which."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _geometry(model: Any) -> dict[str, int]:
    config = model.config
    heads = int(config.num_attention_heads)
    return {
        "layers": int(config.num_hidden_layers),
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "vocab": int(config.vocab_size),
    }


def _grouped_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' eager attention as exported, with the query heads that share a
    key/value head stacked along the sequence instead of the keys and values repeated per
    query head. Eager's repeat_kv traces to an Expand that copies the whole KV cache at every
    layer and every step (SmolLM2: 9 query heads over 3 key/value heads): that copy was the
    largest single cost of an int8 decoding step after the weights (about a fifth of the
    operator time at 256 cached tokens, growing with the context). Same sums, another order."""
    batch, heads, length, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    stacked = query.reshape(batch, kv_heads, groups * length, dim)
    scores = torch.matmul(stacked, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # (batch, 1, length, total): the same for every head
        scores = scores.reshape(batch, kv_heads, groups, length, total)
        scores = scores + attention_mask.unsqueeze(2)
        scores = scores.reshape(batch, kv_heads, groups * length, total)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).reshape(batch, heads, length, dim)
    return output.transpose(1, 2).contiguous(), None


class _GroupQueryAttention(torch.autograd.Function):
    """onnxruntime's GroupQueryAttention (com.microsoft) as one node of the exported graph.
    Tracing needs only the shapes of its outputs; onnxruntime computes it."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        packed: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        seqlens_k: torch.Tensor,
        total: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: int,
        kv_heads: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads_width = heads * past_key.shape[-1]  # the queries' part of the packed input
        return packed[..., :heads_width].clone(), past_key.clone(), past_value.clone()

    @staticmethod
    def symbolic(
        g: Any,
        packed: Any,
        past_key: Any,
        past_value: Any,
        seqlens_k: Any,
        total: Any,
        cos: Any,
        sin: Any,
        heads: int,
        kv_heads: int,
        scale: float,
    ) -> Any:
        missing = g.op("prim::Constant")  # an optional input left out: keys and values are packed
        missing.setType(torch._C.OptionalType.ofTensor())
        outputs = g.op(
            "com.microsoft::GroupQueryAttention",
            packed,
            missing,
            missing,
            past_key,
            past_value,
            seqlens_k,
            total,
            cos,
            sin,
            num_heads_i=heads,
            kv_num_heads_i=kv_heads,
            scale_f=scale,
            do_rotary_i=1,
            rotary_interleaved_i=0,  # Llama rotates halves (rotate_half), not pairs
            outputs=3,
        )
        attended = packed.type()  # the packed width: the attended output is the queries' width
        sizes = attended.varyingSizes()
        if sizes:
            key_sizes = past_key.type().varyingSizes()  # None where the trace has no shape
            head_dim = key_sizes[-1] if key_sizes else None
            sizes[-1] = heads * head_dim if head_dim is not None else None
            attended = attended.with_sizes(sizes)
        outputs[0].setType(attended)
        outputs[1].setType(past_key.type())
        outputs[2].setType(past_value.type())
        return outputs


def _unfusable(model: Any) -> str | None:
    """Why ``model``'s attention cannot be exported fused (None: it can). Only the
    attention this replacement reproduces exactly: Llama's (causal over the whole context),
    full rotary by inverse frequencies, no norms on queries or keys."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} is not llama"
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return "its rotary embedding scales attention"
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "its rotary embedding is partial"
    for layer in model.model.layers:
        attention = layer.self_attn
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "an attention layer lacks the four projections"
        if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
            return "its attention normalises queries or keys"
    return None


class _FusedState:
    """What the fused attention layers read while the export traces the model."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin
        self.past: Sequence[torch.Tensor] = ()
        self.seqlens_k = torch.zeros(1, dtype=torch.int32)
        self.total = torch.zeros((), dtype=torch.int32)
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _fuse_attention(model: Any, state: _FusedState) -> None:
    """Replace each attention layer's forward in ``model`` (an export's own copy) by the
    projections around one GroupQueryAttention node."""
    import types

    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)

    def forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        layer = int(self.layer_idx)
        output, key, value = _GroupQueryAttention.apply(
            self.qkv_proj(hidden_states),  # queries, keys and values packed: the op splits them
            state.past[2 * layer],
            state.past[2 * layer + 1],
            state.seqlens_k,
            state.total,
            state.cos,
            state.sin,
            heads,
            kv_heads,
            float(self.scaling),
        )
        state.present[layer] = (key, value)
        return self.o_proj(output), None

    def mlp(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)

    for layer in model.model.layers:
        attention = layer.self_attn
        attention.qkv_proj = _packed([attention.q_proj, attention.k_proj, attention.v_proj])
        attention.forward = types.MethodType(forward, attention)
        if all(hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            layer.mlp.gate_up_proj = _packed([layer.mlp.gate_proj, layer.mlp.up_proj])
            layer.mlp.forward = types.MethodType(mlp, layer.mlp)


def _packed(linears: Sequence[nn.Linear]) -> nn.Linear:
    """One Linear computing ``linears`` side by side (their outputs concatenated): one
    matrix product per step instead of several small ones."""
    biases = [linear.bias for linear in linears]
    packed = nn.Linear(
        linears[0].in_features,
        sum(linear.out_features for linear in linears),
        bias=biases[0] is not None,
    )
    with torch.no_grad():
        packed.weight.copy_(torch.cat([linear.weight for linear in linears]))
        if packed.bias is not None:
            packed.bias.copy_(torch.cat([bias for bias in biases if bias is not None]))
    return packed


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The fused export's mask: none; GroupQueryAttention is causal by itself."""
    return None


class _Fused(nn.Module):
    """The causal LM as the fused graph sees it."""

    def __init__(self, model: Any, layers: int, state: _FusedState) -> None:
        super().__init__()
        self.model: Any = model
        self.layers = layers
        self.state = state

    def forward(
        self,
        input_ids: torch.Tensor,
        seqlens_k: torch.Tensor,
        total_sequence_length: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        state = self.state
        state.past, state.seqlens_k, state.total = past, seqlens_k, total_sequence_length
        state.present = {}
        out = self.model.model(input_ids=input_ids, use_cache=False)
        hidden = out.last_hidden_state[:, -1, :]
        logits = nn.functional.linear(hidden, self.model.lm_head.weight)
        flat: list[torch.Tensor] = []
        for layer in range(self.layers):
            flat += list(state.present[layer])
        return (logits, *flat)


def _rotary_tables(model: Any, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position times the model's inverse frequencies:
    (max positions, head_dim / 2), as GroupQueryAttention takes them."""
    inv_freq = model.model.rotary_emb.inv_freq.float().cpu()
    if inv_freq.numel() * 2 != head_dim:
        raise OnnxExportError(f"rotary frequencies ({inv_freq.numel()}) do not span the heads")
    positions = torch.arange(int(model.config.max_position_embeddings), dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def _register_grouped_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, _grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, eager_mask)
    AttentionInterface.register(FUSED_ATTENTION, _grouped_attention)  # replaced, never called
    ALL_MASK_ATTENTION_FUNCTIONS.register(FUSED_ATTENTION, _no_mask)


class _WithCache(nn.Module):
    """The causal LM as the exported graph sees it: flat tensors in and out."""

    def __init__(self, model: Any, layers: int) -> None:
        super().__init__()
        self.model: Any = model
        self.layers = layers
        self.cache_keyword = cache_keyword(model.model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_keyword: cache},  # extended in place
        )
        hidden = out.last_hidden_state[:, -1, :]  # (batch, hidden): 2-D, so Gemm(transB)
        logits = nn.functional.linear(hidden, self.model.lm_head.weight)
        flat: list[torch.Tensor] = []
        for layer in range(self.layers):
            keys, values = _layer_kv(cache, layer)
            flat += [keys, values]
        return (logits, *flat)


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56: per-layer objects
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def merged(model: Any, adapter: LoraWeights | None) -> Any:
    """A CPU fp32 copy of ``model`` with ``adapter`` added into its weights (W + s B A);
    the served model is never touched."""
    copied = copy.deepcopy(model).float().cpu()
    if adapter is None:
        return copied
    modules = dict(copied.named_modules())
    with torch.no_grad():
        for name, (a, b, scale) in adapter.layers.items():
            linear = modules[name]
            linear.weight += (b.float().cpu() @ a.float().cpu()) * scale
    return copied


def export(
    model: Any,
    directory: Path,
    *,
    model_name: str,
    adapter: LoraWeights | None = None,
    identity: tuple[str, str] | None = None,
    fused: bool = True,
) -> Path:
    """Write ``directory/model.onnx`` (and its side file) for ``model`` with ``adapter``
    merged; written under a temporary name and renamed, so a crash leaves no half file.
    ``identity`` (version, registry checksum) names the adapter already merged into
    ``model`` (the trainer's, folded by peft); by default it is ``adapter``'s. ``fused``:
    the fused attention where the model allows it (the CPU's graph), else grouped."""
    if identity is None and adapter is not None:
        identity = (adapter.version, adapter.checksum)
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    source = merged(model, adapter).eval()
    geometry = _geometry(source)
    layers, kv_heads, head_dim = geometry["layers"], geometry["kv_heads"], geometry["head_dim"]
    reason = _unfusable(source) if fused else "not asked for"
    if fused and reason:
        log.info("exporting %s with grouped attention: %s", model_name, reason)
    kind = GROUPED if reason else FUSED
    attention = getattr(source.config, "_attn_implementation", None)
    _register_grouped_attention()
    past_names = [f"past.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    present_names = [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    wrapper: nn.Module
    if kind == FUSED:
        state = _FusedState(*_rotary_tables(source, head_dim))
        _fuse_attention(source, state)
        source.config._attn_implementation = FUSED_ATTENTION  # no mask: the op is causal
        wrapper = _Fused(source, layers, state)
        input_names = ["input_ids", "seqlens_k", "total_sequence_length", *past_names]
        inputs: tuple[torch.Tensor, ...] = (
            torch.tensor([[1, 2, 3]], dtype=torch.long),
            torch.tensor([4], dtype=torch.int32),
            torch.tensor(5, dtype=torch.int32),
            *[torch.zeros(1, kv_heads, 8, head_dim) for _ in past_names],
        )
        axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"}}
        axes.update({name: {0: "batch", 2: "capacity"} for name in past_names + present_names})
    else:
        # eager's arithmetic (traceable; sdpa's mask checks are not) without repeating the
        # cache
        source.config._attn_implementation = GROUPED_ATTENTION
        wrapper = _WithCache(source, layers)
        input_names = ["input_ids", "attention_mask", "position_ids", *past_names]
        inputs = (
            torch.tensor([[1, 2, 3]], dtype=torch.long),
            torch.ones(1, 5, dtype=torch.long),
            torch.tensor([[2, 3, 4]], dtype=torch.long),
            *[torch.zeros(1, kv_heads, 2, head_dim) for _ in past_names],
        )
        axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"},
        }
        axes.update({name: {0: "batch", 2: "past"} for name in past_names})
        axes.update({name: {0: "batch", 2: "total"} for name in present_names})
    axes["logits"] = {0: "batch"}
    partial = directory / f".{ONNX_FILE}.{os.getpid()}.partial"
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                inputs,
                str(partial),
                input_names=input_names,
                output_names=["logits", *present_names],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
                # folding would store the output layer's transpose of a tied embedding as a
                # second copy; onnxruntime folds constants itself when it loads the graph
                do_constant_folding=False,
                custom_opsets={"com.microsoft": 1},
            )
    finally:
        source.config._attn_implementation = attention
    final = directory / ONNX_FILE
    meta = {
        "format": EXPORT_FORMAT,
        "sha256": _sha256(partial),
        "model": model_name,
        "adapter": identity[0] if identity else None,
        "adapter_checksum": identity[1] if identity else None,
        "attention": kind,
        **geometry,
    }
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, final)
    (directory / (ONNX_FILE + META_SUFFIX)).write_text(json.dumps(meta, indent=2))
    log.info(
        "exported %s%s to %s (%s attention) in %.1f s (%.0f MB)",
        model_name,
        f" + {identity[0]}" if identity else "",
        final,
        kind,
        time.perf_counter() - started,
        final.stat().st_size / 1e6,
    )
    return final


def quantized(path: Path) -> Path:
    """An int8 copy of ``path`` beside it, made once. Every MatMul of a stored weight, the
    output layer included, becomes onnxruntime's MatMulNBits: weights in int8 in blocks of
    INT8_BLOCK along the input dimension, each block with its own scale, multiplied in int8
    with the activations quantized per block as they come (accuracy level 4). The export
    keeps each weight as Transpose(stored weight), which the quantizer cannot see through:
    those are folded into stored transposed weights first.

    Why blocks, not onnxruntime's dynamic quantization (one scale per tensor, the first
    int8 copy): over 80 real positions of SmolLM2 that kept 261 characters and 11 exact
    lines to fp32's 367 and 14, the output layer alone costing a third of it; in blocks of
    128 this copy keeps 406 and 14, and decodes faster (one run on this 2-core CPU after a
    256-token prompt: 15.4 ms per token against 22.7 per tensor and 36.2 fp32; the prefill
    270 ms against 161 and 467). Four-bit weights decoded no faster here (15-17 ms per
    token) and kept less (206-296 characters)."""
    target = path.with_name(INT8_FILE)
    meta = target.with_name(INT8_FILE + META_SUFFIX)  # remade when the export or scheme change
    try:
        source_meta = json.loads(path.with_name(path.name + META_SUFFIX).read_text())
    except (OSError, ValueError) as error:
        raise OnnxExportError(
            f"no readable side file for {path} ({error}): export it again"
        ) from None
    made_from = {"int8": INT8_SCHEME, "source_sha256": source_meta.get("sha256")}
    if target.is_file() and meta.is_file():
        try:
            known = json.loads(meta.read_text())
            if {key: known.get(key) for key in made_from} == made_from:
                return target
        except ValueError:
            pass  # a corrupt side file: make the copy again
    import onnx

    partial = target.with_name(f".{INT8_FILE}.{os.getpid()}.partial")
    graph_model = onnx.load(str(path))
    _fold_weight_transposes(graph_model.graph)
    quantizer = _quantizer_class()(
        graph_model, bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    try:
        onnx.save(quantizer.model.model, str(partial))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    meta.write_text(json.dumps({**source_meta, "sha256": _sha256(target), **made_from}))
    return target


def _quantizer_class() -> Any:
    """onnxruntime's MatMulNBitsQuantizer. Importing its module calls
    ``logging.basicConfig(level=INFO)``, which would turn on INFO logging for the whole
    process when nothing has configured logging yet: that is undone, and the module's own
    line per graph node is kept below WARNING."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer.MatMulNBitsQuantizer


def _fold_weight_transposes(graph: Any) -> None:
    """Replace Transpose(stored weight) by the stored transposed weight."""
    from collections import Counter

    import numpy as np
    from onnx import numpy_helper

    stored = {init.name: init for init in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in stored:
            continue
        array = numpy_helper.to_array(stored[node.input[0]])
        if array.ndim != 2:
            continue
        graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(array.T), node.output[0])
        )
        graph.node.remove(node)
        uses[node.input[0]] -= 1
    for name, init in stored.items():
        if uses[name] == 0:
            graph.initializer.remove(init)


@dataclass(frozen=True, eq=False)
class OnnxModel:
    """One exported model ready to run: what ServingState holds for this backend."""

    version: str | None  # the adapter merged in; None: the base model
    checksum: str  # the adapter's registry checksum ('' for the base model)
    session: Any
    layers: int
    kv_heads: int
    head_dim: int
    device: str  # "cpu" | "cuda"
    path: Path
    attention: str = GROUPED  # FUSED | GROUPED: which graph (see the module's docstring)


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load(
    path: Path,
    *,
    model_name: str,
    version: str | None = None,
    checksum: str = "",
    device: str = "cpu",
    threads: int = 0,
) -> OnnxModel:
    """A session over the export at ``path``, checked against its side file: the bytes
    (SHA-256), the model it was made for, and that onnxruntime can read it."""
    import onnxruntime as ort

    meta_path = path.with_name(path.name + META_SUFFIX)
    if not path.is_file() or not meta_path.is_file():
        raise OnnxExportError(
            f"no ONNX export at {path}: publish adapters with GHOSTLOOP_BACKEND=onnxruntime "
            "set for the nightly job too, so it exports them"
        )
    try:
        meta = json.loads(meta_path.read_text())
        older = meta["format"] != EXPORT_FORMAT  # before the rest: older files lack fields
        if not older:
            expected = str(meta["sha256"])
            geometry = (int(meta["layers"]), int(meta["kv_heads"]), int(meta["head_dim"]))
            attention = str(meta["attention"])
            if attention not in (FUSED, GROUPED):
                raise ValueError(f"attention {attention!r} is neither {FUSED} nor {GROUPED}")
    except (ValueError, KeyError, TypeError) as error:
        raise OnnxExportError(f"the side file {meta_path} is corrupt: {error!r}") from None
    if older:
        raise OnnxExportError(f"{path} was exported in an older format: export it again")
    if meta.get("model") != model_name:
        raise OnnxExportError(
            f"{path} was exported from {meta.get('model')!r}, not the served {model_name!r}"
        )
    if _sha256(path) != expected:
        raise OnnxExportError(f"{path} does not match its recorded SHA-256: the file is corrupt")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=providers_for(device))
    except Exception as error:  # onnxruntime raises its own types for unreadable graphs
        raise OnnxExportError(f"onnxruntime cannot load {path}: {error}") from None
    on_gpu = session.get_providers()[0] == "CUDAExecutionProvider"
    if on_gpu and attention == FUSED:
        log.warning(
            "%s was exported for a CPU (fused attention, which onnxruntime runs on the CPU "
            "in 32-bit floats): export it on the serving machine for the GPU's graph",
            path,
        )
    return OnnxModel(
        version, checksum, session, *geometry, "cuda" if on_gpu else "cpu", path, attention
    )


def base_export(loaded: Any, settings: Any) -> OnnxModel:
    """The served base model as ONNX: exported once into the model cache, then loaded."""
    directory = settings.model_cache_dir / "onnx" / _safe(loaded.name)
    path = directory / ONNX_FILE
    fused = fused_for(loaded)
    try:
        model = _session(path, loaded.name, None, "", settings)
        if (model.attention == FUSED) == fused or _unfusable(loaded.model):
            return model
        log.info("%s was exported for another device; exporting again", path)
    except OnnxExportError as error:
        if path.exists():
            log.warning("%s; exporting again", error)
    export(loaded.model, directory, model_name=loaded.name, fused=fused)
    return _session(path, loaded.name, None, "", settings)


def fused_for(loaded: Any) -> bool:
    """Whether exports for ``loaded`` (a LoadedModel) get the fused attention: on a CPU.
    onnxruntime's GroupQueryAttention runs on CUDA in 16-bit floats only."""
    return str(getattr(loaded, "device", "cpu")) == "cpu"


def adapter_export(
    directory: Path, loaded: Any, settings: Any, *, version: str, checksum: str
) -> OnnxModel:
    """The export published beside the adapter at ``directory``, checked to be the one
    made from that adapter (its registry checksum) for the served model."""
    path = directory / "onnx" / ONNX_FILE
    model = _session(path, loaded.name, version, checksum, settings)
    meta = json.loads(path.with_name(ONNX_FILE + META_SUFFIX).read_text())
    if (meta.get("adapter"), meta.get("adapter_checksum")) != (version, checksum):
        raise OnnxExportError(
            f"{path} was exported from adapter {meta.get('adapter')!r}, not from {version} "
            "as published: publish it again"
        )
    return model


def _session(
    path: Path, model_name: str, version: str | None, checksum: str, settings: Any
) -> OnnxModel:
    if settings.onnx_int8 and path.is_file():
        path = quantized(path)
    device = "cpu" if settings.device == "cpu" else "cuda"
    return load(
        path,
        model_name=model_name,
        version=version,
        checksum=checksum,
        device=device,
        threads=settings.torch_threads,
    )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass(eq=False)
class _KvBuffer:
    """A fused graph's KV cache: per layer a key and a value buffer of ``capacity``
    positions, which the graph reads and writes in place (past and present bound to the
    same memory). numpy arrays on the CPU; onnxruntime's values wrap the same memory."""

    arrays: list[Any]
    values: list[Any]
    capacity: int

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self.arrays)


class OnnxForward:
    """``Forward`` on an exported model. Fused graphs (see the module's docstring) keep the
    KV cache in buffers updated in place; grouped graphs keep it in onnxruntime's output
    values (IO binding), so on a GPU it never leaves the device."""

    def __init__(self, model: OnnxModel, reuse: CachedPrefix | None = None) -> None:
        import onnxruntime as ort

        self._model = model
        self._ort = ort
        self._past: list[Any] = []
        self._buffer: _KvBuffer | None = None
        self._binding: Any = None  # a fused graph's IO binding, kept with the buffer bound
        self._bound: _KvBuffer | None = None
        self._logits: Any = None
        self._length = 0
        self._reuse = reuse
        self._fed: list[int] = []
        self.reused = 0
        self._names = [f"past.{i}.{kind}" for i in range(model.layers) for kind in ("key", "value")]
        self._outputs = [o.name for o in model.session.get_outputs()]

    def _run(self, ids: Sequence[int]) -> torch.Tensor:
        if self._model.attention == FUSED:
            return self._run_fused(ids)
        import numpy as np

        model, count = self._model, len(ids)
        total = self._length + count
        binding = model.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([list(ids)], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        positions = np.arange(self._length, total, dtype=np.int64)[None, :]
        binding.bind_cpu_input("position_ids", positions)
        if not self._past:
            empty = np.zeros((1, model.kv_heads, 0, model.head_dim), dtype=np.float32)
            self._past = [
                self._ort.OrtValue.ortvalue_from_numpy(empty, model.device, 0) for _ in self._names
            ]
        for name, value in zip(self._names, self._past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._outputs[1:]:
            binding.bind_output(name, model.device)
        model.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._past = list(outputs[1:])
        self._length = total
        self._fed.extend(ids)
        return torch.from_numpy(outputs[0].numpy()[0].copy())

    def _buffer_for(self, total: int) -> _KvBuffer:
        """The KV buffer, grown (the cached positions copied over) to hold ``total``."""
        import numpy as np

        buffer = self._buffer
        if buffer is not None and total <= buffer.capacity:
            return buffer
        model = self._model
        capacity = -(-(total + BUFFER_STEP // 2) // BUFFER_STEP) * BUFFER_STEP
        shape = (1, model.kv_heads, capacity, model.head_dim)
        arrays = [np.zeros(shape, dtype=np.float32) for _ in self._names]
        if buffer is not None and self._length:
            for old, new in zip(buffer.arrays, arrays, strict=True):
                new[:, :, : self._length] = old[:, :, : self._length]
        values = [self._ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
        self._buffer = _KvBuffer(arrays, values, capacity)
        return self._buffer

    def _run_fused(self, ids: Sequence[int]) -> torch.Tensor:
        import numpy as np

        session, total = self._model.session, self._length + len(ids)
        buffer = self._buffer_for(total)
        binding = self._binding
        if binding is None or self._bound is not buffer:  # bound once per buffer, not per step
            binding = self._binding = session.io_binding()
            # the logits land in an array of ours: no output values to fetch per step
            vocab = int(session.get_outputs()[0].shape[1])
            self._logits = np.zeros((1, vocab), dtype=np.float32)
            binding.bind_ortvalue_output(
                "logits", self._ort.OrtValue.ortvalue_from_numpy(self._logits)
            )
            for name, output, value in zip(
                self._names, self._outputs[1:], buffer.values, strict=True
            ):
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(output, value)  # the same memory: in place
            self._bound = buffer
        binding.bind_cpu_input("input_ids", np.array([list(ids)], dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        session.run_with_iobinding(binding)
        logits = self._logits[0].copy()
        self._length = total
        self._fed.extend(ids)
        return torch.from_numpy(logits)

    def _crop(self, value: Any, length: int) -> Any:
        """The first ``length`` positions of a (1, heads, positions, dim) past tensor."""
        if value.shape()[2] == length:
            return value
        import numpy as np

        kept = np.ascontiguousarray(value.numpy()[:, :, :length, :])
        return self._ort.OrtValue.ortvalue_from_numpy(kept, self._model.device, 0)

    def prefill(self, input_ids: Sequence[int]) -> torch.Tensor:
        reuse, self._reuse = self._reuse, None
        common = reusable(reuse, input_ids)
        self._past, self._buffer, self._length, self._fed, self.reused = [], None, 0, [], 0
        if reuse is not None and common > 0:
            if isinstance(reuse.cache, _KvBuffer):  # positions past ``common`` get overwritten
                self._buffer = reuse.cache
            else:
                self._past = [self._crop(value, common) for value in reuse.cache]
            self._length, self._fed, self.reused = common, list(input_ids[:common]), common
            return self._run(input_ids[common:])
        return self._run(input_ids)

    def keep(self) -> CachedPrefix | None:
        """The KV cache as it stands, to reuse for the next prompt."""
        if not self._fed:
            return None
        if self._buffer is not None:
            return CachedPrefix(self._fed, self._buffer, self._buffer.nbytes)
        if not self._past:
            return None
        nbytes = 0
        for value in self._past:
            count = 1
            for size in value.shape():
                count *= size
            nbytes += count * (2 if "float16" in value.data_type() else 4)
        return CachedPrefix(self._fed, self._past, nbytes)

    def step(self, token_id: int) -> torch.Tensor:
        return self._run([token_id])
