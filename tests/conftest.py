from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests run last, as in pygls's own suite."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data dir and sees none of the developer's settings."""
    for key in list(os.environ):
        if key.startswith("GHOSTLOOP_"):
            monkeypatch.delenv(key)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("GHOSTLOOP_DATA_DIR", str(data_dir))
    monkeypatch.setenv("GHOSTLOOP_CONFIG", "")
    return data_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model without an end token: only cancellation or a limit stops it."""
    return build_tiny_model(tmp_path_factory.mktemp("endless-model"), with_eos=False)
