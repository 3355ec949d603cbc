"""Which adapter version serves: the adapters table, and the moves operators make on it.

Publishing adds a row as the active version (the one it replaces is retired), or as the
canary that a share of users gets while the rest stay on the active one; promote makes
any kept version active; rollback marks the canary (when one runs) or the active version
rolled back, and the active one before it serves again. Every running server follows the
table within its poll interval (lsp_server.adapter_watch).
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.schema import AdapterVersion


class AdapterStateError(ValueError):
    """A move the registry cannot make (unknown version, nothing to roll back to)."""


def versions(session: Session) -> list[AdapterVersion]:
    return list(session.scalars(select(AdapterVersion).order_by(AdapterVersion.id)))


def record(row: AdapterVersion) -> dict[str, Any]:
    """An adapter row as plain values (``ghostloop adapters list --json``, the dashboard)."""
    return {
        "version": row.version,
        "status": row.status,
        "base_model": row.base_model,
        "run": row.run_id,
        "canary_share": row.canary_share,
        "created_at": row.created_at.isoformat(),
        "status_changed_at": row.status_changed_at.isoformat(),
        "path": row.path,
        "checksum": row.checksum,
        "evidence": row.evidence,
    }


def active(session: Session, base_model: str | None = None) -> AdapterVersion | None:
    query = select(AdapterVersion).where(AdapterVersion.status == "active")
    if base_model is not None:
        query = query.where(AdapterVersion.base_model == base_model)
    return session.scalars(query.order_by(AdapterVersion.id.desc())).first()


def canary(session: Session, base_model: str | None = None) -> AdapterVersion | None:
    query = select(AdapterVersion).where(AdapterVersion.status == "canary")
    if base_model is not None:
        query = query.where(AdapterVersion.base_model == base_model)
    return session.scalars(query.order_by(AdapterVersion.id.desc())).first()


def _set(row: AdapterVersion, status: str, **evidence: Any) -> None:
    row.status = status
    row.status_changed_at = datetime.now(UTC)
    if evidence:
        row.evidence = {**(row.evidence or {}), **evidence}


def publish(
    session: Session,
    *,
    version: str,
    base_model: str,
    run_id: int | None,
    path: Path,
    checksum: str,
    evidence: dict[str, Any],
    canary_share: float = 0.0,
) -> AdapterVersion:
    """Add ``version`` for ``base_model``: active (the previous one retires), or with
    ``canary_share`` > 0 a canary beside the active one (a running canary is retired)."""
    if not 0.0 <= canary_share < 1.0:
        raise AdapterStateError(f"canary share {canary_share} must be in [0, 1)")
    replaced = canary(session, base_model) if canary_share else active(session, base_model)
    if replaced is not None:
        _set(replaced, "retired", replaced_by=version)
    row = AdapterVersion(
        version=version,
        base_model=base_model,
        run_id=run_id,
        path=str(path),
        checksum=checksum,
        status="canary" if canary_share else "active",
        canary_share=canary_share or None,
        evidence=evidence,
    )
    session.add(row)
    session.flush()
    return row


def _get(session: Session, version: str) -> AdapterVersion:
    row = session.scalars(select(AdapterVersion).where(AdapterVersion.version == version)).first()
    if row is None:
        known = ", ".join(v.version for v in versions(session)) or "none"
        raise AdapterStateError(f"no adapter version {version!r}; known versions: {known}")
    return row


def _servable(row: AdapterVersion) -> None:
    if not Path(row.path).is_dir():
        raise AdapterStateError(
            f"adapter {row.version} was pruned from {row.path}; it cannot serve"
        )


def promote(
    session: Session, version: str, *, by: str = "operator", **evidence: Any
) -> AdapterVersion:
    """Make ``version`` the active adapter; the one it replaces retires, a canary of it ends."""
    row = _get(session, version)
    _servable(row)
    others = select(AdapterVersion).where(
        AdapterVersion.base_model == row.base_model,
        AdapterVersion.status == "active",
        AdapterVersion.id != row.id,
    )
    for current in session.scalars(others):
        _set(current, "retired", replaced_by=version, by=by)
    running = canary(session, row.base_model)
    if running is not None and running.id != row.id:
        _set(running, "retired", replaced_by=version, by=by)
    _set(row, "active", promoted_by=by, **evidence)
    row.canary_share = None
    return row


def start_canary(session: Session, version: str, share: float) -> AdapterVersion:
    """Serve ``version`` to ``share`` of the users beside the active adapter."""
    if not 0.0 < share < 1.0:
        raise AdapterStateError(f"canary share {share} must be between 0 and 1 (exclusive)")
    row = _get(session, version)
    _servable(row)
    if row.status == "active":
        raise AdapterStateError(f"adapter {version} is already active; canary another version")
    running = canary(session, row.base_model)
    if running is not None and running.id != row.id:
        _set(running, "retired", replaced_by=version, by="operator")
    _set(row, "canary", canary_started_by="operator")
    row.canary_share = share
    return row


def end_canary(session: Session, row: AdapterVersion, status: str, **evidence: Any) -> None:
    """A canary's verdict: ``rolled_back`` (worse) or ``retired`` (no difference)."""
    _set(row, status, **evidence)
    row.canary_share = None


def rollback(
    session: Session, base_model: str | None = None, *, by: str = "operator", **evidence: Any
) -> tuple[AdapterVersion, str | None]:
    """The canary, when one runs, or else the active version is rolled back; after an
    active one the newest earlier version still on disk serves again (None: the base
    model serves). Returns (rolled back row, version now active)."""
    running = canary(session, base_model)
    if running is not None:
        end_canary(session, running, "rolled_back", by=by, **evidence)
        current = active(session, running.base_model)
        return running, current.version if current is not None else None
    current = active(session, base_model)
    if current is None:
        raise AdapterStateError("no active adapter to roll back; the base model is serving")
    _set(current, "rolled_back", by=by, **evidence)
    earlier = session.scalars(
        select(AdapterVersion)
        .where(
            AdapterVersion.base_model == current.base_model,
            AdapterVersion.id < current.id,
            AdapterVersion.status == "retired",
        )
        .order_by(AdapterVersion.id.desc())
    ).all()
    for row in earlier:
        if Path(row.path).is_dir():
            _set(row, "active", restored_after=current.version)
            return current, row.version
    return current, None


def prune(session: Session, keep: int) -> list[str]:
    """Delete the files of all but the newest ``keep`` versions (never the active one)."""
    removed = []
    rows = [r for r in versions(session) if Path(r.path).is_dir()]
    for row in rows[: max(0, len(rows) - keep)]:
        if row.status in ("active", "canary"):
            continue
        shutil.rmtree(row.path, ignore_errors=True)
        row.evidence = {**(row.evidence or {}), "files_deleted_at": datetime.now(UTC).isoformat()}
        removed.append(row.version)
    return removed
