"""Hot-swap: a published adapter is served without a restart, a bad one is refused, and
operators' promote / rollback reach the running server within a poll interval."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types
from pytest_lsp import LanguageClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.canary import arm_for
from feedback.database import open_engine
from feedback.schema import AdapterVersion, Completion
from ghostloop.settings import Settings
from tests.e2e.conftest import StartServer, inline_params, open_document, sample_source
from tests.publishing import publish_adapter
from tests.training_data import SHORT_WINDOWS, TRUTH, change, function_text

POLL = "0.2"


def positions(count: int) -> list[tuple[int, int]]:
    """Line starts after the indentation in shlex.py, where the tiny model suggests."""
    lines = sample_source().splitlines()
    found = []
    for number, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped and not stripped.startswith(("#", '"')) and number > 20:
            found.append((number, len(line) - len(stripped)))
    step = max(1, len(found) // count)
    return found[::step][:count]


async def suggestion(
    client: LanguageClient, uri: str, line: int, column: int
) -> tuple[str, str | None]:
    """(text, completion id); an empty suggestion has no id."""
    result = await client.text_document_inline_completion_async(inline_params(uri, line, column))
    assert result is not None
    if not result.items:
        return "", None
    item = result.items[0]
    assert item.command is not None
    return str(item.insert_text), str(item.command.arguments[0])


async def complete(client: LanguageClient, uri: str, line: int, column: int) -> str:
    return (await suggestion(client, uri, line, column))[0]


async def serving(client: LanguageClient) -> dict[str, Any]:
    status = await client.protocol.send_request_async("ghostloop/status", None)
    canary = status.canary  # pygls hands objects back as named tuples
    return {
        "adapter": status.adapter,
        "canary": {"version": canary.version, "share": canary.share} if canary else None,
    }


async def until(check: Any, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


def settings_for(database: str) -> Settings:
    """The test's own settings (its data dir, from the environment) with ``database``."""
    from ghostloop.settings import load_settings

    return load_settings(overrides={"database_url": database})


@pytest.fixture
def database(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'team.db'}"


def rows(database: str) -> list[Completion]:
    engine = open_engine(database)
    with Session(engine) as session:
        found = list(session.scalars(select(Completion).order_by(Completion.created_at)))
    engine.dispose()
    return found


async def test_adapter_published_mid_stream_is_served_without_a_failed_request(
    start_server: StartServer, tiny_model_dir: Path, database: str
) -> None:
    env = {"GHOSTLOOP_DATABASE_URL": database, "GHOSTLOOP_ADAPTER_POLL_S": POLL}
    client = await start_server(env=env)
    uri = open_document(client, sample_source(), "shlex.py")
    spots = positions(12)
    served: list[tuple[tuple[int, int], str, str | None]] = []
    failures: list[BaseException] = []
    publishing: asyncio.Task[Path] | None = None
    swapped_at: int | None = None  # requests served when the server first reported v1
    give_up = time.monotonic() + 240
    # the stream goes on until every position was asked once more after the swap, however
    # long the publish and the poll take on a loaded machine
    while swapped_at is None or len(served) - swapped_at < len(spots):
        assert time.monotonic() < give_up, f"no swap seen after {len(served)} requests"
        spot = spots[len(served) % len(spots)]
        try:
            served.append((spot, *await suggestion(client, uri, *spot)))
        except Exception as error:  # any failed request fails the test below
            failures.append(error)
        if publishing is None and len(served) == len(spots):
            # published from another thread while the stream goes on: never idle
            publishing = asyncio.create_task(
                asyncio.to_thread(
                    publish_adapter, settings_for(database), tiny_model_dir, "v1", seed=1
                )
            )
        if publishing is not None and publishing.done() and swapped_at is None:
            publishing.result()  # a failed publish fails the test here
            if (await serving(client))["adapter"] == "v1":
                swapped_at = len(served)
    assert publishing is not None
    await publishing
    assert failures == []

    ids = {cid for _, _, cid in served if cid}

    async def all_stored() -> list[Completion]:
        found = rows(database)
        return found if ids <= {row.id for row in found} else []

    stored = await until(all_stored)
    version_of = {row.id: row.adapter_version for row in stored}
    versions = [row.adapter_version for row in stored]
    switch = versions.index("v1")
    assert set(versions[:switch]) == {None} and set(versions[switch:]) == {"v1"}, versions
    assert {row.arm for row in stored} == {"active"}
    before = {spot: text for spot, text, cid in served if cid and version_of[cid] is None}
    after = {spot: text for spot, text, cid in served if cid and version_of[cid] == "v1"}
    assert len(after) == len(spots), "every position was asked again after the swap"
    assert before != after, "the adapter changes what is suggested"

    fresh = await start_server(env=env)
    assert await serving(fresh) == {"adapter": "v1", "canary": None}
    fresh_uri = open_document(fresh, sample_source(), "shlex.py")
    for spot in spots:
        assert await complete(fresh, fresh_uri, *spot) == after[spot], spot


