"""Serving LoRA adapters on a running model: read once, switched per request, never merged.

Training and the gate use peft; serving does not. peft adds an adapter by rebuilding
layers of the live model (``load_adapter`` took 230-600 ms on SmolLM2, r=16) and switches
with ``set_adapter`` (25 ms, it walks every layer), so a swap would stall requests and a
canary would pay on every switch. Like LoRA servers (vLLM, LoRAX) we keep the base model
untouched and add ``scale * B(A(x))`` with a forward hook on each target Linear; the
adapter in force is one reference the inference thread sets per request. Reading an
adapter touches nothing the model uses, so it runs beside inference; switching costs
nothing; an in-flight request keeps the weights it started with.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostloop.registry import AdapterError, verify

PEFT_PREFIX = "base_model.model."
# peft options that change what a LoRA computes and that this server does not implement.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias",
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable tokens",
    "alpha_pattern": "per-module alpha",
}


@dataclass(frozen=True, eq=False)  # compared by identity: one object per read
class LoraWeights:
    """One adapter ready to serve: per target module (name in the base model) A, B, scale."""

    version: str
    checksum: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int
    nbytes: int


def _check_config(config: dict[str, Any], directory: Path) -> float:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {directory} is a {config.get('peft_type')} adapter, not LoRA")
    for key, what in UNSUPPORTED.items():
        if config.get(key) not in (None, False, {}, [], "none"):
            raise AdapterError(
                f"adapter {directory} uses {what}, which the server cannot apply; "
                "train it with Ghostloop's trainer (plain LoRA)"
            )
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {directory} trains biases (bias={config['bias']!r})")
    try:
        alpha = float(config["lora_alpha"])
        rank = int(config["r"])
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"adapter {directory} config lacks a numeric r and lora_alpha") from None
    if rank <= 0:
        raise AdapterError(f"adapter {directory} has rank r={rank}")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_factors(
    directory: Path, expected_checksum: str | None
) -> tuple[float, dict[str, dict[str, torch.Tensor]]]:
    """The scale and the factors (module name -> {"A", "B"}) of the peft adapter at
    ``directory``: safetensors only, the checksum the registry recorded, plain LoRA."""
    from safetensors import SafetensorError, safe_open

    config = verify(directory, expected_checksum)
    scale = _check_config(config, directory)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                name, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
                if factor not in ("A.weight", "B.weight"):
                    raise AdapterError(
                        f"adapter {directory} holds {key!r}, which is not a LoRA factor"
                    )
                factors.setdefault(name, {})[factor[0]] = handle.get_tensor(key)
    except SafetensorError as error:
        raise AdapterError(f"adapter {directory} has a corrupt safetensors file: {error}") from None
    if not factors:
        raise AdapterError(f"adapter {directory} holds no LoRA weights")
    for name, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {directory} lacks a factor of {name!r}")
        if not (torch.isfinite(pair["A"]).all() and torch.isfinite(pair["B"]).all()):
            raise AdapterError(f"adapter {directory} has non-finite weights in {name}")
    return scale, factors


def read_adapter(
    directory: Path, model: nn.Module, *, version: str, expected_checksum: str | None = None
) -> LoraWeights:
    """The adapter at ``directory`` checked against ``model``: safetensors only, the
    checksum the registry recorded, every tensor a LoRA factor of a Linear the model has,
    with that Linear's shape. Raises AdapterError saying what does not fit."""
    scale, factors = _read_factors(directory, expected_checksum)
    modules = dict(model.named_modules())
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    ranks = set()
    nbytes = 0
    for name, pair in sorted(factors.items()):
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise AdapterError(
                f"adapter {directory} targets {name!r}, which this model has no Linear for: "
                "it was trained for another base model"
            )
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if a.shape != (rank, module.in_features) or b.shape != (module.out_features, rank):
            raise AdapterError(
                f"adapter {directory} has {name} factors of shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)}, the model's Linear is {module.in_features}->"
                f"{module.out_features}: it was trained for another base model"
            )
        ranks.add(rank)
        a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        layers[name] = (a, b, scale)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    checksum = expected_checksum or ""
    return LoraWeights(version, checksum, layers, max(ranks), nbytes)


def read_factors(directory: Path, *, version: str, expected_checksum: str) -> LoraWeights:
    """The adapter at ``directory`` as it is stored (CPU, fp32), checked as the registry
    checks it but not against a model: for writing it in another form, whose own checks
    are against what that form is for (``onnx_backend.lora_files``)."""
    scale, factors = _read_factors(directory, expected_checksum)
    layers = {name: (pair["A"].float(), pair["B"].float(), scale) for name, pair in factors.items()}
    nbytes = sum(a.numel() * 4 + b.numel() * 4 for a, b, _ in layers.values())
    rank = max(int(a.shape[0]) for a, _, _ in layers.values())
    return LoraWeights(version, expected_checksum, layers, rank, nbytes)


class LoraServing:
    """Forward hooks that add the adapter in force to the base model's target Linears.

    One thread runs the model (the engine's inference worker); it puts an adapter in
    force for one request with ``applied`` and nothing else changes the model.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._hooked: set[str] = set()
        self._current: LoraWeights | None = None

    def _hook(self, name: str, module: nn.Module) -> None:
        def add_delta(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            weights = self._current
            if weights is None:
                return None
            layer = weights.layers.get(name)
            if layer is None:
                return None
            a, b, scale = layer
            return output + nn.functional.linear(nn.functional.linear(inputs[0], a), b) * scale

        module.register_forward_hook(add_delta)
        self._hooked.add(name)

    @contextmanager
    def applied(self, weights: LoraWeights | None) -> Iterator[None]:
        """``weights`` (None: the base model) in force for the calls made inside."""
        if weights is not None:
            missing = set(weights.layers) - self._hooked
            if missing:
                modules = dict(self._model.named_modules())
                for name in sorted(missing):
                    self._hook(name, modules[name])
        previous, self._current = self._current, weights
        try:
            yield
        finally:
            self._current = previous


def serving(model: nn.Module) -> LoraServing:
    """The model's LoraServing, made on first use."""
    found = getattr(model, "_ghostloop_lora", None)
    if found is None:
        found = LoraServing(model)
        model._ghostloop_lora = found  # type: ignore[assignment]  # plain attribute
    return found
