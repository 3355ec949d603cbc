"""The onnxruntime backend: the served model exported to ONNX (``export``), its int8 copy
(``quantize``), and the forward step that runs it (``runtime``); ``files`` says what an
export is on disk. Everything the server, the nightly job and the benchmarks use is named
here."""

from ghostloop.onnx_backend.export import export, merged
from ghostloop.onnx_backend.files import (
    EXPORT_FORMAT,
    FUSED,
    GROUPED,
    INT8_FILE,
    META_SUFFIX,
    ONNX_FILE,
    OnnxExportError,
)
from ghostloop.onnx_backend.quantize import quantized
from ghostloop.onnx_backend.runtime import (
    OnnxForward,
    OnnxModel,
    adapter_export,
    base_export,
    fused_for,
    load,
    providers_for,
)

__all__ = [
    "EXPORT_FORMAT",
    "FUSED",
    "GROUPED",
    "INT8_FILE",
    "META_SUFFIX",
    "ONNX_FILE",
    "OnnxExportError",
    "OnnxForward",
    "OnnxModel",
    "adapter_export",
    "base_export",
    "export",
    "fused_for",
    "load",
    "merged",
    "providers_for",
    "quantized",
]
