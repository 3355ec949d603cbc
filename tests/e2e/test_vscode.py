"""A real VS Code: code-server (editor-plugins/vscode/e2e) in Debian's Chromium driven by
Playwright, with the packaged extension starting the real server over stdio.

Type, see the ghost text, accept a word, accept all of the next suggestion, dismiss the
one after; the database then holds exactly those decisions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Page, async_playwright
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.database import open_engine
from feedback.schema import Completion, FeedbackEvent
from tests.e2e.conftest import LISTING
from tests.e2e.team_servers import tls_team_server

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = ROOT / "editor-plugins" / "vscode"
CODE_SERVER = EXTENSION / "e2e" / "node_modules" / ".bin" / "code-server"
VSIX = EXTENSION / "ghostloop.vsix"
CHROMIUM = "/usr/bin/chromium"
DECISIONS = ("accepted", "partial", "dismissed")


# Monaco draws each line as a positioned .view-line; the first line of ghost text is drawn
# inside it (.ghost-text-decoration), further lines in view zones outside .view-lines.
VISIBLE_TEXT = """() => [...document.querySelectorAll('.monaco-editor .view-lines .view-line')]
  .sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top))
  .map((line) => {
    const copy = line.cloneNode(true);
    copy.querySelectorAll('[class*="ghost-text"]').forEach((node) => node.remove());
    return copy.textContent;
  })
  .join('\\n')"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require(path: Path, how: str) -> None:
    if path.exists():
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{path} is missing: {how}")
    pytest.skip(f"{path} is missing: {how}")


