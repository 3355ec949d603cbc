"""The dashboard's guard and charts as plain functions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from starlette.requests import Request

from feedback.admin_web.auth import (
    Guard,
    TokenFileError,
    load_or_create_token,
    safe_next,
    same_origin,
)
from feedback.admin_web.charts import line_chart


def request(headers: dict[str, str], host: str = "127.0.0.1:8765") -> Request:
    raw = [(b"host", host.encode())] + [(k.encode(), v.encode()) for k, v in headers.items()]
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/",
            "headers": raw,
            "scheme": "http",
            "server": ("127.0.0.1", 8765),
            "query_string": b"",
        }
    )


def test_token_is_made_once_private_and_read_back(tmp_path: Path):
    token, created = load_or_create_token(tmp_path)
    assert created and len(token) >= 32
    assert stat.S_IMODE((tmp_path / "admin-token").stat().st_mode) == 0o600
    assert load_or_create_token(tmp_path) == (token, False)


def test_an_empty_token_file_is_refused_with_what_to_do(tmp_path: Path):
    (tmp_path / "admin-token").write_text("\n")
    with pytest.raises(TokenFileError, match="delete the file"):
        load_or_create_token(tmp_path)


def test_bearer_and_cookie_match_only_the_token():
    guard = Guard("s3cret-token-of-enough-length")
    assert guard.by_bearer(request({"authorization": "Bearer s3cret-token-of-enough-length"}))
    assert not guard.by_bearer(request({"authorization": "Bearer s3cret"}))
    assert not guard.by_bearer(request({"authorization": "Basic s3cret-token-of-enough-length"}))
    assert guard.by_cookie(request({"cookie": f"ghostloop_admin={guard.session}"}))
    assert not guard.by_cookie(request({"cookie": "ghostloop_admin=forged"}))
    assert guard.session != "s3cret-token-of-enough-length"  # the cookie is not the token
    assert guard.csrf_matches(guard.csrf_token()) and not guard.csrf_matches("guess")
    assert Guard("another-token-of-enough-length").csrf_token() != guard.csrf_token()


def test_only_this_origin_may_post():
    assert same_origin(request({"origin": "http://127.0.0.1:8765"}))
    assert same_origin(request({"referer": "http://127.0.0.1:8765/adapters"}))
    assert same_origin(request({}))  # no browser said otherwise: a script or curl
    assert not same_origin(request({"origin": "http://127.0.0.1:9999"}))  # another port
    assert not same_origin(request({"origin": "http://evil.example"}))
    assert not same_origin(request({"origin": "null"}))


def test_after_login_only_local_paths_are_followed():
    assert safe_next("/completions?user=a") == "/completions?user=a"
    for hostile in ("https://evil.example/", "//evil.example/", "/\\evil.example", "", None):
        assert safe_next(hostile) == "/"


def test_chart_escapes_names_and_draws_one_point_per_value():
    svg = str(
        line_chart(
            {
                "<script>x</script>": [
                    ("2026-11-20", 1.0),
                    ("2026-11-21", None),
                    ("2026-11-22", 3.0),
                ]
            },
            title="t & u",
        )
    )
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "t &amp; u" in svg
    assert svg.count('<circle class="point"') == 2
    assert "no data yet" in str(line_chart({}, title="empty"))


def test_percentiles_exact_and_from_the_histogram_agree_within_two_percent():
    import math
    import random
    from collections import Counter

    import numpy as np

    from feedback.stats import BUCKETS_PER_E, _Cell

    rng = random.Random(3)
    latencies = [rng.lognormvariate(5.3, 0.6) for _ in range(5000)]
    exact = _Cell(exact=list(latencies))
    histogram = _Cell(histogram=Counter(math.floor(math.log(v) * BUCKETS_PER_E) for v in latencies))
    for share in (0.5, 0.95):
        truth = float(np.percentile(latencies, share * 100))
        assert exact.percentile(share) == pytest.approx(truth, rel=1e-9)
        assert histogram.percentile(share) == pytest.approx(truth, rel=0.02)
    assert _Cell().percentile(0.5) is None


def test_completions_pages_hold_fifty_rows_each_newest_first(tmp_path: Path):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy.orm import Session
    from starlette.testclient import TestClient

    from feedback.admin_web.app import create_app
    from feedback.database import open_engine, upgrade
    from feedback.schema import Completion

    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    upgrade(engine)
    start = datetime(2026, 11, 20, tzinfo=UTC)
    with Session(engine) as session, session.begin():
        for index in range(55):
            session.add(
                Completion(
                    id=f"{index:032d}",
                    created_at=start + timedelta(minutes=index),
                    user="ana",
                    base_model="m",
                    suggestion="x",
                    latency_ms=1.0,
                )
            )
    client = TestClient(create_app(engine, "t" * 32, tmp_path))
    client.headers["Authorization"] = "Bearer " + "t" * 32
    first, second = (client.get(f"/completions?page={n}").text for n in (1, 2))
    assert first.count('class="completion"') == 50 and f"/completions/{54:032d}" in first
    assert second.count('class="completion"') == 5 and f"/completions/{0:032d}" in second
    assert f"/completions/{4:032d}" in second and f"/completions/{5:032d}" not in second
