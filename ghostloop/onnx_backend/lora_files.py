"""A LoRA adapter as an onnxruntime adapter file (``.onnx_adapter``, written by
``onnxruntime.AdapterFormat``): the factors a base export with LoRA slots takes as inputs,
a few MB where a merged export is a whole model.

onnxruntime activates such a file per run with ``RunOptions.add_active_adapter``, but not
for ``run_with_iobinding``, which every Ghostloop forward uses (the KV cache stays bound);
so the file's parameters are read as OrtValues (zero-copy views of the file's memory) and
bound as inputs like the cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghostloop.lora import LoraWeights
from ghostloop.onnx_backend.files import META_SUFFIX, OnnxExportError, sha256

ADAPTER_FILE = "adapter.onnx_adapter"


@dataclass(frozen=True, eq=False)
class OnnxAdapter:
    """An adapter file read and checked against the export it is for: one OrtValue per
    LoRA input of that export."""

    version: str
    checksum: str
    values: dict[str, Any]
    path: Path
    nbytes: int


def write_adapter(
    weights: LoraWeights,
    directory: Path,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    model_name: str,
) -> Path:
    """``directory/adapter.onnx_adapter`` (and its side file) from ``weights``: per LoRA
    input of the export (``shapes``, from ``export.slot_shapes``), ``a = A^T`` and
    ``b = scale B^T``, padded with zeros to the export's rank; a target the adapter does not
    train stays zero. Refused: a rank above the export's, a module it has no slot for."""
    import numpy as np
    import onnxruntime as ort

    arrays = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
    for module, (a, b, scale) in weights.layers.items():
        parts = module.split(".")
        try:
            layer = int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            raise OnnxExportError(
                f"adapter {weights.version}: {module} is not in a layer"
            ) from None
        key = f"lora.{layer}.{parts[-1]}"
        if f"{key}.a" not in arrays:
            raise OnnxExportError(
                f"adapter {weights.version} trains {module}, which the base export has no "
                "LoRA slot for: export the base with that target"
            )
        rank = int(a.shape[0])
        slot_rank = arrays[f"{key}.a"].shape[1]
        if rank > slot_rank:
            raise OnnxExportError(
                f"adapter {weights.version} has rank {rank}, the base export's slots {slot_rank}"
            )
        rows, cols = arrays[f"{key}.a"].shape[0], arrays[f"{key}.b"].shape[1]
        if tuple(a.shape) != (rank, rows) or tuple(b.shape) != (cols, rank):
            raise OnnxExportError(
                f"adapter {weights.version} has {module} factors of shapes {tuple(a.shape)} "
                f"and {tuple(b.shape)}, the base export's projection is {rows}->{cols}: it "
                "was trained for another base model"
            )
        arrays[f"{key}.a"][:, :rank] = a.detach().float().cpu().numpy().T
        arrays[f"{key}.b"][:rank, :] = (b.detach().float().cpu() * scale).numpy().T
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in arrays.items()})
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / ADAPTER_FILE
    partial = directory / f".{ADAPTER_FILE}.{os.getpid()}.partial"
    try:
        adapter.export_adapter(str(partial))
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    meta = {
        "sha256": sha256(final),
        "model": model_name,
        "adapter": weights.version,
        "adapter_checksum": weights.checksum,
    }
    final.with_name(ADAPTER_FILE + META_SUFFIX).write_text(json.dumps(meta, indent=2))
    return final


def read_adapter(
    path: Path,
    inputs: dict[str, tuple[tuple[int, ...], str]],
    *,
    model_name: str,
    version: str,
    checksum: str,
) -> OnnxAdapter:
    """The adapter file at ``path`` for an export of ``model_name`` whose LoRA inputs are
    ``inputs`` (name -> (shape, onnxruntime type)): any export of that model with those
    slots, fused or grouped, fp32 or int8. Refused, naming what does not match: a missing
    or truncated file, another SHA-256 than its side file's, another model, another adapter,
    a missing, extra or mis-shaped parameter (another rank or targets)."""
    import onnxruntime as ort

    meta_path = path.with_name(path.name + META_SUFFIX)
    if not path.is_file() or not meta_path.is_file():
        raise OnnxExportError(f"no adapter file at {path}: publish the adapter again")
    try:
        meta = json.loads(meta_path.read_text())
        expected = str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OnnxExportError(f"the side file {meta_path} is corrupt: {error!r}") from None
    if sha256(path) != expected:
        raise OnnxExportError(f"{path} does not match its recorded SHA-256: the file is corrupt")
    if meta.get("model") != model_name:
        raise OnnxExportError(
            f"{path} was made for {meta.get('model')!r}, not the served {model_name!r}"
        )
    if (meta.get("adapter"), meta.get("adapter_checksum")) != (version, checksum):
        raise OnnxExportError(
            f"{path} holds adapter {meta.get('adapter')!r}, not {version} as published"
        )
    try:
        values = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as error:  # onnxruntime raises its own types for unreadable files
        raise OnnxExportError(f"onnxruntime cannot read {path}: {error}") from None
    missing, extra = sorted(set(inputs) - set(values)), sorted(set(values) - set(inputs))
    if missing or extra:
        raise OnnxExportError(
            f"{path} does not fit the base export's LoRA inputs: missing {missing[:3]}, "
            f"extra {extra[:3]}"
        )
    nbytes = 0
    for name, (shape, kind) in inputs.items():
        value = values[name]
        if tuple(value.shape()) != tuple(shape) or value.data_type() != kind:
            raise OnnxExportError(
                f"{path}: {name} is {value.data_type()} {tuple(value.shape())}, the base "
                f"export takes {kind} {tuple(shape)} (another rank or model)"
            )
        nbytes += int(value.numpy().nbytes)
    return OnnxAdapter(version, checksum, dict(values), path, nbytes)
