"""Exporting the served base model to ONNX with its KV cache, and LoRA slots (``LoraSlots``:
each adapted projection's low-rank factors as graph inputs, so that one export serves the
base model and every adapter, bound at run time), as inputs and outputs.

``torch.onnx.export`` (TorchScript tracing, opset 17) of a wrapper returning the last
position's logits and the present keys and values, in one of two kinds (the side file's
``attention``):

- ``fused`` (Llama-type models served on a CPU): each layer's attention is onnxruntime's
  GroupQueryAttention, rotary embedding included, over a KV buffer that the graph's past
  and present share. The inputs are ``input_ids``, ``seqlens_k`` (tokens in the cache
  after this step, minus one), ``total_sequence_length`` and the buffers; a step writes
  its keys and values into the buffer in place instead of copying the whole cache to
  append one token, and cutting the cache back to a shared prefix costs nothing.
- ``grouped`` (other models, and CUDA, where onnxruntime has GroupQueryAttention in
  16-bit floats only): transformers' eager attention with ``input_ids``,
  ``attention_mask``, ``position_ids`` and the past keys and values as flat tensors.

It is exported without constant folding, which would store the output layer's transpose of
a tied embedding as a second copy of the largest weight; onnxruntime folds constants itself
when it loads the graph. A side file ``model.onnx.json`` records the file's SHA-256, the
cache geometry, the model it was exported from and its LoRA slots; a file that does not
match it is refused (``runtime.load``).
optimum-onnx is not used: it pins transformers < 4.58.
"""

from __future__ import annotations

import copy
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

from ghostloop.decoding import cache_keyword
from ghostloop.onnx_backend.files import (
    EXPORT_FORMAT,
    FUSED,
    GROUPED,
    META_SUFFIX,
    ONNX_FILE,
    OnnxExportError,
    remove_stale_partials,
    sha256,
)

log = logging.getLogger(__name__)

OPSET = 17
GROUPED_ATTENTION = "ghostloop_grouped"
FUSED_ATTENTION = "ghostloop_fused"


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


def unfusable(model: Any) -> str | None:
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


@dataclass(frozen=True)
class LoraSlots:
    """The run-time LoRA a base export takes: on each layer's ``targets`` (projection names
    such as ``q_proj``), ``x W + (x a) b`` with ``a`` (in, rank) and ``b`` (rank, out) as graph
    inputs, zero for no adapter. An adapter of a lower rank is padded with zeros; its scale
    is folded into ``b``. The weights W stay what they are, so an int8 copy quantizes W
    alone and the adapter keeps its fp32 precision."""

    targets: tuple[str, ...]
    rank: int

    def input_names(self, layers: int) -> list[str]:
        return [
            f"lora.{layer}.{target}.{factor}"
            for layer in range(layers)
            for target in self.targets
            for factor in ("a", "b")
        ]


class _LoraState:
    """The LoRA factors the adapted projections read while the export traces the model."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}


class _Adapted(nn.Module):
    """A Linear (or several packed side by side) plus, on each part with a slot, the
    low-rank product of the slot's graph inputs."""

    def __init__(
        self, base: nn.Linear, parts: Sequence[tuple[int, str | None]], state: _LoraState
    ) -> None:
        super().__init__()
        self.base = base
        self.parts = list(parts)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if all(key is None for _, key in self.parts):
            return y
        values = self.state.values
        pieces = y.split([width for width, _ in self.parts], dim=-1)
        added = [
            piece if key is None else piece + (x @ values[f"{key}.a"]) @ values[f"{key}.b"]
            for piece, (_, key) in zip(pieces, self.parts, strict=True)
        ]
        return added[0] if len(added) == 1 else torch.cat(added, dim=-1)


def _slot(layer: int, name: str, slots: LoraSlots | None) -> str | None:
    return f"lora.{layer}.{name}" if slots is not None and name in slots.targets else None


