"""The language server on the onnxruntime backend: the same suggestions as the torch
backend over LSP, adapters hot-swapped as files bound to one session, bad files refused."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from feedback.database import open_engine
from ghostloop import registry
from ghostloop.onnx_backend import ADAPTER_FILE
from tests.e2e.conftest import StartServer, open_document, sample_source
from tests.e2e.test_hot_swap import complete, positions, settings_for
from tests.publishing import publish_adapter

ONNX = {"GHOSTLOOP_BACKEND": "onnxruntime", "GHOSTLOOP_ADAPTER_POLL_S": "0"}


async def texts(client, uri: str, spots: list[tuple[int, int]]) -> list[str]:
    return [await complete(client, uri, *spot) for spot in spots]


async def status(client):
    return await client.protocol.send_request_async("ghostloop/status", None)


async def test_onnx_server_serves_what_torch_serves_and_swaps_adapters(
    start_server: StartServer, tiny_model_dir: Path, tmp_path: Path
):
    database = f"sqlite:///{tmp_path / 'team.db'}"
    open_engine(database).dispose()
    torch_client = await start_server(env={"GHOSTLOOP_DATABASE_URL": database})
    onnx_client = await start_server(env={**ONNX, "GHOSTLOOP_DATABASE_URL": database})
    assert (await status(onnx_client)).backend == "onnxruntime (cpu)"
    spots = positions(6)
    uris = [open_document(c, sample_source(), "shlex.py") for c in (torch_client, onnx_client)]
    base = await texts(torch_client, uris[0], spots)
    assert any(base) and await texts(onnx_client, uris[1], spots) == base

    publish_adapter(settings_for(database), tiny_model_dir, "v1", seed=1, onnx=True)
    for client in (torch_client, onnx_client):
        reloaded = await client.protocol.send_request_async("ghostloop/reloadAdapters", None)
        assert reloaded.adapter == "v1", reloaded
    adapted = await texts(torch_client, uris[0], spots)
    assert adapted != base
    assert await texts(onnx_client, uris[1], spots) == adapted

    # an adapter file that does not match its side file: refused, v1 keeps serving
    path = publish_adapter(settings_for(database), tiny_model_dir, "v2", seed=2, onnx=True)
    export = path / registry.EXPORT_DIR / ADAPTER_FILE
    export.write_bytes(export.read_bytes()[: export.stat().st_size // 2])
    reloaded = await onnx_client.protocol.send_request_async("ghostloop/reloadAdapters", None)
    assert reloaded.adapter == "v1"
    [refused] = reloaded.refused
    assert refused.version == "v2" and "does not match its recorded SHA-256" in refused.reason
    assert await texts(onnx_client, uris[1], spots) == adapted

    # an adapter published without its file (the nightly job ran on the torch backend)
    publish_adapter(settings_for(database), tiny_model_dir, "v3", seed=3)
    reloaded = await onnx_client.protocol.send_request_async("ghostloop/reloadAdapters", None)
    assert reloaded.adapter == "v1"
    assert any(r.version == "v3" and "no adapter file" in r.reason for r in reloaded.refused)

    # a canary beside the active adapter: two files on one session, this user on the canary
    publish_adapter(
        settings_for(database), tiny_model_dir, "v4", seed=4, onnx=True, canary_share=0.999
    )
    # (v3 is active in the table: the torch server serves it, the onnx server keeps v1)
    for client, active in ((torch_client, "v3"), (onnx_client, "v1")):
        reloaded = await client.protocol.send_request_async("ghostloop/reloadAdapters", None)
        assert (reloaded.adapter, reloaded.canary.version) == (active, "v4"), reloaded
    on_canary = await texts(torch_client, uris[0], spots)
    assert on_canary != adapted
    assert await texts(onnx_client, uris[1], spots) == on_canary


async def test_onnx_server_exports_the_base_model_once(
    start_server: StartServer, isolated_data_dir: Path
):
    first = await start_server(env=ONNX)
    uri = open_document(first, sample_source(), "shlex.py")
    spot = positions(1)[0]
    text = await complete(first, uri, *spot)
    await first.shutdown_session()
    [export] = (isolated_data_dir / "models" / "onnx").glob("*/model.onnx")
    written = export.stat().st_mtime_ns
    again = await start_server(env=ONNX)
    uri = open_document(again, sample_source(), "shlex.py")
    assert await complete(again, uri, *spot) == text
    assert export.stat().st_mtime_ns == written  # loaded, not exported again


async def wait_for_export(client, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await status(client)
        if found.onnx_export != "running" or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def test_auto_serves_on_torch_while_it_exports_then_on_onnxruntime(
    start_server: StartServer, tiny_model_dir: Path, tmp_path: Path, isolated_data_dir: Path
):
    database = f"sqlite:///{tmp_path / 'team.db'}"
    publish_adapter(settings_for(database), tiny_model_dir, "v1", seed=1, onnx=True)
    auto = {"GHOSTLOOP_BACKEND": "auto", "GHOSTLOOP_DATABASE_URL": database}
    client = await start_server(env={**auto, "GHOSTLOOP_ADAPTER_POLL_S": "0"})
    started = await status(client)
    # ready at once on torch, the adapter in force, the export under way
    assert (started.backend, started.onnx_export, started.adapter) == ("torch", "running", "v1")
    spots = positions(6)
    uri = open_document(client, sample_source(), "shlex.py")
    on_torch = await texts(client, uri, spots)
    switched = await wait_for_export(client)
    assert (switched.backend, switched.onnx_export) == ("onnxruntime (cpu)", "done"), switched
    assert switched.adapter == "v1"  # read again as its adapter file: the same suggestions
    assert any(on_torch) and await texts(client, uri, spots) == on_torch
    [export] = (isolated_data_dir / "models" / "onnx").glob("*/model.onnx")
    written = export.stat().st_mtime_ns

    # the next start loads the export from the model cache
    again = await start_server(env={**auto, "GHOSTLOOP_ADAPTER_POLL_S": "0"})
    assert (await wait_for_export(again)).backend == "onnxruntime (cpu)"
    assert export.stat().st_mtime_ns == written


async def test_auto_keeps_serving_on_torch_when_the_export_fails(
    start_server: StartServer, tmp_path: Path
):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("the model cache cannot be made here")
    client = await start_server(
        env={"GHOSTLOOP_BACKEND": "auto", "GHOSTLOOP_MODEL_CACHE": str(blocked)}
    )
    failed = await wait_for_export(client)
    assert failed.backend == "torch"
    assert failed.onnx_export.startswith("failed: ") and "not-a-directory" in failed.onnx_export
    uri = open_document(client, sample_source(), "shlex.py")
    assert any(await texts(client, uri, positions(3)))
