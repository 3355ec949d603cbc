"""The adapter registry on disk: atomic writes, checksums, and refusing unsafe files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ghostloop import registry


def save_fake_adapter(directory: Path) -> None:
    (directory / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    (directory / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (directory / "README.md").write_text("peft writes one")


def test_a_version_appears_whole_with_its_checksum(tmp_path: Path):
    path, digest = registry.write_atomically(tmp_path, "v1", save_fake_adapter)
    assert sorted(p.name for p in path.iterdir()) == sorted(registry.ADAPTER_FILES)
    assert registry.verify(path, digest)["r"] == 16
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no partial directory left
    with pytest.raises(registry.AdapterError, match="already exists"):
        registry.write_atomically(tmp_path, "v1", save_fake_adapter)


def test_a_failed_write_leaves_nothing(tmp_path: Path):
    def broken(directory: Path) -> None:
        (directory / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        registry.write_atomically(tmp_path, "v2", broken)
    assert list(tmp_path.iterdir()) == []


def test_changed_files_and_pickles_are_refused(tmp_path: Path):
    path, digest = registry.write_atomically(tmp_path, "v3", save_fake_adapter)
    (path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(registry.AdapterError, match="does not match its checksum"):
        registry.verify(path, digest)
    (path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(registry.AdapterError, match="pickle files"):
        registry.verify(path)
    with pytest.raises(registry.AdapterError, match="does not exist"):
        registry.verify(tmp_path / "missing")


def test_clean_removes_partial_and_unrecorded_directories(tmp_path: Path):
    registry.write_atomically(tmp_path, "kept", save_fake_adapter)
    registry.write_atomically(tmp_path, "orphan", save_fake_adapter)
    (tmp_path / f"{registry.PARTIAL_PREFIX}half").mkdir()
    assert sorted(registry.clean(tmp_path, ["kept"])) == [
        f"{registry.PARTIAL_PREFIX}half",
        "orphan",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
