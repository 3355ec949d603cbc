"""The dashboard in a real browser (Debian's Chromium driven by Playwright) over a log a
real LSP session wrote, served by a real ``ghostloop admin serve`` process."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect
from sqlalchemy import select
from sqlalchemy.orm import Session

from evaluation.charts import chart
from evaluation.positions import Position
from evaluation.scoring import Scored
from evaluation.statistics import compare
from feedback.database import open_engine
from feedback.replays import format_lift, method_rows
from feedback.schema import AdapterVersion
from ghostloop.settings import Settings
from tests.e2e.conftest import StartServer
from tests.e2e.sessions import TYPED_INSTEAD, record_session
from tests.publishing import publish_adapter

CHROMIUM = os.environ.get("GHOSTLOOP_TEST_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, isolated_data_dir: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    return request.getfixturevalue("empty_postgres_url")


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"{CHROMIUM} is missing: 'make browser' installs Debian's chromium")
        pytest.skip(f"no Chromium at {CHROMIUM}: 'make browser' installs it")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        await browser.close()


class Dashboard:
    """``ghostloop admin serve`` as a subprocess on a free port."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "GHOSTLOOP_DATABASE_URL": database_url}
        env["GHOSTLOOP_DATA_DIR"] = str(data_dir)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ghostloop", "admin", "serve", "--port", str(self.port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        self.printed: list[str] = []
        for line in self.process.stdout:
            self.printed.append(line)
            if line.startswith("dashboard:"):
                break
        else:
            raise AssertionError("admin serve ended early:\n" + "".join(self.printed))
        self._wait_listening()

    def _wait_listening(self) -> None:
        for _ in range(200):
            try:
                httpx.get(self.url + "/login", timeout=1)
                return
            except httpx.TransportError:
                threading.Event().wait(0.05)
        raise AssertionError("the dashboard does not answer")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def dashboard_for(isolated_data_dir: Path) -> Iterator:
    started: list[Dashboard] = []

    def start(database_url: str) -> Dashboard:
        started.append(Dashboard(database_url, isolated_data_dir))
        return started[-1]

    yield start
    for dashboard in started:
        dashboard.stop()


def statuses(url: str) -> dict[str, str]:
    engine = open_engine(url)
    with Session(engine) as session:
        found = {a.version: a.status for a in session.scalars(select(AdapterVersion))}
    engine.dispose()
    return found


async def log_in(page: Page, dashboard: Dashboard, token: str) -> None:
    response = await page.goto(dashboard.url + "/")
    assert response is not None and response.status == 401
    await page.fill("input[name=token]", token)
    await page.click("button[type=submit]")
    await expect(page.locator("h1")).to_have_text("Is the assistant helping?")


