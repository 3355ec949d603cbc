"""The repository index on real directory trees: what it reads, what it skips and says
once, what a completion's query finds, and that the current document never answers."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from ghostloop.settings import Settings
from lsp_server.workspace import ChunkIndex, Workspace

HELPERS = '''def zorvex_shipping_surcharge_cents(order, season):
    """What a parcel costs on top in ``season``."""
    base = order.weight_grams // 100
    return base * SEASON_RATES[season]
'''


def crawled(root: Path | None, **settings: object) -> Workspace:
    workspace = Workspace(Settings.of(repo_context_tokens=256, **settings).context, root)
    workspace.start()
    deadline = time.monotonic() + 60
    while not workspace.crawled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert workspace.crawled
    return workspace


def indexed(workspace: Workspace) -> set[str]:
    return set(workspace.index._sources)


def settle(workspace: Workspace) -> None:
    """Let the background thread take the open documents' edits in."""
    workspace._wake.set()
    deadline = time.monotonic() + 10
    while workspace._dirty and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


def test_a_query_finds_the_chunk_that_defines_a_name_used_before_the_cursor(tmp_path: Path):
    (tmp_path / "shipping").mkdir()
    (tmp_path / "shipping" / "helpers.py").write_text(HELPERS)
    (tmp_path / "other.py").write_text("def unrelated():\n    return 1\n")
    workspace = crawled(tmp_path)
    prefix = "order = load()\ncost = zorvex_shipping_surcharge_cents(order, 'winter')\nx = "
    [best, *_] = workspace.snippets("file:///elsewhere/main.py", prefix, limit=3)
    assert (best.path, best.line) == ("shipping/helpers.py", 0)
    assert "SEASON_RATES[season]" in best.text
    # the line being typed is not part of the query: it does not move the snippets
    assert workspace.snippets("file:///x.py", "zorvex_shipping_surcharge_cents(", limit=3) == []
    workspace.stop()


def test_the_current_document_never_answers_its_own_query(tmp_path: Path):
    """The replay's rule: what follows the cursor is nowhere the retrieval can see; the
    current file (on disk or in the editor) is left out of its own query."""
    path = tmp_path / "current.py"
    path.write_text(HELPERS)
    workspace = crawled(tmp_path)
    uri = path.as_uri()
    workspace.opened(uri, HELPERS)
    settle(workspace)
    prefix = "cost = zorvex_shipping_surcharge_cents(order, season)\n"
    assert workspace.snippets(uri, prefix, limit=5) == []
    assert workspace.snippets("file:///another.py", prefix, limit=5)
    workspace.stop()


def test_open_documents_stand_for_their_files_until_closed(tmp_path: Path):
    # each query from another document: a document's own answer stays while its line does
    path = tmp_path / "notes.py"
    path.write_text("def on_disk_only_helper():\n    pass\n")
    workspace = crawled(tmp_path)
    uri = path.as_uri()
    query = "on_disk_only_helper()\nedited_in_the_editor_helper()\n"
    [found] = workspace.snippets("file:///q1.py", query, limit=5)
    assert "on_disk_only_helper" in found.text
    workspace.changed(uri, "def edited_in_the_editor_helper():\n    pass\n")
    settle(workspace)
    [found] = workspace.snippets("file:///q2.py", query, limit=5)
    assert "edited_in_the_editor_helper" in found.text
    workspace.closed(uri)
    settle(workspace)
    [found] = workspace.snippets("file:///q3.py", query, limit=5)
    assert "on_disk_only_helper" in found.text
    # a document with no file of the workspace: indexed while open, gone when closed
    workspace.opened("untitled:Untitled-1", "def scratch_pad_helper():\n    pass\n")
    settle(workspace)
    assert workspace.snippets("file:///q4.py", "scratch_pad_helper()\n", limit=5)
    workspace.closed("untitled:Untitled-1")
    settle(workspace)
    assert workspace.snippets("file:///q5.py", "scratch_pad_helper()\n", limit=5) == []
    workspace.stop()