def _adapt(
    linears: Sequence[tuple[str, nn.Linear]], layer: int, slots: LoraSlots | None, state: _LoraState
) -> nn.Module:
    """``linears`` packed into one (several) or kept (one), with their LoRA slots."""
    base = _packed([linear for _, linear in linears]) if len(linears) > 1 else linears[0][1]
    parts = [(linear.out_features, _slot(layer, name, slots)) for name, linear in linears]
    if all(key is None for _, key in parts):
        return base
    return _Adapted(base, parts, state)


def _adapt_unpacked(model: Any, slots: LoraSlots, state: _LoraState) -> None:
    """Each target Linear of ``model`` (an export's own copy) with its LoRA slot."""
    for layer, block in enumerate(model.model.layers):
        for owner in (block.self_attn, block.mlp):
            for name in slots.targets:
                linear = getattr(owner, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(owner, name, _adapt([(name, linear)], layer, slots, state))


class _FusedState:
    """What the fused attention layers read while the export traces the model."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin
        self.past: Sequence[torch.Tensor] = ()
        self.seqlens_k = torch.zeros(1, dtype=torch.int32)
        self.total = torch.zeros((), dtype=torch.int32)
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _fuse_attention(
    model: Any, state: _FusedState, slots: LoraSlots | None = None, lora: _LoraState | None = None
) -> None:
    """Replace each attention layer's forward in ``model`` (an export's own copy) by the
    projections around one GroupQueryAttention node; with ``slots``, each target projection
    gets its LoRA slot (packed projections, each part its own)."""
    lora = lora or _LoraState()
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

    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        attention.qkv_proj = _adapt(
            [(name, getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj")],
            index,
            slots,
            lora,
        )
        attention.o_proj = _adapt([("o_proj", attention.o_proj)], index, slots, lora)
        attention.forward = types.MethodType(forward, attention)
        mlp_ = layer.mlp
        if all(hasattr(mlp_, name) for name in ("gate_proj", "up_proj", "down_proj")):
            mlp_.gate_up_proj = _adapt(
                [("gate_proj", mlp_.gate_proj), ("up_proj", mlp_.up_proj)], index, slots, lora
            )
            mlp_.down_proj = _adapt([("down_proj", mlp_.down_proj)], index, slots, lora)
            mlp_.forward = types.MethodType(mlp, mlp_)
        elif slots is not None and set(slots.targets) & {"gate_proj", "up_proj", "down_proj"}:
            raise OnnxExportError("LoRA slots on an MLP without gate, up and down projections")


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


class _Exported(nn.Module):
    """What both graphs' wrappers share: the model, its layer count, and the LoRA factors
    that follow the past keys and values among the graph's inputs."""

    def __init__(
        self, model: Any, layers: int, lora: _LoraState | None, lora_names: Sequence[str]
    ) -> None:
        super().__init__()
        self.model: Any = model
        self.layers = layers
        self.lora = lora or _LoraState()
        self.lora_names = list(lora_names)

    def _past(self, rest: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The past keys and values of ``rest``; the LoRA factors after them go to the
        adapted projections."""
        self.lora.values = dict(zip(self.lora_names, rest[2 * self.layers :], strict=True))
        return rest[: 2 * self.layers]


class _Fused(_Exported):
    """The causal LM as the fused graph sees it."""

    def __init__(
        self,
        model: Any,
        layers: int,
        state: _FusedState,
        lora: _LoraState | None = None,
        lora_names: Sequence[str] = (),
    ) -> None:
        super().__init__(model, layers, lora, lora_names)
        self.state = state

    def forward(
        self,
        input_ids: torch.Tensor,
        seqlens_k: torch.Tensor,
        total_sequence_length: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        state = self.state
        state.past, state.seqlens_k, state.total = (
            self._past(rest),
            seqlens_k,
            total_sequence_length,
        )
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


class _WithCache(_Exported):
    """The causal LM as the exported graph sees it: flat tensors in and out."""

    def __init__(
        self,
        model: Any,
        layers: int,
        lora: _LoraState | None = None,
        lora_names: Sequence[str] = (),
    ) -> None:
        super().__init__(model, layers, lora, lora_names)
        self.cache_keyword = cache_keyword(model.model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        past = self._past(rest)

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


def slot_shapes(model: Any, slots: LoraSlots) -> dict[str, tuple[int, int]]:
    """Each LoRA input of an export of ``model`` with ``slots`` and its shape."""
    shapes: dict[str, tuple[int, int]] = {}
    for layer, block in enumerate(model.model.layers):
        for target in slots.targets:
            linear = getattr(block.self_attn, target, None) or getattr(block.mlp, target, None)
            if not isinstance(linear, nn.Linear):
                raise OnnxExportError(f"layer {layer} has no Linear {target!r} to adapt")
            shapes[f"lora.{layer}.{target}.a"] = (linear.in_features, slots.rank)
            shapes[f"lora.{layer}.{target}.b"] = (slots.rank, linear.out_features)
    return shapes


def _slot_examples(model: Any, slots: LoraSlots) -> list[torch.Tensor]:
    """Small random factors to trace with (zeros would trace too; random ones make a
    mistake in the wiring show in the export's own check)."""
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(*shape, generator=generator) * 0.01
        for shape in slot_shapes(model, slots).values()
    ]


def export(
    model: Any,
    directory: Path,
    *,
    model_name: str,
    fused: bool = True,
    slots: LoraSlots | None = None,
) -> Path:
    """Write ``directory/model.onnx`` (and its side file) for ``model``; written under a
    temporary name and renamed, so a crash leaves no half file. ``fused``: the fused
    attention where the model allows it (the CPU's graph), else grouped. ``slots``: the
    LoRA an adapter file adds at run time (``lora_files``); none, the model as it is."""
    if slots is not None and (slots.rank < 1 or not slots.targets):
        raise OnnxExportError(f"LoRA slots need a rank and targets, got {slots}")
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(directory)
    source = copy.deepcopy(model).float().cpu().eval()  # the served model is never touched
    geometry = _geometry(source)
    layers, kv_heads, head_dim = geometry["layers"], geometry["kv_heads"], geometry["head_dim"]
    reason = unfusable(source) if fused else "not asked for"
    if fused and reason:
        log.info("exporting %s with grouped attention: %s", model_name, reason)
    kind = GROUPED if reason else FUSED
    attention = getattr(source.config, "_attn_implementation", None)
    _register_grouped_attention()
    past_names = [f"past.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    present_names = [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    lora = _LoraState()
    lora_names = slots.input_names(layers) if slots is not None else []
    lora_inputs = _slot_examples(source, slots) if slots is not None else []
    wrapper: nn.Module
    if kind == FUSED:
        state = _FusedState(*_rotary_tables(source, head_dim))
        _fuse_attention(source, state, slots, lora)
        source.config._attn_implementation = FUSED_ATTENTION  # no mask: the op is causal
        wrapper = _Fused(source, layers, state, lora, lora_names)
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
        if slots is not None:
            _adapt_unpacked(source, slots, lora)
        wrapper = _WithCache(source, layers, lora, lora_names)
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
    input_names += lora_names
    inputs = (*inputs, *lora_inputs)
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
        "sha256": sha256(partial),
        "model": model_name,
        "attention": kind,
        "lora": {"targets": list(slots.targets), "rank": slots.rank} if slots else None,
        **geometry,
    }
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, final)
    (directory / (ONNX_FILE + META_SUFFIX)).write_text(json.dumps(meta, indent=2))
    log.info(
        "exported %s%s to %s (%s attention) in %.1f s (%.0f MB)",
        model_name,
        f" with LoRA slots (rank {slots.rank} on {', '.join(slots.targets)})" if slots else "",
        final,
        kind,
        time.perf_counter() - started,
        final.stat().st_size / 1e6,
    )
    return final
