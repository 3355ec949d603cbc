"""A canary's planned looks on a real store: it waits for data, continues when the arms
are alike, is retired after its last look, and its verdict is applied once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from feedback import adapter_rows, canary
from feedback.database import upgrade
from feedback.schema import AdapterVersion, Completion, FeedbackEvent

USERS = [f"dev{i}" for i in range(8)]


def publish(session: Session, tmp_path: Path, version: str, share: float) -> AdapterVersion:
    path = tmp_path / version
    path.mkdir()
    return adapter_rows.publish(
        session,
        version=version,
        base_model="m",
        run_id=None,
        path=path,
        checksum="0" * 64,
        evidence={},
        canary_share=share,
    )


def serve(session: Session, row: AdapterVersion, per_user: int, accepted_chars: int) -> None:
    """Each user gets ``per_user`` completions on their arm; every other one is accepted
    with ``accepted_chars`` kept for 2 min, the rest rejected: both arms alike."""
    start = datetime.now(UTC) + timedelta(seconds=1)
    for user in USERS:
        arm = canary.arm_for(user, row.version, float(row.canary_share or 0))
        for index in range(per_user):
            completion_id = uuid.uuid4().hex
            accepted = index % 2 == 0
            session.add(
                Completion(
                    id=completion_id,
                    created_at=start + timedelta(milliseconds=index),
                    user=user,
                    base_model="m",
                    adapter_version=row.version if arm == "canary" else "v1",
                    arm=arm,
                    suggestion="x" * accepted_chars,
                    latency_ms=1.0,
                    outcome="accepted" if accepted else "rejected",
                    accepted_length=accepted_chars if accepted else None,
                )
            )
            session.flush()
            if accepted:
                session.add(
                    FeedbackEvent(
                        id=uuid.uuid4().hex,
                        completion_id=completion_id,
                        kind="survival",
                        window_s=120.0,
                        survival_ratio=1.0,
                        text="x" * accepted_chars,
                    )
                )
    session.commit()


def test_alike_arms_continue_then_retire_and_the_active_adapter_stays(
    engine: Engine, tmp_path: Path
) -> None:
    upgrade(engine)
    looks = {"min_completions": 20, "max_completions": 40, "confidence": 0.95}
    with Session(engine, expire_on_commit=False) as session:
        publish(session, tmp_path, "v1", 0.0)
        row = publish(session, tmp_path, "c1", 0.5)
        session.commit()
        assert {canary.arm_for(u, "c1", 0.5) for u in USERS} == {"active", "canary"}

        serve(session, row, per_user=2, accepted_chars=10)  # 16 settled in all: too few
        verdict = canary.check(session, "m", **looks)
        assert verdict is not None and verdict.decision == "wait"

        serve(session, row, per_user=6, accepted_chars=10)
        verdict = canary.check(session, "m", **looks)
        assert verdict is not None and verdict.decision == "continue", verdict
        assert verdict.look == 1 and verdict.looks == 2 and verdict.level == 0.975
        estimate, low, high = verdict.difference
        assert estimate == 0 and low < 0 < high
        assert canary.check(session, "m", **looks).decision == "wait"  # look 1 is done

        serve(session, row, per_user=8, accepted_chars=10)
        verdict = canary.check(session, "m", **looks)
        assert verdict is not None and verdict.decision == "retired", verdict

    with Session(engine) as session:
        retired = session.scalars(
            select(AdapterVersion).where(AdapterVersion.version == "c1")
        ).one()
        assert retired.status == "retired" and retired.canary_share is None
        assert retired.evidence["canary_decision"] == "retired"
        assert retired.evidence["canary_arms"]["canary"]["chars_saved_per_completion"] == 5.0
        assert adapter_rows.active(session, "m").version == "v1"
        assert adapter_rows.canary(session, "m") is None
        assert canary.check(session, "m", **looks) is None  # nothing left to judge