def test_the_snippets_stay_while_the_developer_types_on_a_line(tmp_path: Path):
    """The query is the lines before the cursor line: typing on the line keeps the
    snippets (and the prompt's start, and its KV cache) even when the index changes
    meanwhile; a new line asks again."""
    (tmp_path / "helpers.py").write_text(HELPERS)
    workspace = crawled(tmp_path)
    uri = "file:///elsewhere/main.py"
    lines = "cost = zorvex_shipping_surcharge_cents(order, season)\n"
    first = workspace.snippets(uri, lines + "total = co", limit=3)
    assert first and "SEASON_RATES" in first[0].text
    workspace.opened((tmp_path / "helpers.py").as_uri(), "def zorvex_other():\n    pass\n")
    settle(workspace)
    assert workspace.snippets(uri, lines + "total = cost + zo", limit=3) == first
    again = workspace.snippets(uri, lines + "total = zorvex_other()\nx = ", limit=3)
    assert again and "zorvex_other" in again[0].text
    workspace.stop()


def test_gitignored_binary_huge_special_and_linked_files_are_skipped_once_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    (tmp_path / ".gitignore").write_text("build/\n*.log\n")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "out.py").write_text("generated = 1\n")
    (tmp_path / "debug.log").write_text("a log line\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / ".gitignore").write_text("secret_*.py\n")
    (tmp_path / "pkg" / "secret_keys.py").write_text("KEY = 1\n")
    (tmp_path / "pkg" / "kept.py").write_text("kept = 1\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "dep.js").write_text("x\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with (tmp_path / "huge.py").open("wb") as handle:  # 100 MB, sparse: never read
        handle.truncate(100 * 2**20)
    os.mkfifo(tmp_path / "pipe.py")  # reading it would block forever
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.py"
    outside.write_text("outside = 1\n")
    (tmp_path / "outside.py").symlink_to(outside)
    caplog.set_level(logging.INFO, logger="lsp_server.workspace")
    workspace = crawled(tmp_path)
    assert indexed(workspace) == {".gitignore", "pkg/.gitignore", "pkg/kept.py"}
    assert workspace.skipped == {
        "binary": 1,
        "larger than 512 KB": 1,
        "not a regular file": 1,
        "symbolic link": 1,
    }
    said = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(said) == 4, said
    workspace.stop()


def test_a_workspace_past_its_caps_indexes_what_fits_and_says_so(tmp_path: Path):
    many = tmp_path / "many"
    many.mkdir()
    for number in range(100_000):
        (many / f"f{number:06d}.py").write_text(f"value_{number} = {number}\n")
    started = time.monotonic()
    workspace = crawled(tmp_path, context_max_files=500)
    assert workspace.index.sources == 500
    assert workspace.skipped == {"more than 500 files": 1}
    assert time.monotonic() - started < 30
    workspace.stop()
    large = tmp_path / "large"
    large.mkdir()
    for number in range(40):
        (large / f"part{number:02d}.py").write_text(f"part_{number} = 1\n" * 5000)
    small = crawled(large, context_max_total_mb=1)
    assert 0 < small.index.characters <= 2**20
    assert list(small.skipped) == ["more than 1 MB in all"]
    small.stop()


def test_a_missing_root_a_file_deleted_meanwhile_and_no_root_change_nothing_else(
    tmp_path: Path,
):
    missing = crawled(tmp_path / "nowhere")
    assert missing.index.sources == 0 and missing.skipped == {"no such directory": 1}
    missing.opened("file:///a.py", "def still_indexed_when_open():\n    pass\n")
    settle(missing)
    assert missing.snippets("file:///b.py", "still_indexed_when_open()\n", limit=2)
    missing.stop()
    workspace = crawled(tmp_path)
    assert workspace._read(tmp_path / "deleted-meanwhile.py") is None
    assert workspace.skipped == {"FileNotFoundError": 1}
    workspace.stop()
    rootless = crawled(None)
    assert rootless.index.sources == 0 and rootless.skipped == {}
    rootless.stop()


def test_queries_fts5_cannot_parse_find_nothing_and_fail_nothing():
    index = ChunkIndex(4)
    index.put("a.py", 'def quoted_name():\n    return "x"\n')
    for query in ['"', "AND OR NOT", "NEAR(", "\0", "* ^ -", "x" * 10_000]:
        assert index.search(query, limit=3) == [] or query == "x" * 10_000
    assert index.search('quoted_name("', limit=3)
