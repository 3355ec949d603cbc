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

Latency percentiles: exact where rows are read back (SQLite: one person's log); in
PostgreSQL (a team's, millions of rows) from a histogram of logarithmic buckets 2 % wide,
counted in the same pass as everything else, so p50 and p95 are within 2 % of exact. A
histogram also adds up: one query grouped finely serves every coarser view of the
dashboard's overview.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Date, case, cast, func, literal, select, text
from sqlalchemy.orm import Session

from feedback.logs import BASE_ADAPTER, LogFilter
from feedback.metrics import percentile
from feedback.schema import Completion

GROUPS = ("day", "adapter", "language", "user")
SEEN = ("shown", "accepted", "partial", "rejected", "dismissed")
BUCKETS_PER_E = 50  # a bucket spans a factor of e^(1/50) = 1.0202


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


@dataclass
class _Cell:
    """Sums of one group; latencies as a histogram (bucket -> count) or exact values."""

    sums: Counter[str] = field(default_factory=Counter)
    histogram: Counter[int] = field(default_factory=Counter)
    exact: list[float] = field(default_factory=list)

    def add(self, other: _Cell) -> None:
        self.sums.update(other.sums)
        self.histogram.update(other.histogram)
        self.exact.extend(other.exact)

    def percentile(self, share: float) -> float | None:
        if self.exact:
            return percentile(self.exact, share)
        return _histogram_percentile(self.histogram, share)


def _histogram_percentile(histogram: Counter[int], share: float) -> float | None:
    """The value at ``share`` of the way through the counted values (numpy's linear rule),
    placed linearly inside its bucket."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = share * (total - 1)
    seen = 0
    for bucket in sorted(histogram):
        count = histogram[bucket]
        if rank < seen + count:
            low = math.exp(bucket / BUCKETS_PER_E)
            high = math.exp((bucket + 1) / BUCKETS_PER_E)
            return low + (high - low) * (rank - seen + 0.5) / count
        seen += count
    return math.exp((max(histogram) + 1) / BUCKETS_PER_E)


def _group_column(name: str, dialect: str) -> Any:
    if name == "day":
        if dialect == "postgresql":
            return cast(func.timezone("UTC", Completion.created_at), Date)
        return func.strftime("%Y-%m-%d", Completion.created_at)
    if name == "adapter":
        return func.coalesce(Completion.adapter_version, literal(BASE_ADAPTER))
    if name == "language":
        return Completion.language
    if name == "user":
        return Completion.user
    raise ValueError(f"cannot group by {name!r}: choose from {', '.join(GROUPS)}")


def _sums() -> list[Any]:
    seen = Completion.outcome.in_(SEEN)
    accepted = Completion.outcome.in_(("accepted", "partial"))
    settled = Completion.chars_saved.is_not(None)
    return [
        func.count().label("completions"),
        func.count(case((seen, 1))).label("seen"),
        func.count(case((accepted, 1))).label("accepted"),
        func.count(Completion.chars_saved).label("settled"),
        func.coalesce(func.sum(Completion.chars_saved), 0).label("saved"),
        func.coalesce(
            func.sum(case((settled, func.length(Completion.suggestion)), else_=0)), 0
        ).label("suggested"),
    ]


SUMS = ("completions", "seen", "accepted", "settled", "saved", "suggested")


def _cells(session: Session, by: Sequence[str], where: LogFilter) -> dict[tuple[str, ...], _Cell]:
    """The sums of each group of ``by``: one pass over the matching rows."""
    dialect = session.get_bind().dialect.name
    keys = [_group_column(name, dialect).label(f"g{i}") for i, name in enumerate(by)]
    cells: dict[tuple[str, ...], _Cell] = {}
    if dialect == "postgresql":
        # Millions of rows into a few thousand (group, bucket) cells. The planner cannot
        # know how few days or buckets there are and sorts the rows (on disk with the
        # default work_mem): 2-3x slower than hashing them in memory, in parallel, which
        # this transaction asks for. JIT compiling costs more than it saves at this size.
        for setting in (
            "work_mem = '64MB'",
            "enable_sort = off",
            "jit = off",
            "parallel_tuple_cost = 0.001",
        ):
            session.execute(text(f"SET LOCAL {setting}"))
        bucket = func.floor(
            func.ln(func.greatest(Completion.latency_ms, 0.001)) * BUCKETS_PER_E
        ).label("bucket")
        query = where.apply(select(*keys, bucket, *_sums())).group_by(*keys, bucket)
        for row in session.execute(query):
            key = tuple(str(value) for value in row[: len(keys)])
            cell = cells.setdefault(key, _Cell())
            cell.sums.update({name: int(getattr(row, name)) for name in SUMS})
            cell.histogram[int(row.bucket)] += int(row.completions)
        return cells
    for row in session.execute(where.apply(select(*keys, *_sums())).group_by(*keys)):
        key = tuple(str(value) for value in row[: len(keys)])
        cells[key] = _Cell(Counter({name: int(getattr(row, name)) for name in SUMS}))
    for row in session.execute(where.apply(select(*keys, Completion.latency_ms))):
        cells[tuple(str(value) for value in row[:-1])].exact.append(float(row[-1]))
    return cells


def _row(key: tuple[str, ...], cell: _Cell) -> StatsRow:
    sums = cell.sums
    return StatsRow(
        key=key,
        completions=sums["completions"],
        seen=sums["seen"],
        accepted=sums["accepted"],
        settled=sums["settled"],
        acceptance=sums["accepted"] / sums["seen"] if sums["seen"] else None,
        chars_saved_per_completion=sums["saved"] / sums["settled"] if sums["settled"] else None,
        survival_weighted_acceptance=(
            sums["saved"] / sums["suggested"] if sums["suggested"] else None
        ),
        latency_ms_p50=cell.percentile(0.5),
        latency_ms_p95=cell.percentile(0.95),
    )


def stats_for(
    *, session: Session, groupings: Sequence[Sequence[str]], where: LogFilter
) -> list[list[StatsRow]]:
    """Several views of the same rows (the overview's by day, by adapter, in total) from
    one query grouped by every name they use; each list is ordered by its groups' values."""
    for name in {name for by in groupings for name in by}:
        _group_column(name, "")  # an unknown name fails before any query
    union = [name for name in GROUPS if any(name in by for by in groupings)]
    cells = _cells(session, union, where)
    views = []
    for by in groupings:
        positions = [union.index(name) for name in by]
        merged: dict[tuple[str, ...], _Cell] = {}
        for key, cell in cells.items():
            merged.setdefault(tuple(key[i] for i in positions), _Cell()).add(cell)
        views.append([_row(key, merged[key]) for key in sorted(merged)])
    return views


def stats(*, session: Session, by: Sequence[str], where: LogFilter) -> list[StatsRow]:
    """One row per group, ordered by the groups' values; by=() gives one row for all."""
    return stats_for(session=session, groupings=[by], where=where)[0]
