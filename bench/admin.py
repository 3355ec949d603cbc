"""How fast the admin views answer over a team's log: 1 million completion rows in
PostgreSQL (30 days, 50 users, 4 adapters, 5 languages), then ``ghostloop stats`` and the
dashboard's overview page, timed. Prints medians of repeated runs.

    python bench/admin.py [--rows 1000000] [--url postgresql://postgres@127.0.0.1/test]
                          [--repeat 5] [--keep]

A fresh database is made beside the one in --url (its name ends in _bench) and dropped
afterwards unless --keep. Goal: stats and the overview under 1 s each.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from feedback import stats
from feedback.admin_web.app import create_app
from feedback.database import open_engine, upgrade
from feedback.logs import LogFilter

USERS = [f"dev{index:02d}" for index in range(50)]
LANGUAGES = ["python", "typescript", "go", "rust", "java"]
ADAPTERS = [None, "2026-11-01-sft", "2026-11-08-sft", "2026-11-15-dpo"]
OUTCOMES = ["accepted"] * 25 + ["partial"] * 5 + ["rejected"] * 45 + ["dismissed"] * 15
OUTCOMES += ["shown"] * 5 + ["pending"] * 5
COLUMNS = (
    'id, created_at, "user", client_name, client_version, language, path, base_model, '
    "adapter_version, template, prompt_prefix, prompt_suffix, suggestion, multiline, "
    "latency_ms, prompt_tokens, generated_tokens, stop_reason, redactions, outcome, "
    "accepted_length, survival_window_s, survival_ratio, chars_saved"
)


def make_database(url: str) -> str:
    base = make_url(url)
    name = f"{base.database}_{uuid.uuid4().hex[:6]}_bench"
    admin = create_engine(base.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    target = make_url(url)
    admin = create_engine(
        target.set(drivername="postgresql+psycopg", database="postgres"),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)'))
    admin.dispose()


def rows(start: int, count: int, total: int, now: datetime) -> io.StringIO:
    """Rows ``start`` to ``start + count`` of ``total`` completions as COPY text, spread
    evenly over the last 30 days (row 0 is the newest)."""
    rng = random.Random(start)
    buffer = io.StringIO()
    span_s = 30 * 86400
    for index in range(start, start + count):
        created = now - timedelta(seconds=span_s * index / total + rng.random())
        outcome = rng.choice(OUTCOMES)
        suggestion = "x" * rng.randint(8, 80)
        accepted = len(suggestion) if outcome == "accepted" else None
        if outcome == "partial":
            accepted = rng.randint(1, len(suggestion))
        ratio = round(rng.random(), 3) if accepted else None
        saved = round(accepted * ratio) if accepted and ratio is not None else None
        if outcome in ("rejected", "dismissed"):
            saved = 0
        adapter = ADAPTERS[3 - min(3, int(4 * index / total))]  # newest rows, newest adapter
        values = [
            uuid.UUID(int=rng.getrandbits(128)).hex,
            created.isoformat(),
            rng.choice(USERS),
            "vscode",
            "1.96",
            rng.choice(LANGUAGES),
            "src/module.py",
            "SmolLM2-135M-Instruct",
            adapter,
            "prefix-only",
            "def f(x):\\n    ",
            "",
            suggestion,
            "f",
            f"{rng.lognormvariate(5.3, 0.4):.1f}",
            "200",
            "12",
            "stop",
            "0",
            outcome,
            accepted,
            120.0 if ratio is not None else None,
            ratio,
            saved,
        ]
        buffer.write("\t".join("\\N" if v is None else str(v) for v in values) + "\n")
    buffer.seek(0)
    return buffer


def fill(url: str, count: int) -> float:
    engine = open_engine(url)
    upgrade(engine)
    started = time.perf_counter()
    now = datetime.now(UTC)
    chunk = 100_000
    with engine.begin() as connection:
        cursor = connection.connection.cursor()
        for start in range(0, count, chunk):
            data = rows(start, min(chunk, count - start), count, now)
            with cursor.copy(f"COPY completions ({COLUMNS}) FROM STDIN") as copy:
                while block := data.read(1 << 20):
                    copy.write(block)
            print(f"  {start + chunk:>9,} rows", file=sys.stderr, end="\r")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE completions"))
    engine.dispose()
    return time.perf_counter() - started


def timed(work, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args()

    url = make_database(args.url)
    print(f"database: {make_url(url).database}; filling {args.rows:,} completions ...")
    try:
        seconds = fill(url, args.rows)
        print(f"filled in {seconds:.1f} s (COPY + VACUUM ANALYZE)")
        engine = open_engine(url)
        everything = LogFilter()
        last_week = LogFilter(since=datetime.now(UTC) - timedelta(days=7))
        print(f"\n{'query':44} {'median':>9} {'groups':>7}")
        for title, by, where in (
            ("stats --by day (30 days)", ("day",), everything),
            ("stats --by adapter", ("adapter",), everything),
            ("stats --by language", ("language",), everything),
            ("stats --by user", ("user",), everything),
            ("stats --by day,adapter", ("day", "adapter"), everything),
            ("stats --by user --since 7d", ("user",), last_week),
        ):

            def run(by: tuple[str, ...] = by, where: LogFilter = where) -> list:
                with Session(engine) as session:
                    return stats.stats(session=session, by=by, where=where)

            median, result = timed(run, args.repeat)
            print(f"{title:44} {median * 1000:7.0f} ms {len(result):7}")  # type: ignore[arg-type]

        env = {**os.environ, "GHOSTLOOP_DATABASE_URL": url, "COLUMNS": "160"}
        command = [sys.executable, "-m", "ghostloop", "stats", "--by", "day"]
        median, _ = timed(
            lambda: subprocess.run(command, env=env, check=True, capture_output=True), 3
        )
        print(f"{'ghostloop stats (whole process, incl. start)':44} {median * 1000:7.0f} ms")

        port = 8911
        app = create_app(engine, "b" * 32, Path("/nonexistent"))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        headers = {"Authorization": "Bearer " + "b" * 32}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as http:
            for title, path in (
                ("overview page (30 days, 4 charts)", "/"),
                ("completions page (newest 50)", "/completions"),
                ("completions page, user + outcome", "/completions?user=dev07&outcome=accepted"),
            ):

                def fetch(path: str = path) -> int:
                    response = http.get(path, timeout=60)
                    response.raise_for_status()
                    return len(response.content)

                median, size = timed(fetch, args.repeat)
                print(f"{title:44} {median * 1000:7.0f} ms {size:>7} bytes")
        server.should_exit = True
        engine.dispose()
    finally:
        if not args.keep:
            drop_database(url)


if __name__ == "__main__":
    main()
