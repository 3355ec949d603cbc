"""The onnxruntime backend against the torch backend: the same greedy suggestions on
real prompts, with and without an adapter; broken exports refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ghostloop import onnx_backend
from ghostloop.corpus import sample_positions, stdlib_dir
from ghostloop.models import LoadedModel, load_model
from ghostloop.postprocess import CursorContext
from ghostloop.settings import Settings
from ghostloop.suggest import suggest

FILES = ("textwrap.py", "shlex.py", "fnmatch.py", "json/decoder.py")


def contexts(count_per_file: int) -> list[CursorContext]:
    found = []
    for name in FILES:
        path = stdlib_dir() / name
        source = path.read_text(encoding="utf-8")
        for sample in sample_positions(path, count_per_file, seed=11):
            rest = source[sample.offset + len(sample.true_line_rest) :]
            found.append(CursorContext(source[: sample.offset], rest))
    return found


def suggestions(loaded: LoadedModel, settings: Settings, model=None, adapter=None) -> list:
    out = []
    for context in contexts(4):
        if model is None:
            found = suggest(loaded, settings, context, adapter=adapter)
        else:
            found = suggest(loaded, settings, context, forward=onnx_backend.OnnxForward(model))
        out.append(found.generation.token_ids)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[LoadedModel, Settings]:
    settings = Settings.of(model=str(tiny_model_dir), device="cpu", max_new_tokens=16)
    return load_model(settings), settings


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "grouped"])
def test_greedy_tokens_equal_torch_on_real_prompts(tiny, tmp_path: Path, fused: bool):
    loaded, settings = tiny
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name, fused=fused)
    model = onnx_backend.load(path, model_name=loaded.name)
    assert model.attention == (onnx_backend.FUSED if fused else onnx_backend.GROUPED)
    expected = suggestions(loaded, settings)
    assert sum(len(ids) for ids in expected) > 100  # the tiny model does write
    assert suggestions(loaded, settings, model=model) == expected


def test_the_fused_graph_attends_in_one_operator_over_a_buffer_it_updates_in_place(
    tiny, tmp_path: Path
):
    import onnx
    import torch

    loaded, _ = tiny
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name)
    graph = onnx.load(str(path)).graph
    fused = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert len(fused) == loaded.model.config.num_hidden_layers
    assert {node.domain for node in fused} == {"com.microsoft"}
    assert all(node.input[1] == node.input[2] == "" for node in fused)  # q, k, v packed
    # no rotary arithmetic and no cache copies left outside the operator
    assert not [node for node in graph.node if node.op_type in ("Neg", "Expand")]
    assert "position_ids" not in {i.name for i in graph.input}
    # the attended output is declared as wide as the hidden state, not the packed q, k, v
    # (onnxruntime warned at every load of a graph declaring otherwise)
    declared = {info.name: info for info in graph.value_info}
    widths = {declared[node.output[0]].type.tensor_type.shape.dim[-1].dim_value for node in fused}
    assert widths == {loaded.model.config.hidden_size}
    model = onnx_backend.load(path, model_name=loaded.name)

    # the cache grows past its buffer (copied over), and each step equals a fresh prefill
    ids = loaded.tokenizer.encode_text((stdlib_dir() / "shlex.py").read_text())[:300]
    forward = onnx_backend.OnnxForward(model)
    forward.prefill(ids[:40])
    first = forward.keep()
    assert first is not None and first.cache.capacity < 300
    for at in range(40, 299):
        logits = forward.step(ids[at])
        if at in (100, 200, 298):
            fresh = onnx_backend.OnnxForward(model).prefill(ids[: at + 1])
            with torch.no_grad():
                reference = loaded.model(torch.tensor([ids[: at + 1]])).logits[0, -1]
            assert torch.allclose(logits, fresh, atol=1e-4)
            assert torch.allclose(logits, reference, atol=1e-3)
    kept = forward.keep()
    assert kept is not None and kept.cache.capacity >= 300 and kept.token_ids == ids[:299]
    assert kept.nbytes == kept.cache.nbytes > first.nbytes

    # a later prompt that shares only the first 50 tokens writes over the rest in place
    other = ids[:50] + loaded.tokenizer.encode_text("\ndef other(x):\n    return x")
    again = onnx_backend.OnnxForward(model, reuse=kept)
    logits = again.prefill(other)
    assert again.reused == 50
    assert torch.allclose(logits, onnx_backend.OnnxForward(model).prefill(other), atol=1e-4)


def test_exports_follow_the_device_they_are_served_on(tiny, tmp_path: Path):
    from dataclasses import replace

    loaded, settings = tiny
    settings = settings.replaced(data_dir=tmp_path)
    assert onnx_backend.fused_for(loaded)
    assert onnx_backend.base_export(loaded, settings).attention == onnx_backend.FUSED
    # on a GPU onnxruntime has GroupQueryAttention in 16-bit floats only: the export made
    # for the CPU is made again with the grouped attention (served here on the CPU)
    on_gpu = replace(loaded, device="cuda")
    assert not onnx_backend.fused_for(on_gpu)
    model = onnx_backend.base_export(on_gpu, settings)
    assert model.attention == onnx_backend.GROUPED
    assert suggestions(loaded, settings, model=model) == suggestions(loaded, settings)


def test_tied_embeddings_are_stored_once(tiny, tmp_path: Path):
    import onnx

    loaded, _ = tiny
    assert loaded.model.config.tie_word_embeddings
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name)
    graph = onnx.load(str(path)).graph
    vocab, hidden = loaded.model.lm_head.weight.shape
    big = [i for i in graph.initializer if sorted(i.dims) == sorted([vocab, hidden])]
    assert len(big) == 1


def test_the_int8_copy_quantizes_every_weight_in_blocks_and_runs(tiny, tmp_path: Path):
    import json

    import onnx
    import torch
    from onnx import numpy_helper

    loaded, settings = tiny
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name)
    int8_path = onnx_backend.quantized(path)
    made = int8_path.stat().st_mtime_ns
    assert onnx_backend.quantized(path) == int8_path
    assert int8_path.stat().st_mtime_ns == made  # made once
    graph = onnx.load(str(int8_path)).graph
    stored = {init.name: init for init in graph.initializer}
    blockwise = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in stored]
    # every weight of every Linear (q k v o gate up down and the output layer; the fused
    # graph packs q k v and gate up side by side) is in one of them
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = 0
    for node in blockwise:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        quantized += attributes["N"] * attributes["K"]
        assert attributes["bits"] == 8
        assert attributes["block_size"] == onnx_backend.files.INT8_BLOCK
        assert attributes["accuracy_level"] == 4
        assert numpy_helper.to_array(stored[node.input[1]]).dtype.name == "uint8"
    assert quantized == sum(linear.weight.numel() for linear in linears)
    assert len(blockwise) == 4 * loaded.model.config.num_hidden_layers + 1  # packed
    (head,) = [node for node in graph.node if "logits" in node.output]
    assert head.op_type == "MatMulNBits"
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in stored]
    model = onnx_backend.load(int8_path, model_name=loaded.name)
    assert len(suggestions(loaded, settings, model=model)) == 16

    # a copy made another way (an older Ghostloop's) is made again, not served
    meta_path = int8_path.with_name(int8_path.name + onnx_backend.META_SUFFIX)
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "int8": True}))
    assert onnx_backend.quantized(path) == int8_path
    assert json.loads(meta_path.read_text())["int8"] == onnx_backend.files.INT8_SCHEME
    assert int8_path.stat().st_mtime_ns != made

    # so is one made from another export of the model (an older format, another adapter)
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "source_sha256": "0"}))
    remade = int8_path.stat().st_mtime_ns
    assert onnx_backend.quantized(path) == int8_path
    assert int8_path.stat().st_mtime_ns != remade
    source = json.loads(path.with_name(path.name + onnx_backend.META_SUFFIX).read_text())
    assert json.loads(meta_path.read_text())["source_sha256"] == source["sha256"]

    # and one whose side file is corrupt
    meta_path.write_text("{not json")
    corrupt = int8_path.stat().st_mtime_ns
    assert onnx_backend.quantized(path) == int8_path
    assert int8_path.stat().st_mtime_ns != corrupt
    assert json.loads(meta_path.read_text())["int8"] == onnx_backend.files.INT8_SCHEME

    # an export without its side file is refused, and its int8 copy left as it was
    path.with_name(path.name + onnx_backend.META_SUFFIX).unlink()
    kept = int8_path.stat().st_mtime_ns
    with pytest.raises(
        onnx_backend.OnnxExportError, match=r"no readable side file.*export it again"
    ):
        onnx_backend.quantized(path)
    assert int8_path.stat().st_mtime_ns == kept


def test_a_corrupt_or_foreign_export_is_refused_with_the_reason(tiny, tmp_path: Path):
    loaded, _ = tiny
    path = onnx_backend.export(loaded.model, tmp_path / "onnx", model_name=loaded.name)
    with pytest.raises(onnx_backend.OnnxExportError, match="exported from 'tiny-model"):
        onnx_backend.load(path, model_name="another-model")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "onnx", broken)
    (broken / "model.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(onnx_backend.OnnxExportError, match="does not match its recorded SHA"):
        onnx_backend.load(broken / "model.onnx", model_name=loaded.name)
    meta_path = broken / "model.onnx.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = onnx_backend.files.sha256(broken / "model.onnx")  # a consistent lie
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(onnx_backend.OnnxExportError, match="onnxruntime cannot load"):
        onnx_backend.load(broken / "model.onnx", model_name=loaded.name)
    with pytest.raises(onnx_backend.OnnxExportError, match="no ONNX export"):
        onnx_backend.load(tmp_path / "nowhere" / "model.onnx", model_name=loaded.name)
    # an export from an older Ghostloop (its side file without this one's fields)
    meta_path = tmp_path / "onnx" / "model.onnx.json"
    good = json.loads(meta_path.read_text())
    older = {k: v for k, v in good.items() if k != "attention"}
    meta_path.write_text(json.dumps({**older, "format": 2}))
    with pytest.raises(onnx_backend.OnnxExportError, match="older format: export it again"):
        onnx_backend.load(path, model_name=loaded.name)
    for bad in ({**good, "attention": "sideways"}, older, {**good, "layers": "many"}, []):
        meta_path.write_text(json.dumps(bad))
        with pytest.raises(onnx_backend.OnnxExportError, match=r"side file .* is corrupt"):
            onnx_backend.load(path, model_name=loaded.name)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("smollm2")
    settings = Settings.of(device="cpu", max_new_tokens=16, max_lines=1, data_dir=directory)
    loaded = load_model(settings)
    path = onnx_backend.export(loaded.model, directory / "onnx", model_name=loaded.name)
    return loaded, settings, path


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_torch(smollm2):
    loaded, settings, path = smollm2
    model = onnx_backend.load(
        path, model_name=loaded.name, threads=settings.inference.torch_threads
    )
    for context in contexts(2):
        expected = suggest(loaded, settings, context).generation.token_ids
        forward = onnx_backend.OnnxForward(model)
        assert suggest(loaded, settings, context, forward=forward).generation.token_ids == expected


# int8 may save less typing than fp32 by at most this share (characters saved and exact
# lines over INT8_POSITIONS real positions). One-sided: saving more is no defect, and over
# 40 positions the two moved by -29 % and +37 % with nothing but the prompt window changed
# (a few exact 40-character lines decide it), so the sample is twice that. With per-tensor
# dynamic int8 (the first int8 copy) it kept 244-276 characters to fp32's 367 depending on
# the transformers version that exported the graph; in blocks of 128
# (onnx_backend.quantized) it kept 406 with 14 exact lines to fp32's 367 and 14 (429 and
# 13 from the export before its attention changed). The tolerance leaves room for a few
# lines' drift between exports.
INT8_TOLERANCE = 0.15
INT8_POSITIONS_PER_FILE = 20


@pytest.mark.slow
# a hang guard, not a time target: it exports and quantizes SmolLM2 and walks 80 positions
# twice, 230 s alone on this 2-core machine on a slow day; it passed the 300 s default by
# 70 s only and timed out beside other CPU work
@pytest.mark.timeout(900)
def test_smollm2_int8_saves_about_as_much_typing_as_fp32(smollm2):
    """int8 changes tokens (rounding the weights drifts within a few tokens), so it is
    held to what users get: characters saved per completion and exact lines against the
    code that really follows, no worse than INT8_TOLERANCE below the fp32 model's."""
    from feedback.metrics import judge

    loaded, settings, path = smollm2
    int8 = onnx_backend.load(
        onnx_backend.quantized(path),
        model_name=loaded.name,
        threads=settings.inference.torch_threads,
    )
    saved = {"fp32": 0, "int8": 0}
    exact = {"fp32": 0, "int8": 0}
    count = 0
    for name in FILES:
        source = (stdlib_dir() / name).read_text(encoding="utf-8")
        for sample in sample_positions(stdlib_dir() / name, INT8_POSITIONS_PER_FILE, seed=5):
            rest = source[sample.offset + len(sample.true_line_rest) :]
            context = CursorContext(source[: sample.offset], rest)
            texts = {
                "fp32": suggest(loaded, settings, context).text,
                "int8": suggest(
                    loaded, settings, context, forward=onnx_backend.OnnxForward(int8)
                ).text,
            }
            for kind, text in texts.items():
                outcome = judge(text, sample.true_line_rest)
                saved[kind] += outcome.retained
                exact[kind] += outcome.exact
            count += 1
    print(f"over {count} positions: chars saved {saved}, exact lines {exact}")
    assert saved["fp32"] > 0
    assert saved["int8"] >= (1 - INT8_TOLERANCE) * saved["fp32"]
    assert exact["int8"] >= (1 - INT8_TOLERANCE) * exact["fp32"] - 2


def test_making_an_int8_copy_leaves_the_process_logging_as_it_was():
    """onnxruntime's quantizer module turns on INFO logging for the whole process on import
    (logging.basicConfig) and logs a line per graph node: neither may reach a server's or
    a nightly job's log. A fresh interpreter, so that nothing has imported it yet."""
    import subprocess
    import sys

    script = (
        "import logging\n"
        "from ghostloop.onnx_backend import quantize\n"
        "quantize._quantizer_class()\n"
        "root = logging.getLogger()\n"
        "node_log = logging.getLogger('onnxruntime.quantization.matmul_nbits_quantizer')\n"
        "print(len(root.handlers), logging.getLevelName(root.level),"
        " node_log.isEnabledFor(logging.INFO))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == ["0", "WARNING", "False"]