@dataclass
class Editor:
    page: Page
    data_dir: Path
    workspace: Path

    async def text(self) -> str:
        """The document as the editor draws it, without the ghost text drawn inside it."""
        raw = await self.page.evaluate(VISIBLE_TEXT)
        return str(raw).replace("\u00a0", " ")

    async def ghost(self) -> str:
        ghost = self.page.locator(".ghost-text-decoration, .suggest-preview-text .ghost-text")
        await ghost.first.wait_for(state="visible", timeout=60_000)
        return (await ghost.first.inner_text()).replace("\u00a0", " ")

    async def changed(self, before: str, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = await self.text()
            if now != before:
                return now
            await asyncio.sleep(0.05)
        raise AssertionError(f"the editor text stayed {before!r}")

    async def run_command(self, title: str) -> None:
        await self.page.keyboard.press("F1")
        box = self.page.locator(".quick-input-widget input")
        await box.wait_for(state="visible")
        await box.fill(f">{title}")
        await self.page.locator(
            ".quick-input-list .monaco-list-row", has_text=title
        ).first.wait_for()
        await self.page.keyboard.press("Enter")


@pytest.fixture
def served_model(request: pytest.FixtureRequest, tiny_model_dir: Path) -> str:
    """The tiny random model; parametrize with "embedded" for SmolLM2 (real words)."""
    return "" if getattr(request, "param", "tiny") == "embedded" else str(tiny_model_dir)


@pytest.fixture
def user_settings(request: pytest.FixtureRequest) -> dict[str, object]:
    """Settings over the test's defaults; parametrize indirectly to change them."""
    return dict(getattr(request, "param", {}))


@pytest_asyncio.fixture
async def vscode(
    served_model: str, user_settings: dict[str, object], isolated_data_dir: Path, tmp_path: Path
) -> AsyncIterator[Editor]:
    async with editor_session(served_model, user_settings, isolated_data_dir, tmp_path) as editor:
        yield editor


@contextlib.asynccontextmanager
async def editor_session(
    served_model: str, user_settings: dict[str, object], isolated_data_dir: Path, tmp_path: Path
) -> AsyncIterator[Editor]:
    """code-server with the packaged extension installed, a browser on it, a workspace."""
    require(CODE_SERVER, "'make vscode' installs code-server and packages the extension")
    require(VSIX, "'make vscode' packages the extension")
    require(Path(CHROMIUM), "'make browser' installs Debian's chromium")
    home = tmp_path / "vscode"
    user_data, extensions, workspace = home / "user", home / "extensions", home / "workspace"
    for folder in (user_data / "User", extensions, workspace, home / "tmp"):
        folder.mkdir(parents=True)
    env = dict(os.environ, HOME=str(home), TMPDIR=str(home / "tmp"))
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        env[name] = str(home / name.lower())
    common = ["--user-data-dir", str(user_data), "--extensions-dir", str(extensions)]
    subprocess.run(
        [str(CODE_SERVER), *common, "--install-extension", str(VSIX)],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (user_data / "User" / "settings.json").write_text(
        json.dumps(
            {
                "workbench.startupEditor": "none",
                "workbench.tips.enabled": False,
                "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
                "editor.suggestOnTriggerCharacters": False,
                "editor.inlineSuggest.enabled": True,
                "security.workspace.trust.enabled": False,
                "extensions.autoUpdate": False,
                "ghostloop.server.command": sys.executable,
                "ghostloop.server.args": ["-m", "ghostloop", "serve"],
                "ghostloop.server.env": {
                    "GHOSTLOOP_MODEL": served_model,
                    "GHOSTLOOP_DEADLINE_MS": "120000",
                    "GHOSTLOOP_DATA_DIR": str(isolated_data_dir),
                },
                "ghostloop.debounceMs": 0,
                "ghostloop.serverOptions": {"maxNewTokens": 12},
                "ghostloop.trace.server": "messages",
                **user_settings,
            }
        )
    )
    (workspace / "example.py").write_text("def split(self, text):\n    return self.wor")
    port = free_port()
    config = home / "config.yaml"
    config.write_text("auth: none\n")
    log = (home / "code-server.log").open("w")
    process = subprocess.Popen(
        [
            str(CODE_SERVER),
            *common,
            "--config",
            str(config),
            "--auth",
            "none",
            "--bind-addr",
            f"127.0.0.1:{port}",
            "--disable-telemetry",
            "--disable-update-check",
            "--disable-workspace-trust",
            str(workspace),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: the extension host goes with it
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (home / "code-server.log").read_text()
            assert time.monotonic() < deadline, "code-server did not answer /healthz"
            await asyncio.sleep(0.2)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox"]
            )
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(f"{base}/?folder={workspace}")
            await page.locator(".monaco-workbench").wait_for(timeout=60_000)
            yield Editor(page, isolated_data_dir, workspace)
            await browser.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


async def at_the_end_of(editor: Editor, name: str) -> None:
    """Once the server is ready: open ``name`` and put the cursor at its end."""
    await ready(editor)
    await open_file(editor, name)
    await editor.page.locator(".monaco-editor textarea").first.focus()
    await editor.page.keyboard.press("Control+End")


async def ask(editor: Editor) -> str:
    """Ghostloop: Trigger a completion (alt+\\); the ghost text that comes."""
    await editor.page.keyboard.press("Alt+Backslash")
    return await editor.ghost()


async def take_a_suggestion(editor: Editor) -> None:
    """At the end of example.py, ask for a suggestion and take it whole (Tab)."""
    await at_the_end_of(editor, "example.py")
    await ask(editor)
    before = await editor.text()
    await editor.page.keyboard.press("Tab")
    await editor.changed(before)


async def open_file(editor: Editor, name: str) -> None:
    page = editor.page
    await page.keyboard.press("Control+P")
    box = page.locator(".quick-input-widget input")
    await box.wait_for(state="visible")
    await box.fill(name)
    await page.locator(".quick-input-list .monaco-list-row", has_text=name).first.wait_for()
    await page.keyboard.press("Enter")
    await page.locator(".monaco-editor .view-lines").first.wait_for()


async def ready(editor: Editor) -> None:
    """The status bar says model · adapter once the server answers ready."""
    status = editor.page.locator(".statusbar-item", has_text="· base")
    await status.first.wait_for(timeout=180_000)


async def disable(editor: Editor) -> None:
    """Ghostloop: Disable completions stops the server, which flushes what it recorded."""
    await editor.run_command("Ghostloop: Disable completions")
    off = editor.page.locator(".statusbar-item", has_text=re.compile("Ghostloop$"))
    await off.first.wait_for()


def decisions(data_dir: Path) -> tuple[list[FeedbackEvent], dict[str, Completion]]:
    engine = open_engine(f"sqlite:///{data_dir / 'ghostloop.db'}")
    with Session(engine) as session:
        events = list(session.scalars(select(FeedbackEvent).order_by(FeedbackEvent.created_at)))
        completions = {c.id: c for c in session.scalars(select(Completion))}
    engine.dispose()
    return events, completions


async def test_vscode_ghost_text_word_accept_full_accept_and_dismiss(vscode: Editor):
    page = vscode.page
    await at_the_end_of(vscode, "example.py")
    first = await ask(vscode)
    before = await vscode.text()
    await page.keyboard.press("Control+ArrowRight")  # the next word
    after_word = await vscode.changed(before)
    word = after_word[len(before) :] if after_word.startswith(before) else None
    assert word and (first.startswith(word) or word.startswith(first)), (after_word, first)

    second = await ask(vscode)
    before = await vscode.text()
    await page.keyboard.press("Tab")  # all of it
    after_tab = await vscode.changed(before)
    taken = after_tab[len(before) :]
    assert after_tab.startswith(before) and (taken.startswith(second) or second.startswith(taken))

    await ask(vscode)
    await page.keyboard.press("Escape")  # dismiss
    await page.locator(".ghost-text-decoration").first.wait_for(state="hidden")

    await disable(vscode)
    deadline = time.monotonic() + 30
    while True:
        events, completions = decisions(vscode.data_dir)
        decided = [e for e in events if e.kind in DECISIONS]
        if len(decided) >= 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)

    assert [e.kind for e in decided][1:] == ["accepted", "dismissed"], decided
    word_event, tab_event, _ = decided
    word_suggestion = completions[word_event.completion_id].suggestion
    assert word_event.accepted_length == len(word)
    assert word_event.kind == ("accepted" if len(word) == len(word_suggestion) else "partial")
    assert completions[tab_event.completion_id].suggestion.startswith(after_tab[len(before) :])
    # Every decided suggestion was reported shown first; nothing was decided twice.
    for event in decided:
        kinds = [e.kind for e in events if e.completion_id == event.completion_id]
        assert kinds[0] == "shown" and sum(k in DECISIONS for k in kinds) == 1, kinds
    assert {c.client_name for c in completions.values()} == {"code-server"}
    # Taken seconds before the server stopped, long before the first survival window: the
    # session's end measured what each accepted suggestion kept.
    for event in (word_event, tab_event):
        row = completions[event.completion_id]
        assert row.survival_ratio is not None and row.chars_saved is not None, row
    # The Ghostloop log: the server's lines at their level (a completion's is info, none of
    # a healthy session is an error), and the messages ghostloop.trace.server asked for.
    log = "".join(
        path.read_text(errors="replace")
        for path in (vscode.workspace.parent / "user" / "logs").rglob("*Ghostloop*.log")
    )
    assert re.search(r"\[info\].*completion_id=", log), log[-3000:]
    assert "[error]" not in log, log[-3000:]
    assert "Sending request 'textDocument/inlineCompletion" in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("served_model", ["embedded"], indirect=True)
async def test_vscode_word_accept_of_a_real_suggestion_is_partial(vscode: Editor):
    """SmolLM2 suggests real code with several words: ctrl+right takes one of them."""
    page = vscode.page
    (vscode.workspace / "listing.py").write_text(LISTING)
    await at_the_end_of(vscode, "listing.py")
    await ask(vscode)
    before = await vscode.text()
    await page.keyboard.press("Control+ArrowRight")
    after = await vscode.changed(before)
    word = after[len(before) :]
    assert after.startswith(before) and word.strip(), (before, after)
    await disable(vscode)
    events, completions = decisions(vscode.data_dir)
    taken = [e for e in events if e.kind in DECISIONS]
    assert len(taken) == 1, taken
    suggestion = completions[taken[0].completion_id].suggestion
    assert suggestion.startswith(word) and len(word) < len(suggestion), (word, suggestion)
    assert (taken[0].kind, taken[0].accepted_length) == ("partial", len(word))


@pytest.mark.parametrize(
    "user_settings", [{"ghostloop.server.command": "/nonexistent/ghostloop"}], indirect=True
)
async def test_vscode_says_when_the_server_cannot_start(vscode: Editor):
    page = vscode.page
    error = page.locator(".statusbar-item", has_text="Ghostloop")
    await page.locator(".notifications-toasts", has_text="could not start").wait_for(timeout=60_000)
    assert "/nonexistent/ghostloop" in await page.locator(".notifications-toasts").inner_text()
    label = await error.first.get_attribute("aria-label") or ""
    hover = await error.first.inner_html()
    assert "error" in (label + hover).lower(), (label, hover)


async def test_vscode_connects_to_a_shared_server_over_tcp(
    tcp_server: int, tmp_path: Path, isolated_data_dir: Path, served_model: str
):
    # The extension starts nothing: it connects to the address in its settings.
    settings = {"ghostloop.server.address": f"127.0.0.1:{tcp_server}"}
    async with editor_session(served_model, settings, isolated_data_dir, tmp_path) as vscode:
        await take_a_suggestion(vscode)
        await disable(vscode)
    deadline = time.monotonic() + 30
    while True:
        events, completions = decisions(isolated_data_dir)
        accepted = [e for e in events if e.kind == "accepted"]
        if accepted or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(accepted) == 1
    assert completions[accepted[0].completion_id].client_name == "code-server"


async def test_vscode_reaches_a_team_server_with_its_token_over_tls(
    tiny_model_dir: Path, tmp_path: Path, isolated_data_dir: Path, served_model: str
):
    """The token goes into VS Code's secret storage through 'Ghostloop: Set Server Token';
    the team server (TLS, tokens required) then serves and stores the work as its user."""
    server, token, ca = tls_team_server(tiny_model_dir, tmp_path, "erin")
    team_data = tmp_path / "team-data"
    settings = {
        "ghostloop.server.address": f"127.0.0.1:{server.port}",
        "ghostloop.server.tls": True,
        "ghostloop.server.caFile": str(ca),
    }
    try:
        async with editor_session(served_model, settings, isolated_data_dir, tmp_path) as vscode:
            page = vscode.page
            refusal = page.locator(".notifications-toasts", has_text="needs an access token")
            await refusal.first.wait_for(timeout=60_000)
            await vscode.run_command("Ghostloop: Set Server Token")
            box = page.locator(".quick-input-widget input")
            await box.wait_for(state="visible")
            await box.fill(token)
            await page.keyboard.press("Enter")
            await take_a_suggestion(vscode)
            await disable(vscode)
    finally:
        server.stop()
    events, completions = decisions(team_data)
    assert {c.user for c in completions.values()} == {"erin"}
    assert [e.kind for e in events if e.kind in DECISIONS] == ["accepted"]
    user_files = "".join(
        path.read_text(errors="replace") for path in (tmp_path / "vscode" / "user").rglob("*.json")
    )
    assert token not in user_files  # in secret storage, not in settings