async def test_admin_logs_in_reads_the_log_and_rolls_an_adapter_back(
    start_server: StartServer,
    database_url: str,
    isolated_data_dir: Path,
    tiny_model_dir: Path,
    browser: Browser,
    dashboard_for,
):
    alice = await record_session(start_server, user="alice", database_url=database_url)
    bob = await record_session(start_server, user="bob", database_url=database_url)
    settings = Settings.of(database_url=database_url, data_dir=isolated_data_dir)
    for index, version in enumerate(("v1", "v2")):
        publish_adapter(settings, tiny_model_dir, version, seed=index)
    assert statuses(database_url) == {"v1": "retired", "v2": "active"}

    dashboard = dashboard_for(database_url)
    token_file = isolated_data_dir / "admin-token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert any(token in line for line in dashboard.printed)  # shown once, at creation

    # no token, a wrong one: 401; the token as a bearer: the page
    assert httpx.get(dashboard.url + "/").status_code == 401
    assert httpx.get(dashboard.url + "/completions", headers=bearer("x" * 43)).status_code == 401
    assert httpx.get(dashboard.url + "/", headers=bearer(token)).status_code == 200

    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, dashboard, token)
    await expect(page.locator("#total-completions")).to_have_text("6")
    chart = page.locator("svg.chart").first
    await expect(chart).to_be_visible()
    assert await chart.locator("circle.point").count() >= 1  # today's point, from the session
    assert await chart.locator("polyline.series").first.get_attribute("data-series") == "base"
    point_title = await chart.locator("circle.point title").first.text_content() or ""
    kept_per_completion = (len(alice.kept_text) + len(bob.kept_text)) / 6
    assert point_title.endswith(f"{kept_per_completion:.2f}")

    await page.click("text=Completions")
    await expect(page.locator("tr.completion")).to_have_count(6)
    await page.fill("form.filters input[name=user]", "bob")
    await page.select_option("form.filters select[name=outcome]", "rejected")
    await page.click("#apply-filters")
    await expect(page.locator("#match-count")).to_have_text("1 completions match")
    await page.click("tr.completion a")
    await expect(page).to_have_url(re.compile(f"/completions/{bob.thrown}$"))
    await expect(page.locator("#outcome")).to_have_text("rejected")
    await expect(page.locator("#diff ins")).to_have_text(TYPED_INSTEAD)  # escaped: shown as text
    assert await page.locator("#diff b").count() == 0
    assert await page.locator("#events tr").count() == 3  # header, rejected, typed_instead

    await page.click("text=Adapters")
    await page.click("#rollback")
    await expect(page.locator(".notice")).to_have_text("v2 rolled back; v1 serves")
    assert statuses(database_url) == {"v1": "active", "v2": "rolled_back"}
    await expect(page.locator("tr[data-version=v2] .status")).to_have_text("rolled_back")
    await context.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class _Attacker(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        page = (
            f'<form id="f" method="post" action="{self.target}/adapters/promote">'
            '<input name="version" value="v1"><input name="csrf_token" value="guess"></form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: object) -> None:
        pass


async def test_a_cross_site_post_is_refused_and_changes_nothing(
    isolated_data_dir: Path, tiny_model_dir: Path, browser: Browser, dashboard_for
):
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    settings = Settings.of(database_url=url, data_dir=isolated_data_dir)
    for index, version in enumerate(("v1", "v2")):
        publish_adapter(settings, tiny_model_dir, version, seed=index)
    dashboard = dashboard_for(url)
    token = (isolated_data_dir / "admin-token").read_text().strip()
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, dashboard, token)  # the browser holds the session cookie

    _Attacker.target = dashboard.url
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        async with page.expect_response(f"{dashboard.url}/adapters/promote") as answer:
            await page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
        assert (await answer.value).status == 403
    finally:
        attacker.shutdown()
    assert statuses(url) == {"v1": "retired", "v2": "active"}

    # the dashboard's own form carries the page's CSRF token: that one goes through
    await page.goto(dashboard.url + "/adapters")
    await page.locator("tr[data-version=v1] button").click()
    await expect(page.locator(".notice")).to_have_text("v1 is active")
    assert statuses(url) == {"v1": "active", "v2": "retired"}
    await context.close()


def test_the_token_is_made_once_and_a_restart_keeps_it(isolated_data_dir: Path, dashboard_for):
    url = f"sqlite:///{isolated_data_dir / 'ghostloop.db'}"
    first = dashboard_for(url)
    token = (isolated_data_dir / "admin-token").read_text().strip()
    first.stop()
    second = dashboard_for(url)
    assert not any(token in line for line in second.printed)
    assert httpx.get(second.url + "/runs", headers=bearer(token)).status_code == 200
    # a browser without the cookie gets the login form, which returns it where it was going
    refused = httpx.get(second.url + "/completions?user=ana")
    assert refused.status_code == 401 and 'value="/completions?user=ana"' in refused.text
    missing = httpx.get(second.url + "/completions/" + "0" * 32, headers=bearer(token))
    assert missing.status_code == 404 and "no completion has id" in missing.text
    bad = httpx.get(second.url + "/completions?since=soon", headers=bearer(token))
    assert bad.status_code == 400 and "bad filter" in bad.text


def write_replay(data_dir: Path, name: str) -> dict:
    """A replay's stored report as ``ghostloop replay`` writes it, from the report's own code
    over 40 positions where the night saved 2 more characters at every line start."""
    positions = [
        Position(f"m.py:{i}:4", "m.py", i, 4, "line_start" if i % 2 else "mid_line", "x = 1")
        for i in range(40)
    ]
    before = [Scored(float(i % 5), i % 5 == 4, 12, False, 90.0, True, None) for i in range(40)]
    after = [
        Scored(s.chars_saved + 2 * (p.kind == "line_start"), s.exact, 12, False, 95.0, True, "v3")
        for s, p in zip(before, positions, strict=True)
    ]
    work = data_dir / "replays" / name
    work.mkdir(parents=True)
    result = {**compare(positions, before, after), "adapter": "v3", "gate_passed": False}
    report = {
        "before": result.pop("before"),
        "methods": {"sft": {**result, "message": "published v3 ungated", "seconds": 61.0}},
        "model": "tiny-llama",
        "backend": "torch",
        "gated": False,
        "split": {
            "seed": 3,
            "root": "/src/repo",
            "train_files": ["a.py"],
            "held_out_files": ["m.py"],
            "train_positions": 40,
            "held_out_positions": 40,
        },
        "reactions": {"baseline, held-out half": {"accepted": 12, "rejected": 28}},
        "seconds": 300.0,
    }
    passes = [("base model", report["before"]), ("sft: v3", result["after"])]
    report["chart"] = str(chart(passes, work / "report.png"))
    (work / "report.json").write_text(json.dumps(report))
    return report


async def test_a_replay_report_reads_in_full_in_the_browser(
    isolated_data_dir: Path, browser: Browser, dashboard_for
):
    report = write_replay(isolated_data_dir, "night-1")
    broken = isolated_data_dir / "replays" / "broken"
    broken.mkdir()
    (broken / "report.json").write_text('{"before": ')  # a report cut short by a full disk
    dashboard = dashboard_for(f"sqlite:///{isolated_data_dir / 'ghostloop.db'}")
    token = (isolated_data_dir / "admin-token").read_text().strip()
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, dashboard, token)

    rows = page.locator("#replays tr")
    await expect(rows.filter(has_text="broken").locator(".error")).to_contain_text(
        "is not a readable replay report"
    )
    lift = report["methods"]["sft"]["paired_lift"]["chars_saved_relative"]
    night = rows.filter(has_text="night-1")
    after = report["methods"]["sft"]["after"]["chars_saved_per_completion"]
    await expect(night).to_contain_text(f"sft: {after:.2f} ({lift[0] * 100:+.1f} %")
    await night.locator("a", has_text="night-1").click()
    await expect(page).to_have_url(re.compile("/replays/night-1$"))
    await expect(page.locator("h1")).to_contain_text("Replay night-1")
    await expect(page.locator("#replay-split")).to_contain_text(
        "tiny-llama, served with torch, over /src/repo: 1 files to train on (40 positions"
    )
    await expect(page.locator("#method-sft")).to_contain_text(f"{format_lift(lift)}")
    table = page.locator("table[data-method=sft]")
    for row in method_rows(report["before"], report["methods"]["sft"]):
        cells = table.locator("tr", has=page.locator(f"td:text-is('{row.label}')")).locator("td")
        await expect(cells).to_have_text([row.label, row.before, row.after, row.lift])
    line_start = table.locator("tr.part", has_text="line start (20)").locator("td").nth(3)
    await expect(line_start).to_have_text(re.compile(r"^\+2\.000 \[\+2\.000, \+2\.000\]$"))
    await expect(page.locator("#reactions")).to_contain_text("accepted 12, rejected 28")
    image = page.locator("#replay-chart")
    await expect(image).to_be_visible()
    assert await image.evaluate("img => img.complete && img.naturalWidth > 0")

    for path, status, words in (
        ("/replays/broken", 422, "is not a readable replay report"),
        ("/replays/night-2", 404, "no replay named 'night-2'"),
        ("/replays/no%20such", 404, "no replay named 'no such'"),
    ):
        answer = await page.goto(dashboard.url + path)
        assert answer is not None and answer.status == status, path
        await expect(page.locator(".error")).to_contain_text(words)
    await context.close()
    assert (broken / "report.json").read_text() == '{"before": '  # left as it was
