"""Is the assistant helping, for whom, since which adapter: the log's figures grouped by
day, adapter, language or user, computed in the database from the completions table
alone (each row carries its outcome and what it saved; feedback.recorder keeps them).

Every figure means what it means elsewhere in Ghostloop (feedback.metrics):
- acceptance: accepted or partly accepted, of the completions the developer saw (shown
  or given a fate; pending ones were never on screen);
- chars saved per completion: retained characters of the suggestion (the survival check
  nearest two minutes), 0 for a reject, over settled completions: the headline;
- survival-weighted acceptance: retained characters over suggested characters of settled
  completions, reported beside the headline, never alone (a shorter suggestion raises it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import case, func, literal, select
from sqlalchemy.orm import Session

from feedback.logs import BASE_ADAPTER, LogFilter
from feedback.schema import Completion

GROUPS = ("day", "adapter", "language", "user")
SEEN = ("shown", "accepted", "partial", "rejected", "dismissed")


@dataclass(frozen=True)
class StatsRow:
    key: tuple[str, ...]  # one value per grouping, in the order asked for
    completions: int
    seen: int
    accepted: int
    settled: int
    acceptance: float | None
    chars_saved_per_completion: float | None
    survival_weighted_acceptance: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None

    def as_dict(self, by: Sequence[str]) -> dict[str, Any]:
        values = asdict(self)
        del values["key"]
        return {**dict(zip(by, self.key, strict=True)), **values}


def _group_column(name: str, dialect: str) -> Any:
    if name == "day":
        if dialect == "postgresql":
            return func.to_char(func.timezone("UTC", Completion.created_at), "YYYY-MM-DD")
        return func.strftime("%Y-%m-%d", Completion.created_at)
    if name == "adapter":
        return func.coalesce(Completion.adapter_version, literal(BASE_ADAPTER))
    if name == "language":
        return Completion.language
    if name == "user":
        return Completion.user
    raise ValueError(f"cannot group by {name!r}: choose from {', '.join(GROUPS)}")


def stats(*, session: Session, by: Sequence[str], where: LogFilter) -> list[StatsRow]:
    """One row per group, ordered by the groups' values; by=() gives one row for all."""
    dialect = session.get_bind().dialect.name
    keys = [_group_column(name, dialect).label(f"g{i}") for i, name in enumerate(by)]
    seen = Completion.outcome.in_(SEEN)
    accepted = Completion.outcome.in_(("accepted", "partial"))
    settled = Completion.chars_saved.is_not(None)
    figures: list[Any] = [
        func.count().label("completions"),
        func.count(case((seen, 1))).label("seen"),
        func.count(case((accepted, 1))).label("accepted"),
        func.count(Completion.chars_saved).label("settled"),
        func.sum(Completion.chars_saved).label("saved"),
        func.sum(case((settled, func.length(Completion.suggestion)), else_=0)).label("suggested"),
    ]
    postgres = dialect == "postgresql"
    if postgres:  # an ordered-set aggregate; elsewhere the latencies are read back
        figures += [
            func.percentile_cont(0.5).within_group(Completion.latency_ms).label("p50"),
            func.percentile_cont(0.95).within_group(Completion.latency_ms).label("p95"),
        ]
    query = where.apply(select(*keys, *figures)).group_by(*keys).order_by(*keys)
    rows = session.execute(query).all()
    latencies = {} if postgres else _latencies(session, keys, where)
    result = []
    for row in rows:
        key = tuple(str(row[i]) for i in range(len(keys)))
        p50, p95 = (row.p50, row.p95) if postgres else latencies.get(key, (None, None))
        result.append(
            StatsRow(
                key=key,
                completions=row.completions,
                seen=row.seen,
                accepted=row.accepted,
                settled=row.settled,
                acceptance=row.accepted / row.seen if row.seen else None,
                chars_saved_per_completion=row.saved / row.settled if row.settled else None,
                survival_weighted_acceptance=(row.saved / row.suggested if row.suggested else None),
                latency_ms_p50=None if p50 is None else float(p50),
                latency_ms_p95=None if p95 is None else float(p95),
            )
        )
    return result


def _latencies(
    session: Session, keys: list[Any], where: LogFilter
) -> dict[tuple[str, ...], tuple[float, float]]:
    grouped: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for row in session.execute(where.apply(select(*keys, Completion.latency_ms))):
        grouped[tuple(str(value) for value in row[:-1])].append(row[-1])
    return {
        key: (float(np.percentile(values, 50)), float(np.percentile(values, 95)))
        for key, values in grouped.items()
    }
