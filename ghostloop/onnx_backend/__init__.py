"""The onnxruntime backend: the base model exported once to ONNX with LoRA slots
(``export``), its int8 copy (``quantize``), adapters as small files bound at run time
(``lora_files``), and the forward step that runs them (``runtime``); ``files`` says what an
export is on disk. Everything the server, the nightly job and the benchmarks use is named
here."""

from ghostloop.onnx_backend.export import LoraSlots, export, slot_shapes
from ghostloop.onnx_backend.files import (
    EXPORT_FORMAT,
    FUSED,
    GROUPED,
    INT8_FILE,
    META_SUFFIX,
    ONNX_FILE,
    OnnxExportError,
)
from ghostloop.onnx_backend.lora_files import ADAPTER_FILE, OnnxAdapter, write_adapter
from ghostloop.onnx_backend.quantize import quantized
from ghostloop.onnx_backend.runtime import (
    OnnxForward,
    OnnxModel,
    Served,
    adapter_file,
    base_export,
    export_in_child,
    fused_for,
    load,
    providers_for,
    slots_for,
)

__all__ = [
    "ADAPTER_FILE",
    "EXPORT_FORMAT",
    "FUSED",
    "GROUPED",
    "INT8_FILE",
    "META_SUFFIX",
    "ONNX_FILE",
    "LoraSlots",
    "OnnxAdapter",
    "OnnxExportError",
    "OnnxForward",
    "OnnxModel",
    "Served",
    "adapter_file",
    "base_export",
    "export",
    "export_in_child",
    "fused_for",
    "load",
    "providers_for",
    "quantized",
    "slot_shapes",
    "slots_for",
    "write_adapter",
]
