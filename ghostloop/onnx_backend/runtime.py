"""Running an export: loading it checked against its side file, finding the served one (the
base model's in the model cache, an adapter's beside it in the registry), and ``Forward``
on it, with the KV cache kept between steps and a shared prefix reused between requests.
Prompts, decoding, stop rules and post-processing are the torch backend's
(``ghostloop.decoding.generate``); only ``Forward`` differs."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ghostloop.decoding import CachedPrefix, reusable
from ghostloop.onnx_backend.export import LoraSlots, export, unfusable
from ghostloop.onnx_backend.files import (
    EXPORT_FORMAT,
    FUSED,
    GROUPED,
    META_SUFFIX,
    ONNX_FILE,
    OnnxExportError,
    sha256,
)
from ghostloop.onnx_backend.lora_files import ADAPTER_FILE, OnnxAdapter, read_adapter
from ghostloop.onnx_backend.quantize import quantized

log = logging.getLogger(__name__)

BUFFER_STEP = 128  # positions a fused KV buffer grows by (rounded up)


@dataclass(frozen=True, eq=False)
class OnnxModel:
    """One exported base model ready to run, with the adapters it takes (``lora``)."""

    session: Any
    layers: int
    kv_heads: int
    head_dim: int
    device: str  # "cpu" | "cuda"
    path: Path
    attention: str = GROUPED  # FUSED | GROUPED: which graph (see export's docstring)
    lora: LoraSlots | None = None  # the run-time LoRA the graph takes (export.LoraSlots)
    model_name: str = ""  # the model it was exported from

    @functools.cached_property
    def lora_inputs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Each LoRA input of the graph: (shape, onnxruntime type)."""
        return {
            i.name: (tuple(i.shape), i.type)
            for i in self.session.get_inputs()
            if i.name.startswith("lora.")
        }

    @functools.cached_property
    def no_adapter(self) -> dict[str, Any]:
        """Zero factors for every LoRA input: the base model."""
        import numpy as np
        import onnxruntime as ort

        return {
            name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=np.float32))
            for name, (shape, _) in self.lora_inputs.items()
        }

    def adapter(self, path: Path, *, version: str, checksum: str) -> OnnxAdapter:
        """The adapter file at ``path`` read and checked against this export."""
        if self.lora is None:
            raise OnnxExportError(f"{self.path} has no LoRA slots: export the base with them")
        return read_adapter(
            path,
            self.lora_inputs,
            model_name=self.model_name,
            version=version,
            checksum=checksum,
        )


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
    device: str = "cpu",
    threads: int = 0,
) -> OnnxModel:
    """A session over the export at ``path``, checked against its side file: the bytes
    (SHA-256), the model it was made for, and that onnxruntime can read it."""
    import onnxruntime as ort

    meta_path = path.with_name(path.name + META_SUFFIX)
    if not path.is_file() or not meta_path.is_file():
        raise OnnxExportError(
            f"no ONNX export at {path}: a server or nightly job on the onnxruntime backend "
            "makes it when it starts"
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
            found = meta.get("lora")
            slots = (
                LoraSlots(tuple(str(t) for t in found["targets"]), int(found["rank"]))
                if found
                else None
            )
    except (ValueError, KeyError, TypeError) as error:
        raise OnnxExportError(f"the side file {meta_path} is corrupt: {error!r}") from None
    if older:
        raise OnnxExportError(f"{path} was exported in an older format: export it again")
    if meta.get("model") != model_name:
        raise OnnxExportError(
            f"{path} was exported from {meta.get('model')!r}, not the served {model_name!r}"
        )
    if sha256(path) != expected:
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
        session,
        *geometry,
        "cuda" if on_gpu else "cpu",
        path,
        attention,
        slots,
        model_name,
    )


def slots_for(settings: Any) -> LoraSlots:
    """The LoRA slots of the base export: the nightly job's targets and rank, so that every
    adapter it trains fits."""
    return LoraSlots(tuple(settings.training.lora_target_modules), settings.training.lora_rank)


def base_export(loaded: Any, settings: Any) -> OnnxModel:
    """The served base model as ONNX with its LoRA slots: exported once into the model
    cache, then loaded; exported again when the device's graph or the slots change."""
    directory = settings.store.model_cache_dir / "onnx" / _safe(loaded.name)
    path = directory / ONNX_FILE
    fused = fused_for(loaded)
    slots: LoraSlots | None = slots_for(settings)
    try:
        model = _session(path, loaded.name, settings)
        device_ok = (model.attention == FUSED) == fused or unfusable(loaded.model)
        if device_ok and model.lora == slots:
            return model
        log.info("%s was exported for another device or LoRA; exporting again", path)
    except OnnxExportError as error:
        if path.exists():
            log.warning("%s; exporting again", error)
    try:
        export(loaded.model, directory, model_name=loaded.name, fused=fused, slots=slots)
    except OnnxExportError as error:  # e.g. a target the model does not have
        log.warning("exporting without LoRA slots, adapters will be refused: %s", error)
        export(loaded.model, directory, model_name=loaded.name, fused=fused)
    return _session(path, loaded.name, settings)


def export_in_child(settings: Any, report: Any) -> None:
    """``base_export`` for ``settings`` in a process of its own (the target of a spawned
    ``multiprocessing.Process``: a server on ``backend`` auto exports while torch serves,
    without holding its interpreter's lock or its memory once done). Sends None on
    ``report`` (a pipe's end) when the export is in the model cache, or why it is not."""
    import sys

    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stdio server's stdout is LSP
    with contextlib.suppress(AttributeError, OSError):
        os.nice(10)  # the completions come first
    try:
        from ghostloop.models import load_model

        base_export(load_model(settings), settings)
    except Exception as error:  # whatever it was, the server says it and keeps on torch
        report.send(f"{type(error).__name__}: {error}")
    else:
        report.send(None)


def fused_for(loaded: Any) -> bool:
    """Whether exports for ``loaded`` (a LoadedModel) get the fused attention: on a CPU.
    onnxruntime's GroupQueryAttention runs on CUDA in 16-bit floats only."""
    return str(getattr(loaded, "device", "cpu")) == "cpu"


Served = tuple[OnnxModel, OnnxAdapter | None]  # what generates: the base and an adapter


def adapter_file(directory: Path, base: OnnxModel, *, version: str, checksum: str) -> OnnxAdapter:
    """The adapter file published beside the adapter at ``directory`` (registry version
    ``version`` with ``checksum``), read and checked against the served base export."""
    return base.adapter(directory / "onnx" / ADAPTER_FILE, version=version, checksum=checksum)


def _session(path: Path, model_name: str, settings: Any) -> OnnxModel:
    if settings.inference.onnx_int8 and path.is_file():
        path = quantized(path)
    device = "cpu" if settings.inference.device == "cpu" else "cuda"
    return load(
        path,
        model_name=model_name,
        device=device,
        threads=settings.inference.torch_threads,
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
    """``Forward`` on an exported model. Fused graphs (see export's docstring) keep the
    KV cache in buffers updated in place; grouped graphs keep it in onnxruntime's output
    values (IO binding), so on a GPU it never leaves the device."""

    def __init__(
        self,
        model: OnnxModel,
        reuse: CachedPrefix | None = None,
        adapter: OnnxAdapter | None = None,
    ) -> None:
        import onnxruntime as ort

        self._model = model
        # the LoRA inputs, bound every run: the adapter's factors, or zeros
        self._lora = adapter.values if adapter is not None else model.no_adapter
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
        for name, value in self._lora.items():
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
            for name, value in self._lora.items():
                binding.bind_ortvalue_input(name, value)
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
