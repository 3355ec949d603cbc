"""Run-time LoRA on onnxruntime: one base export with LoRA slots, adapters as small files
bound per forward, the same tokens as torch serving the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghostloop import onnx_backend, registry
from ghostloop.lora import read_adapter as read_peft
from ghostloop.models import LoadedModel, load_model
from ghostloop.onnx_backend.export import LoraSlots, slot_shapes
from ghostloop.onnx_backend.files import OnnxExportError, sha256
from ghostloop.onnx_backend.lora_files import ADAPTER_FILE, write_adapter
from ghostloop.settings import Settings
from ghostloop.suggest import suggest
from tests.integration.test_onnx_backend import contexts
from tests.publishing import save_adapter

SLOTS = LoraSlots(("q_proj", "k_proj", "v_proj", "o_proj"), 8)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[LoadedModel, Settings]:
    settings = Settings.of(model=str(tiny_model_dir), device="cpu", max_new_tokens=16)
    return load_model(settings), settings


def peft_adapter(model_dir: Path, directory: Path, loaded: LoadedModel, *, rank: int = 4):
    save_adapter(model_dir, directory, seed=7, rank=rank)
    return read_peft(
        directory, loaded.model, version="v1", expected_checksum=registry.checksum(directory)
    )


def tokens(loaded, settings, **kwargs) -> list[list[int]]:
    return [suggest(loaded, settings, c, **kwargs).generation.token_ids for c in contexts(4)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "grouped"])
def test_an_adapter_file_on_the_base_export_generates_as_torch_serving_the_adapter(
    tiny, tiny_model_dir: Path, tmp_path: Path, fused: bool
):
    loaded, settings = tiny
    weights = peft_adapter(tiny_model_dir, tmp_path / "peft", loaded)
    path = onnx_backend.export(
        loaded.model, tmp_path / "onnx", model_name=loaded.name, fused=fused, slots=SLOTS
    )
    model = onnx_backend.load(path, model_name=loaded.name)
    assert model.lora == SLOTS and len(model.lora_inputs) == 2 * 4 * 2  # 2 layers
    file = write_adapter(
        weights,
        tmp_path / "file",
        slot_shapes(loaded.model, SLOTS),
        model_name=model.model_name,
    )
    adapter = model.adapter(file, version="v1", checksum=weights.checksum)
    assert adapter.nbytes < path.stat().st_size / 10

    base = tokens(loaded, settings)
    with_adapter = tokens(loaded, settings, adapter=weights)
    assert with_adapter != base, "the adapter changes what is generated"
    forward = onnx_backend.OnnxForward
    assert tokens(loaded, settings, forward=forward(model)) == base  # zeros: the base model
    assert tokens(loaded, settings, forward=forward(model, adapter=adapter)) == with_adapter
    # the same session serves both, one forward at a time each its own
    assert tokens(loaded, settings, forward=forward(model)) == base


def test_the_int8_copy_quantizes_the_weights_and_keeps_the_adapter_in_fp32(
    tiny, tiny_model_dir: Path, tmp_path: Path
):
    import onnx

    loaded, _ = tiny
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name, slots=SLOTS)
    int8 = onnx_backend.quantized(path)
    graph = onnx.load(str(int8)).graph
    lora = [i for i in graph.input if i.name.startswith("lora.")]
    assert len(lora) == 16 and all(
        i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in lora
    )
    assert any(n.op_type == "MatMulNBits" for n in graph.node)
    model = onnx_backend.load(int8, model_name=loaded.name)
    assert model.lora == SLOTS


def test_bad_adapter_files_are_refused_by_name(tiny, tiny_model_dir: Path, tmp_path: Path):
    loaded, _ = tiny
    weights = peft_adapter(tiny_model_dir, tmp_path / "peft", loaded)
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name, slots=SLOTS)
    model = onnx_backend.load(path, model_name=loaded.name)
    shapes = slot_shapes(loaded.model, SLOTS)

    def written(name: str, **kwargs) -> Path:
        return write_adapter(weights, tmp_path / name, shapes, **kwargs)

    good = written("good", model_name=model.model_name)
    model.adapter(good, version="v1", checksum=weights.checksum)
    with pytest.raises(OnnxExportError, match="not v2 as published"):
        model.adapter(good, version="v2", checksum=weights.checksum)
    other = written("other", model_name="another-model")
    with pytest.raises(OnnxExportError, match="was made for 'another-model'"):
        model.adapter(other, version="v1", checksum=weights.checksum)
    truncated = written("truncated", model_name=model.model_name)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(OnnxExportError, match="does not match its recorded SHA-256"):
        model.adapter(truncated, version="v1", checksum=weights.checksum)
    with pytest.raises(OnnxExportError, match="no adapter file"):
        model.adapter(tmp_path / "nowhere" / ADAPTER_FILE, version="v1", checksum="")
    # a file whose side file vouches for it, made for a rank the export does not take
    wide = {
        name: (rows, 16) if name.endswith(".a") else (16, cols)
        for name, (rows, cols) in shapes.items()
    }
    odd = write_adapter(weights, tmp_path / "wide", wide, model_name=model.model_name)
    with pytest.raises(OnnxExportError, match=r"lora\.0\.q_proj\.a is .* takes"):
        model.adapter(odd, version="v1", checksum=weights.checksum)
    # what cannot be written: a rank above the slots', a module without a slot
    with pytest.raises(OnnxExportError, match="rank 4, the base export's slots 2"):
        write_adapter(
            weights,
            tmp_path / "narrow",
            slot_shapes(loaded.model, LoraSlots(SLOTS.targets, 2)),
            model_name=model.model_name,
        )
    with pytest.raises(OnnxExportError, match="no LoRA slot for"):
        write_adapter(
            weights,
            tmp_path / "fewer",
            slot_shapes(loaded.model, LoraSlots(("q_proj",), 8)),
            model_name=model.model_name,
        )
    plain = onnx_backend.load(
        onnx_backend.export(loaded.model, tmp_path / "plain", model_name=loaded.name),
        model_name=loaded.name,
    )
    with pytest.raises(OnnxExportError, match="has no LoRA slots"):
        plain.adapter(good, version="v1", checksum=weights.checksum)
    assert sha256(good)  # the good file is untouched by the refusals


def test_the_base_export_takes_the_nightly_jobs_adapters_and_is_made_again_for_others(
    tiny, tmp_path: Path
):
    loaded, settings = tiny
    settings = settings.replaced(data_dir=tmp_path)
    model = onnx_backend.base_export(loaded, settings)
    assert model.lora == LoraSlots(tuple(settings.training.lora_target_modules), 16)
    again = onnx_backend.base_export(loaded, settings)
    assert again.path.stat().st_mtime == model.path.stat().st_mtime, "exported once"
    wider = onnx_backend.base_export(loaded, settings.replaced(lora_rank=32))
    assert wider.lora is not None and wider.lora.rank == 32
