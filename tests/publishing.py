"""LoRA adapters for the tiny model, published as the nightly job publishes them."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from feedback import adapter_rows
from feedback.database import open_engine, upgrade
from ghostloop import registry
from ghostloop.models import resolve_model
from ghostloop.settings import Settings


def save_adapter(model_dir: Path, directory: Path, *, seed: int, rank: int = 4) -> None:
    """A LoRA for ``model_dir`` with random (non-zero) factors, saved as peft saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # B is random too: the adapter changes what is generated
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(directory), safe_serialization=True)


def write_onnx_adapter(model_dir: Path, directory: Path, version: str) -> None:
    """The adapter at ``directory`` as an adapter file beside it, for the base export the
    onnxruntime backend serves (the nightly job's default slots), as the nightly job
    writes it."""
    from ghostloop import onnx_backend
    from ghostloop.lora import read_factors
    from ghostloop.models import load_model

    settings = Settings.of(model=str(model_dir), device="cpu")
    loaded = load_model(settings)
    weights = read_factors(
        directory, version=version, expected_checksum=registry.checksum(directory)
    )
    shapes = onnx_backend.slot_shapes(loaded.model, onnx_backend.slots_for(settings))
    onnx_backend.write_adapter(
        weights, directory / registry.EXPORT_DIR, shapes, model_name=loaded.name
    )


def publish_adapter(
    settings: Settings,
    model_dir: Path,
    version: str,
    *,
    seed: int,
    canary_share: float = 0.0,
    trained_for: Path | None = None,
    onnx: bool = False,
) -> Path:
    """Write a version into the registry and publish it for the served model (as the
    nightly job does); ``trained_for`` makes its weights fit another model; ``onnx``
    writes its adapter file for the onnxruntime backend as the nightly job does."""

    def save(directory: Path) -> None:
        save_adapter(trained_for or model_dir, directory, seed=seed)
        if onnx:
            write_onnx_adapter(model_dir, directory, version)

    path, digest = registry.write_atomically(settings.store.adapters_dir, version, save)
    engine = open_engine(settings.store.database_url)
    upgrade(engine)
    with Session(engine) as session, session.begin():
        adapter_rows.publish(
            session,
            version=version,
            base_model=resolve_model(Settings.of(model=str(model_dir)))[0],
            run_id=None,
            path=path,
            checksum=digest,
            evidence={"test": True},
            canary_share=canary_share,
        )
    engine.dispose()
    return path
