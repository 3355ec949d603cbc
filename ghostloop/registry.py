"""The adapter registry on disk: one directory per published LoRA version.

A version is written under a temporary name, checked (safetensors only, never pickle),
checksummed and renamed into place, so a crash mid-publish leaves no half-written version
visible. The adapters table (feedback.adapter_rows) says which version is active.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXPORT_DIR = "onnx"  # the onnxruntime adapter file, checked by its own side file
PARTIAL_PREFIX = ".partial-"


class AdapterError(ValueError):
    """An adapter directory that must not be served; the message says what is wrong."""


def checksum(directory: Path) -> str:
    """SHA-256 over the adapter's files, in a fixed order."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = directory / name
        if not path.is_file():
            raise AdapterError(f"adapter {directory} has no {name}")
        digest.update(name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def verify(directory: Path, expected_checksum: str | None = None) -> dict[str, object]:
    """The adapter's config after checking its files; raises AdapterError when unusable."""
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    if pickles:
        raise AdapterError(
            f"adapter {directory} holds pickle files {pickles}; only safetensors are loaded"
        )
    actual = checksum(directory)
    if expected_checksum is not None and actual != expected_checksum:
        raise AdapterError(
            f"adapter {directory} does not match its checksum (files changed or corrupt); "
            "publish it again"
        )
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"adapter {directory} has an unreadable config: {error}") from None
    if not isinstance(config, dict) or "r" not in config:
        raise AdapterError(f"adapter {directory} config is not a LoRA config")
    return config


def write_atomically(
    registry: Path, version: str, save: Callable[[Path], None]
) -> tuple[Path, str]:
    """``save(tmp_dir)`` writes the adapter; it is verified, synced and renamed into place."""
    registry.mkdir(parents=True, exist_ok=True)
    final = registry / version
    if final.exists():
        raise AdapterError(f"adapter version {version} already exists in {registry}")
    partial = registry / f"{PARTIAL_PREFIX}{version}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        save(partial)
        for extra in partial.iterdir():  # peft writes a README; keep only what is served
            if extra.name not in (*ADAPTER_FILES, EXPORT_DIR):
                extra.unlink() if extra.is_file() else shutil.rmtree(extra)
        digest = checksum(partial)
        verify(partial, digest)
        for name in ADAPTER_FILES:
            with (partial / name).open("rb") as handle:
                os.fsync(handle.fileno())
        os.rename(partial, final)
        directory_fd = os.open(registry, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final, digest


def clean(registry: Path, known: Iterable[str]) -> list[str]:
    """Remove partial writes and directories no row names (a crash between rename and row)."""
    if not registry.is_dir():
        return []
    keep = set(known)
    removed = []
    for entry in registry.iterdir():
        if entry.is_dir() and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed
