"""The canary: a share of users gets the new adapter, and their work decides its fate.

Arms are per user and sticky (a hash of user and canary version), so a developer sees
one arm for the whole canary and completions within an arm are clustered by user. Each
completion is worth its characters saved (retained characters after the survival window
nearest two minutes, 0 for a reject): survival-weighted acceptance counted in characters,
never a ratio a shorter suggestion can raise. The arms are compared with a two-level
bootstrap (users, then each user's completions) of the difference in mean characters
saved, which respects the clustering.

Looks are planned, not continuous: the canary is tested each time its smaller arm has
another ``min_completions`` settled completions, at most ``max_completions //
min_completions`` times, each at a Bonferroni-corrected level so that peeking does not
inflate the error rate. Significantly better: promoted. Significantly worse: rolled back.
No difference by the last look: retired, the active adapter keeps serving. The evidence
goes on the adapter's row.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from feedback import adapter_rows
from feedback.bootstrap import ROUNDS, clustered_means, interval
from feedback.metrics import kept_check, settled_chars_saved
from feedback.schema import AdapterVersion, Completion, FeedbackEvent
from feedback.store import events_by_completion

log = logging.getLogger(__name__)

ARMS = ("active", "canary")


def arm_for(user: str, canary_version: str | None, share: float) -> str:
    """``canary`` for a sticky ``share`` of users, ``active`` for the rest."""
    if canary_version is None or share <= 0:
        return "active"
    digest = hashlib.sha256(f"{canary_version}\0{user}".encode()).digest()
    return "canary" if int.from_bytes(digest[:8], "big") / 2**64 < share else "active"


def chars_saved(completion: Completion, events: Sequence[FeedbackEvent]) -> int | None:
    """Characters the completion saved; None while its fate is not settled."""
    check = kept_check(events)
    ratio = None if check is None else check.survival_ratio
    return settled_chars_saved(completion.outcome, completion.accepted_length, ratio)


@dataclass(frozen=True)
class ArmFigures:
    completions: int
    users: int
    chars_saved_per_completion: float
    acceptance: float  # accepted or partly accepted, of settled completions
    survival_weighted_acceptance: float  # retained / suggested characters: reported only


@dataclass(frozen=True)
class CanaryVerdict:
    version: str
    decision: str  # "wait" | "continue" | "promoted" | "rolled_back" | "retired"
    look: int
    looks: int
    level: float  # two-sided confidence of this look's interval
    difference: list[float]  # canary - active chars saved per completion: [estimate, low, high]
    arms: dict[str, ArmFigures]

    def evidence(self) -> dict[str, Any]:
        return {
            "canary_decision": self.decision,
            "canary_look": self.look,
            "canary_looks": self.looks,
            "canary_level": self.level,
            "canary_difference": self.difference,
            "canary_arms": {arm: asdict(figures) for arm, figures in self.arms.items()},
            "canary_checked_at": datetime.now(UTC).isoformat(),
        }


def _arm_values(
    session: Session, row: AdapterVersion
) -> tuple[dict[str, dict[str, list[int]]], dict[str, list[tuple[int, int, bool]]]]:
    """Per arm, per user: characters saved of each settled completion served since the
    canary began; and (suggested, saved, accepted) for the reported figures."""
    since = row.status_changed_at
    query = select(Completion).where(
        Completion.base_model == row.base_model,
        Completion.created_at >= since,
        Completion.arm.in_(ARMS),
    )
    completions = list(session.scalars(query))
    events = events_by_completion(session=session, completion_ids=[c.id for c in completions])
    values: dict[str, dict[str, list[int]]] = {arm: defaultdict(list) for arm in ARMS}
    details: dict[str, list[tuple[int, int, bool]]] = {arm: [] for arm in ARMS}
    for completion in completions:
        arm = completion.arm or "active"
        if arm == "canary" and completion.adapter_version != row.version:
            continue  # an earlier canary's arm
        saved = chars_saved(completion, events[completion.id])
        if saved is None:
            continue
        values[arm][completion.user].append(saved)
        accepted = completion.outcome in ("accepted", "partial")
        details[arm].append((len(completion.suggestion), saved, accepted))
    return values, details


def _figures(by_user: dict[str, list[int]], details: list[tuple[int, int, bool]]) -> ArmFigures:
    count = sum(len(v) for v in by_user.values())
    saved = sum(sum(v) for v in by_user.values())
    suggested = sum(d[0] for d in details)
    return ArmFigures(
        completions=count,
        users=len(by_user),
        chars_saved_per_completion=saved / count if count else 0.0,
        acceptance=sum(d[2] for d in details) / count if count else 0.0,
        survival_weighted_acceptance=saved / suggested if suggested else 0.0,
    )


def difference_interval(
    active: dict[str, list[int]],
    canary: dict[str, list[int]],
    level: float,
    seed: int = 0,
    rounds: int = ROUNDS,
) -> list[float]:
    """canary - active mean characters saved per completion: [estimate, low, high]."""

    def mean(by_user: dict[str, list[int]]) -> float:
        count = sum(len(v) for v in by_user.values())
        return sum(sum(v) for v in by_user.values()) / count

    rng = np.random.default_rng(seed)
    canary_means = clustered_means(list(canary.values()), rng, rounds)
    diffs = canary_means - clustered_means(list(active.values()), rng, rounds)
    return interval(mean(canary) - mean(active), diffs, level).as_list()


def evaluate(
    session: Session,
    row: AdapterVersion,
    *,
    min_completions: int,
    max_completions: int,
    confidence: float,
    seed: int = 0,
) -> CanaryVerdict:
    """The verdict on canary ``row`` now: ``wait`` until the next planned look."""
    values, details = _arm_values(session, row)
    arms = {arm: _figures(values[arm], details[arm]) for arm in ARMS}
    looks = max(1, max_completions // min_completions)
    level = 1 - (1 - confidence) / looks
    done = int((row.evidence or {}).get("canary_look", 0))
    smaller = min(arms[arm].completions for arm in ARMS)
    look = min(looks, smaller // min_completions)
    if look <= done:
        return CanaryVerdict(row.version, "wait", done, looks, level, [], arms)
    estimate, low, high = difference_interval(values["active"], values["canary"], level, seed)
    if low > 0:
        decision = "promoted"
    elif high < 0:
        decision = "rolled_back"
    elif look >= looks:
        decision = "retired"
    else:
        decision = "continue"
    return CanaryVerdict(row.version, decision, look, looks, level, [estimate, low, high], arms)


def check(
    session: Session,
    base_model: str | None,
    *,
    min_completions: int,
    max_completions: int,
    confidence: float,
    seed: int = 0,
) -> CanaryVerdict | None:
    """Evaluate the running canary and act on its verdict (commits); None when none runs.

    Several servers may check at once: a final verdict is claimed by one conditional
    UPDATE, so it is applied once.
    """
    row = adapter_rows.canary(session, base_model)
    if row is None:
        return None
    verdict = evaluate(
        session,
        row,
        min_completions=min_completions,
        max_completions=max_completions,
        confidence=confidence,
        seed=seed,
    )
    if verdict.decision == "wait":
        session.rollback()
        return verdict
    evidence = verdict.evidence()
    if verdict.decision == "continue":
        session.refresh(row)
        if (
            row.status == "canary"
            and int((row.evidence or {}).get("canary_look", 0)) < verdict.look
        ):
            row.evidence = {**(row.evidence or {}), **evidence}
        session.commit()
        return verdict
    ended = {"promoted": "active", "rolled_back": "rolled_back", "retired": "retired"}
    # One conditional UPDATE claims the verdict: of several servers judging at once, on
    # SQLite or PostgreSQL, exactly one changes the row; the others see no row changed.
    claimed = session.execute(
        update(AdapterVersion)
        .where(AdapterVersion.id == row.id, AdapterVersion.status == "canary")
        .values(status=ended[verdict.decision])
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return verdict
    session.refresh(row)
    if verdict.decision == "promoted":
        adapter_rows.promote(session, row.version, by="canary", **evidence)
    else:
        adapter_rows.end_canary(session, row, ended[verdict.decision], by="canary", **evidence)
    session.commit()
    log.info(
        "canary %s look %d/%d: %s (canary - active chars saved per completion %s at %.4f)",
        verdict.version,
        verdict.look,
        verdict.looks,
        verdict.decision,
        [round(v, 2) for v in verdict.difference],
        verdict.level,
    )
    return verdict
