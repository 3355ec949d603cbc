"""Access tokens for the team server: made, listed and revoked by ``ghostloop users``,
checked by ``ghostloop serve --tcp`` when a client connects.

A token is 32 random bytes (``secrets``), so one SHA-256 digest is enough to store it: a
slow password hash defends guessable secrets, and these cannot be guessed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from feedback.schema import AccessToken

PREFIX = "glt_"


class TokenError(ValueError):
    """A ``ghostloop users`` request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class TokenInfo:
    """A token as ``ghostloop users list`` shows it (never the token itself)."""

    id: str
    user: str
    created_at: datetime
    revoked_at: datetime | None
    note: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_user(user: str) -> str:
    user = user.strip()
    if not user or len(user) > 200 or any(ch.isspace() or not ch.isprintable() for ch in user):
        raise TokenError(f"user names are 1-200 printable characters without spaces, got {user!r}")
    return user


def add_token(engine: Engine, user: str, note: str = "") -> tuple[TokenInfo, str]:
    """A new token for ``user``; the token string is returned here and never again."""
    user = _check_user(user)
    token = PREFIX + secrets.token_urlsafe(32)
    row = AccessToken(
        id=secrets.token_hex(4),
        user=user,
        token_sha256=digest(token),
        created_at=datetime.now(UTC),
        note=note,
    )
    info = _info(row)
    with Session(engine) as session, session.begin():
        session.add(row)
    return info, token


def list_tokens(engine: Engine, *, include_revoked: bool = False) -> list[TokenInfo]:
    with Session(engine) as session:
        query = select(AccessToken).order_by(AccessToken.user, AccessToken.created_at)
        if not include_revoked:
            query = query.where(AccessToken.revoked_at.is_(None))
        return [_info(row) for row in session.scalars(query)]


def revoke(engine: Engine, who: str) -> list[TokenInfo]:
    """Revoke the token with id ``who``, or every active token of the user ``who``."""
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        rows = list(
            session.scalars(
                select(AccessToken).where(
                    (AccessToken.id == who) | (AccessToken.user == who),
                    AccessToken.revoked_at.is_(None),
                )
            )
        )
        if not rows:
            raise TokenError(
                f"no active token has the id or user {who!r}; `ghostloop users list` shows them"
            )
        session.execute(
            update(AccessToken)
            .where(AccessToken.id.in_([row.id for row in rows]))
            .values(revoked_at=now)
        )
        return [_info(row) for row in rows]


def user_for(engine: Engine, token: str) -> str | None:
    """The user an active ``token`` belongs to, None for an unknown or revoked one."""
    return user_for_digest(engine, digest(token))


def user_for_digest(engine: Engine, wanted: str) -> str | None:
    """``user_for`` by the token's digest (what a server keeps of a connection's token)."""
    with Session(engine) as session:
        row = session.scalars(
            select(AccessToken).where(
                AccessToken.token_sha256 == wanted, AccessToken.revoked_at.is_(None)
            )
        ).first()
    # the database compared digests; compare again in constant time all the same
    if row is None or not hmac.compare_digest(row.token_sha256, wanted):
        return None
    return row.user


def any_active(engine: Engine) -> bool:
    with Session(engine) as session:
        return (
            session.scalars(
                select(AccessToken.id).where(AccessToken.revoked_at.is_(None)).limit(1)
            ).first()
            is not None
        )


def _info(row: AccessToken) -> TokenInfo:
    return TokenInfo(row.id, row.user, row.created_at, row.revoked_at, row.note)
