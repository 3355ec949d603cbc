"""Who may see the dashboard: one token, made on first start and kept in the data dir
(mode 0600). A script sends it as ``Authorization: Bearer``; a browser logs in with it once
and then carries a session cookie derived from it. Every request without either gets 401.

A browser's state-changing POST must also carry the page's CSRF token and, when the
browser says where the request comes from (Origin or Referer), come from the dashboard
itself: the session cookie is sent on cross-port requests (localhost ports are one "site"
to SameSite), so the cookie alone proves nothing. Cookie and CSRF token are HMACs of the
token: replacing the token file logs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request

TOKEN_FILE = "admin-token"
COOKIE = "ghostloop_admin"
CSRF_FIELD = "csrf_token"


class TokenFileError(RuntimeError):
    """The token file exists but cannot be used; the message says how to fix it."""


def load_or_create_token(data_dir: Path) -> tuple[str, bool]:
    """The admin token and whether it was made just now (then it is shown once)."""
    path = data_dir / TOKEN_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < 16:
            raise TokenFileError(
                f"the admin token in {path} is empty or too short — delete the file and start "
                "'ghostloop admin serve' again to make a new one"
            ) from None
        return token, False
    token = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token, True


class Guard:
    """Checks requests against one token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self.session = self._mac("session")

    def _mac(self, purpose: str) -> str:
        return hmac.new(self._token, purpose.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.strip().encode(), self._token)

    def by_bearer(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value)

    def by_cookie(self, request: Request) -> bool:
        return hmac.compare_digest(request.cookies.get(COOKIE, ""), self.session)

    def csrf_token(self) -> str:
        return self._mac("csrf:" + self.session)

    def csrf_matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self.csrf_token().encode())


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source != "null"  # a sandboxed or privacy-stripped origin is not ours
    parts = urlsplit(source)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


def safe_next(path: str | None) -> str:
    """Where to go after logging in: only a path on this site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
