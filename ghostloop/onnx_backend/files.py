"""What an export is on disk: its files, the side file that vouches for it, and the error
for one that is missing, corrupt or made for another model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ghostloop.registry import AdapterError

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INT8_BLOCK = 128  # weights per int8 scale (see quantize.quantized)
INT8_SCHEME = f"matmul-nbits-8bit-block{INT8_BLOCK}"  # what the int8 copy is; another is made again
META_SUFFIX = ".json"
EXPORT_FORMAT = 3  # bump when the graph changes (2: grouped attention, 3: fused attention)
FUSED, GROUPED = "fused", "grouped"  # the two kinds of exported attention


class OnnxExportError(AdapterError):
    """An export is missing, corrupt or made for another model; the message says which."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_partials(directory: Path) -> None:
    """Remove the half-written files (``.NAME.PID.partial``) of exports and int8 copies
    whose process is gone: killed while it wrote (a server stopped during its background
    export). A live process's file stays; it renames or removes it itself."""
    for partial in directory.glob(".*.partial"):
        try:
            pid = int(partial.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours, or another user's live process
