"""The developer's repository in the prompt over a real LSP session: snippets of other
files under the client's root, as comment lines before the file's own text, stored with
the completion as sent; none of the current document; nothing without the setting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from lsprotocol import types
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.schema import Completion
from tests.e2e.conftest import StartServer, inline_params

HELPERS = '''def zorvex_shipping_surcharge_cents(order, season):
    """What a parcel costs on top in ``season``."""
    return order.weight_grams // 100 * SEASON_RATES[season]
'''
MAIN = """from shipping import zorvex_shipping_surcharge_cents

order = load_order()
total = zorvex_shipping_surcharge_cents(order, "winter")
print(total)
cost = """


async def complete_in(client, root: Path) -> types.InlineCompletionItem:
    uri = (root / "main.py").as_uri()
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(
                uri=uri, language_id="python", version=1, text=MAIN
            )
        )
    )
    line = MAIN.count("\n")
    result = await client.text_document_inline_completion_async(
        inline_params(uri, line, len(MAIN.rsplit("\n", 1)[1]))
    )
    assert result.items, "the tiny model writes something here"
    return result.items[0]


async def crawled(client, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.protocol.send_request_async("ghostloop/status", None)
        if status.repository.crawled or time.monotonic() > deadline:
            return status.repository
        await asyncio.sleep(0.05)


def stored_prompt(data_dir: Path, completion_id: str) -> Completion:
    engine = open_engine(f"sqlite:///{data_dir / 'ghostloop.db'}")
    with Session(engine) as session:
        row = session.scalars(select(Completion).where(Completion.id == completion_id)).one()
        session.expunge(row)
    engine.dispose()
    return row


async def test_snippets_of_the_repository_are_sent_and_stored_with_the_completion(
    start_server: StartServer, tmp_path: Path, isolated_data_dir: Path
):
    root = tmp_path / "repo"
    (root / "shipping").mkdir(parents=True)
    (root / "shipping" / "__init__.py").write_text(HELPERS)
    (root / "main.py").write_text(MAIN + "zorvex_secret_rest_of_the_line(order)\n")
    client = await start_server(
        env={"GHOSTLOOP_REPO_CONTEXT_TOKENS": "200"}, root_uri=root.as_uri()
    )
    repository = await crawled(client)
    assert (repository.root, repository.files) == (str(root.resolve()), 2)
    item = await complete_in(client, root)
    await client.shutdown_session()  # the recorder flushes before the answer
    row = stored_prompt(isolated_data_dir, item.command.arguments[0])
    assert row.prompt_repository.startswith("# Path: shipping/__init__.py\n")
    assert "# def zorvex_shipping_surcharge_cents(order, season):" in row.prompt_repository
    # the current document's own file never answers: its rest of the line stays unseen
    assert "zorvex_secret_rest_of_the_line" not in row.prompt_repository
    assert row.prompt_prefix.endswith("cost = ")


async def test_without_the_setting_nothing_is_indexed_or_sent(
    start_server: StartServer, tmp_path: Path, isolated_data_dir: Path
):
    root = tmp_path / "repo"
    (root / "shipping").mkdir(parents=True)
    (root / "shipping" / "__init__.py").write_text(HELPERS)
    client = await start_server(root_uri=root.as_uri())
    status = await client.protocol.send_request_async("ghostloop/status", None)
    assert not hasattr(status, "repository")
    item = await complete_in(client, root)
    await client.shutdown_session()
    assert stored_prompt(isolated_data_dir, item.command.arguments[0]).prompt_repository == ""


async def test_a_root_that_does_not_exist_leaves_completions_as_they_were(
    start_server: StartServer, tmp_path: Path
):
    client = await start_server(
        env={"GHOSTLOOP_REPO_CONTEXT_TOKENS": "200"},
        root_uri=(tmp_path / "gone").as_uri(),
    )
    repository = await crawled(client)
    assert repository.files == 0
    [skipped] = repository.skipped
    assert (skipped.reason, skipped.files) == ("no such directory", 1)
    await complete_in(client, tmp_path)
