"""Which adapter version serves: the adapters table, and the moves operators make on it.

Publishing adds a row as the active version (the one it replaces is retired); promote
makes any kept version active; rollback marks the active version rolled back and
reactivates the one before it. The server follows the table (hot-swap issue).
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


def active(session: Session, base_model: str | None = None) -> AdapterVersion | None:
    query = select(AdapterVersion).where(AdapterVersion.status == "active")
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
) -> AdapterVersion:
    """Add ``version`` as the active adapter of ``base_model``; the previous one retires."""
    previous = active(session, base_model)
    if previous is not None:
        _set(previous, "retired", replaced_by=version)
    row = AdapterVersion(
        version=version,
        base_model=base_model,
        run_id=run_id,
        path=str(path),
        checksum=checksum,
        status="active",
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


def promote(session: Session, version: str) -> AdapterVersion:
    row = _get(session, version)
    if not Path(row.path).is_dir():
        raise AdapterStateError(f"adapter {version} was pruned from {row.path}; it cannot serve")
    current = active(session, row.base_model)
    if current is not None and current.id != row.id:
        _set(current, "retired", replaced_by=version, by="promote")
    _set(row, "active", promoted_by="operator")
    return row


def rollback(session: Session, base_model: str | None = None) -> tuple[AdapterVersion, str | None]:
    """The active version is rolled back; the newest earlier one still on disk serves again
    (None: the base model serves). Returns (rolled back row, version now active)."""
    current = active(session, base_model)
    if current is None:
        raise AdapterStateError("no active adapter to roll back; the base model is serving")
    _set(current, "rolled_back", by="operator")
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