async def test_corrupt_and_foreign_adapters_are_refused_and_the_old_one_serves(
    start_server: StartServer, tiny_model_dir: Path, database: str, tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = settings_for(database)
    publish_adapter(settings, tiny_model_dir, "v1", seed=1)
    env = {"GHOSTLOOP_DATABASE_URL": database, "GHOSTLOOP_ADAPTER_POLL_S": "0"}
    client = await start_server(env=env)
    assert await serving(client) == {"adapter": "v1", "canary": None}
    uri = open_document(client, sample_source(), "shlex.py")
    spots = positions(4)
    served = [await complete(client, uri, *spot) for spot in spots]

    corrupt = publish_adapter(settings, tiny_model_dir, "v2-corrupt", seed=2)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    reload = await client.protocol.send_request_async("ghostloop/reloadAdapters", None)
    assert reload.adapter == "v1"
    assert [r.version for r in reload.refused] == ["v2-corrupt"]
    assert "checksum" in reload.refused[0].reason

    narrower = AutoConfig.from_pretrained(tiny_model_dir)
    narrower.hidden_size, narrower.intermediate_size = 32, 64
    other = tmp_path / "other-model"
    AutoModelForCausalLM.from_config(narrower).save_pretrained(other)
    publish_adapter(settings, tiny_model_dir, "v3-foreign", seed=3, trained_for=other)
    reload = await client.protocol.send_request_async("ghostloop/reloadAdapters", None)
    assert reload.adapter == "v1"
    assert [r.version for r in reload.refused] == ["v2-corrupt", "v3-foreign"]
    assert "another base model" in reload.refused[1].reason

    assert [await complete(client, uri, *spot) for spot in spots] == served
    assert {row.adapter_version for row in rows(database)} == {"v1"}


def ghostloop(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "GHOSTLOOP_DATABASE_URL": database}
    return subprocess.run(
        [sys.executable, "-m", "ghostloop", "adapters", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_promote_and_rollback_reach_the_running_server_within_a_poll(
    start_server: StartServer, tiny_model_dir: Path, database: str
) -> None:
    settings = settings_for(database)
    publish_adapter(settings, tiny_model_dir, "v1", seed=1)
    publish_adapter(settings, tiny_model_dir, "v2", seed=2)
    client = await start_server(
        env={"GHOSTLOOP_DATABASE_URL": database, "GHOSTLOOP_ADAPTER_POLL_S": POLL}
    )
    assert await serving(client) == {"adapter": "v2", "canary": None}

    async def serves(version: str | None) -> bool:
        return (await serving(client))["adapter"] == version

    rolled = await asyncio.to_thread(ghostloop, database, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert await until(lambda: serves("v1"), timeout_s=5)
    promoted = await asyncio.to_thread(ghostloop, database, "promote", "v2")
    assert promoted.returncode == 0, promoted.stderr
    assert await until(lambda: serves("v2"), timeout_s=5)
    canary = await asyncio.to_thread(ghostloop, database, "canary", "v1", "--share", "0.3")
    assert canary.returncode == 0, canary.stderr

    async def canary_runs() -> bool:
        return (await serving(client))["canary"] == {"version": "v1", "share": 0.3}

    assert await until(canary_runs, timeout_s=5)
    checked = await asyncio.to_thread(ghostloop, database, "check")
    assert checked.returncode == 0, checked.stderr
    assert "canary v1: waiting for 200 settled completions per arm" in checked.stdout
    ended = await asyncio.to_thread(ghostloop, database, "rollback")
    assert ended.returncode == 0 and "v1 rolled back; v2 serves" in ended.stdout

    async def canary_ended() -> bool:
        # v2 served all along beside the canary: wait for the poll that drops the canary
        return await serving(client) == {"adapter": "v2", "canary": None}

    assert await until(canary_ended, timeout_s=5)
    after = await asyncio.to_thread(ghostloop, database, "check")
    assert after.returncode == 0 and after.stdout.strip() == "no canary is running"
    unknown = await asyncio.to_thread(ghostloop, database, "canary", "v9", "--share", "0.3")
    assert unknown.returncode == 1 and "no adapter version 'v9'" in unknown.stderr
    bad_share = await asyncio.to_thread(ghostloop, database, "canary", "v1", "--share", "1.5")
    assert bad_share.returncode == 1 and "between 0 and 1" in bad_share.stderr


def splitting_version(stem: str, users: list[str], share: float) -> str:
    """A version name whose canary draws at least two of ``users`` and leaves two."""
    for attempt in range(1000):
        version = f"{stem}-{attempt}"
        drawn = sum(arm_for(user, version, share) == "canary" for user in users)
        if 2 <= drawn <= len(users) - 2:
            return version
    raise AssertionError("no version splits the users")


async def work(client: LanguageClient, user: str, start: int, count: int, good_arm: str) -> None:
    """A developer who keeps the suggestions of ``good_arm`` and rejects the others."""
    for index in range(start, start + count):
        uri = open_document(client, function_text(index), f"{user}_{index}.py")
        result = await client.text_document_inline_completion_async(inline_params(uri, 2, 4))
        assert result is not None and result.items
        item = result.items[0]
        assert item.command is not None
        completion_id = item.command.arguments[0]
        status = await client.protocol.send_request_async("ghostloop/status", None)
        canary = status.canary
        arm = arm_for(user, canary.version, canary.share) if canary else "active"
        if arm == good_arm:
            await client.workspace_execute_command_async(
                types.ExecuteCommandParams(command="ghostloop.accept", arguments=[completion_id])
            )
            change(client, uri, 2, function_text(index) + str(item.insert_text))
        else:
            client.protocol.notify(
                "ghostloop/feedback", {"completionId": completion_id, "kind": "rejected"}
            )
            change(client, uri, 2, function_text(index) + TRUTH)


async def test_canary_promotes_the_arm_users_keep_and_rolls_back_the_one_they_reject(
    start_server: StartServer, tiny_model_dir: Path, empty_postgres_url: str
) -> None:
    """Six developers, one server each, one PostgreSQL: a canary the canary users like is
    promoted everywhere; the next one, which they reject, is rolled back."""
    database = empty_postgres_url
    settings = settings_for(database)
    users = [f"dev{i}" for i in range(6)]
    env = {
        "GHOSTLOOP_DATABASE_URL": database,
        "GHOSTLOOP_ADAPTER_POLL_S": POLL,
        "GHOSTLOOP_SURVIVAL_WINDOWS_S": SHORT_WINDOWS,
        "GHOSTLOOP_CANARY_MIN_COMPLETIONS": "24",
        "GHOSTLOOP_CANARY_MAX_COMPLETIONS": "48",
        "GHOSTLOOP_CANARY_CHECK_S": "0",
        "GHOSTLOOP_MAX_NEW_TOKENS": "8",
    }
    publish_adapter(settings, tiny_model_dir, "v1", seed=1)
    clients = await asyncio.gather(
        *(start_server(env=env, options={"user": user}) for user in users)
    )
    good = splitting_version("good", users, 0.5)
    publish_adapter(settings, tiny_model_dir, good, seed=2, canary_share=0.5)

    async def everyone(adapter: str, canary: str | None) -> bool:
        states = await asyncio.gather(*(serving(client) for client in clients))
        return all(
            s["adapter"] == adapter and (s["canary"] or {}).get("version") == canary for s in states
        )

    assert await until(lambda: everyone("v1", good), timeout_s=10)
    await asyncio.gather(
        *(work(client, user, 0, 12, "canary") for client, user in zip(clients, users, strict=True))
    )
    assert await until(lambda: everyone(good, None), timeout_s=30), "the canary is promoted"

    bad = splitting_version("bad", users, 0.5)
    publish_adapter(settings, tiny_model_dir, bad, seed=3, canary_share=0.5)
    assert await until(lambda: everyone(good, bad), timeout_s=10)
    await asyncio.gather(
        *(
            work(client, user, 100, 12, "active")
            for client, user in zip(clients, users, strict=True)
        )
    )
    assert await until(lambda: everyone(good, None), timeout_s=30), "the canary is rolled back"

    engine = open_engine(database)
    with Session(engine) as session:
        adapters = {row.version: row for row in session.scalars(select(AdapterVersion))}
        completions = list(session.scalars(select(Completion)))
    engine.dispose()
    assert adapters[good].status == "active"
    assert adapters[good].evidence["canary_decision"] == "promoted"
    assert adapters[good].evidence["canary_difference"][1] > 0
    assert adapters["v1"].status == "retired"
    assert adapters[bad].status == "rolled_back"
    assert adapters[bad].evidence["canary_difference"][2] < 0
    arms = adapters[bad].evidence["canary_arms"]
    assert arms["canary"]["chars_saved_per_completion"] == 0
    assert arms["active"]["chars_saved_per_completion"] > 0
    # sticky: a developer in a canary's share is served by it until its verdict, then by
    # the active adapter; the others never see it
    for user in users:
        mine = sorted((c for c in completions if c.user == user), key=lambda c: c.created_at)
        for canary, phase in ((good, range(0, 100)), (bad, range(100, 200))):
            arms = [c.arm for c in mine if int(c.path.split("_")[1].split(".")[0]) in phase]
            if arm_for(user, canary, 0.5) == "canary":
                assert arms[0] == "canary" and arms == sorted(arms, reverse=True), arms
            else:
                assert set(arms) == {"active"}, arms
