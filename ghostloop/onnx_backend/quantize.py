"""The int8 copy of an export, made once beside it (onnxruntime's MatMulNBits)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ghostloop.onnx_backend.files import (
    INT8_BLOCK,
    INT8_FILE,
    INT8_SCHEME,
    META_SUFFIX,
    OnnxExportError,
    sha256,
)


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
    meta.write_text(json.dumps({**source_meta, "sha256": sha256(target), **made_from}))
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
