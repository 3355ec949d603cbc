"""Serving an adapter with forward hooks computes what peft computes, and a bad adapter
is refused before it touches the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ghostloop.lora import read_adapter, serving
from ghostloop.registry import AdapterError, checksum
from tests.publishing import save_adapter


@pytest.fixture
def base(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_hooks_compute_what_peft_computes(
    base: torch.nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    weights = read_adapter(tmp_path / "a", base, version="a", expected_checksum=None)
    plain = logits(base)
    with serving(base).applied(weights):
        ours = logits(base)
    after = logits(base)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "a")
    ).eval()
    theirs = logits(reference)
    assert not torch.allclose(plain, theirs, atol=1e-3), "the adapter changes the model"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after, plain)  # out of force, the base model is untouched
    assert weights.rank == 4 and weights.nbytes > 0
    assert len(weights.layers) == 2 * 4  # 2 layers x q, k, v, o


def test_two_adapters_switch_without_touching_each_other(
    base: torch.nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    save_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    save_adapter(tiny_model_dir, tmp_path / "b", seed=2)
    a = read_adapter(tmp_path / "a", base, version="a")
    b = read_adapter(tmp_path / "b", base, version="b")
    with serving(base).applied(a):
        first = logits(base)
    with serving(base).applied(b):
        second = logits(base)
    with serving(base).applied(a):
        again = logits(base)
    assert not torch.allclose(first, second, atol=1e-3)
    torch.testing.assert_close(first, again)


def test_bad_adapters_are_refused(
    base: torch.nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    good = tmp_path / "good"
    save_adapter(tiny_model_dir, good, seed=1)
    digest = checksum(good)
    with pytest.raises(AdapterError, match="checksum"):
        read_adapter(good, base, version="g", expected_checksum="0" * 64)

    corrupt = tmp_path / "corrupt"
    save_adapter(tiny_model_dir, corrupt, seed=1)
    tensors = corrupt / "adapter_model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-200])
    with pytest.raises(AdapterError, match="corrupt safetensors"):
        read_adapter(corrupt, base, version="c")

    from transformers import AutoConfig, AutoModelForCausalLM

    narrower = AutoConfig.from_pretrained(tiny_model_dir)
    narrower.hidden_size, narrower.intermediate_size = 32, 64
    other_model = tmp_path / "other"
    AutoModelForCausalLM.from_config(narrower).save_pretrained(other_model)
    foreign = tmp_path / "foreign"
    save_adapter(other_model, foreign, seed=1)
    with pytest.raises(AdapterError, match="another base model"):
        read_adapter(foreign, base, version="f")

    dora = tmp_path / "dora"
    save_adapter(tiny_model_dir, dora, seed=1)
    settings = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        read_adapter(dora, base, version="d")

    (good / "extra.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(good, base, version="g", expected_checksum=digest)
    assert logits(base).shape[-1] == 800  # the model still runs as before
