"""From recorded fates to training examples: labels by survival, not by clicks.

Acceptance alone teaches a model to make short, timid suggestions. What the developer
kept is the target: the line as written where an accepted suggestion stood (its region
after the survival window nearest two minutes, with what they typed after it on its line),
or what they typed where they rejected a suggestion. The logged suggestion is the other
side, worth its characters saved (retained characters of the suggestion alone, 0 for a
reject).

The region alone is not the target: where a suggestion stopped short and the developer
typed the rest of the line, the region ends where the suggestion did, and a target cut
there (then ended with the line's newline) teaches the model to stop lines early.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.metrics import kept_check
from feedback.schema import Completion, FeedbackEvent
from feedback.store import events_by_completion

log = logging.getLogger(__name__)

ACCEPTED = ("accepted", "partial")
REJECTED = ("rejected", "dismissed")


@dataclass(frozen=True)
class Example:
    """One logged prompt with what the developer kept there."""

    completion_id: str
    created_at: datetime
    user: str
    template: str
    prefix: str
    suffix: str
    suggestion: str
    kept: str
    chars_saved: int  # of the logged suggestion: retained characters, 0 for a reject
    outcome: str
    event_ids: tuple[str, ...]  # the events the label was made from
    repository: str = ""  # the repository's snippets the prompt held, as served

    @property
    def rejected(self) -> str | None:
        """The logged suggestion as the losing side; None when empty or what was kept."""
        if self.suggestion.strip() and self.suggestion.rstrip() != self.kept.rstrip():
            return self.suggestion
        return None


@dataclass
class DataCounts:
    completions: int = 0
    labelled: int = 0
    unsettled: int = 0  # accepted, but no survival check has run yet
    unlabelled: int = 0  # shown or pending: no fate to learn from
    no_target: int = 0  # rejected, but nothing typed there instead
    corrupt: int = 0
    duplicates: int = 0
    capped: int = 0  # dropped so that no user has more than their share
    train: int = 0
    eval: int = 0
    users: dict[str, int] = field(default_factory=dict)


class CorruptRow(ValueError):
    """A stored row that breaks the store's own rules; skipped and counted."""


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def label(completion: Completion, events: Sequence[FeedbackEvent]) -> Example | None:
    """The example ``completion`` yields, None when its fate teaches nothing (yet)."""
    if not isinstance(completion.prompt_prefix, str) or not isinstance(completion.suggestion, str):
        raise CorruptRow(f"completion {completion.id} has no prompt or suggestion text")
    outcome = completion.outcome
    if outcome in ACCEPTED:
        length = completion.accepted_length
        if length is None or not 0 < length <= len(completion.suggestion):
            raise CorruptRow(f"completion {completion.id} has accepted_length={length}")
        check = kept_check(events)
        if check is None:
            return None
        ratio = check.survival_ratio
        if ratio is None or not 0.0 <= ratio <= 1.0 or not isinstance(check.text, str):
            raise CorruptRow(f"survival event {check.id} has ratio={ratio}")
        kept, saved, sources = check.text, round(length * ratio), [check.id]
        line = next(
            (e for e in events if e.kind == "written" and e.window_s == check.window_s), None
        )
        # older rows have no line; a line that does not start with the region is not its own
        if (
            kept.strip()
            and line is not None
            and isinstance(line.text, str)
            and line.text.startswith(kept)
        ):
            kept = line.text
            sources.append(line.id)
    elif outcome in REJECTED:
        typed = [e for e in events if e.kind == "typed_instead" and isinstance(e.text, str)]
        if not typed or not typed[0].text or not typed[0].text.strip():
            return None
        kept, saved, sources = typed[0].text, 0, [typed[0].id]
    else:
        return None
    kept = without_rest_of_line(kept, completion.prompt_suffix or "")
    if not kept.strip():
        return None
    sources += [e.id for e in events if e.kind == outcome]
    return Example(
        completion_id=completion.id,
        created_at=_as_utc(completion.created_at),
        user=completion.user,
        template=completion.template,
        prefix=completion.prompt_prefix,
        suffix=completion.prompt_suffix or "",
        suggestion=completion.suggestion,
        kept=kept,
        chars_saved=saved,
        outcome=outcome,
        event_ids=tuple(sources),
        repository=completion.prompt_repository or "",
    )


def without_rest_of_line(kept: str, suffix: str) -> str:
    """``kept`` without the text that already followed the cursor on its line.

    What stands to the end of the line includes what was there before the completion (a
    closing bracket the editor typed, the rest of a line edited in the middle); the model
    saw it in the suffix and must not learn to write it again.
    """
    rest = suffix.split("\n", 1)[0]
    if rest.strip() and "\n" not in kept and kept.endswith(rest):
        return kept[: len(kept) - len(rest)]
    return kept


def load_examples(
    session: Session, *, since: datetime | None, until: datetime, base_model: str
) -> tuple[list[Example], DataCounts]:
    """Label every completion of ``base_model`` logged in (since, until]."""
    query = select(Completion).where(
        Completion.created_at <= until, Completion.base_model == base_model
    )
    if since is not None:
        query = query.where(Completion.created_at > since)
    completions = list(session.scalars(query.order_by(Completion.created_at, Completion.id)))
    counts = DataCounts(completions=len(completions))
    events = events_by_completion(session=session, completion_ids=[c.id for c in completions])
    examples = []
    for completion in completions:
        try:
            example = label(completion, events[completion.id])
        except CorruptRow as error:
            counts.corrupt += 1
            log.warning("skipped: %s", error)
            continue
        if example is not None:
            examples.append(example)
        elif completion.outcome in ACCEPTED:
            counts.unsettled += 1
        elif completion.outcome in REJECTED:
            counts.no_target += 1
        else:
            counts.unlabelled += 1
    counts.labelled = len(examples)
    return examples, counts


def deduplicate(examples: Iterable[Example], counts: DataCounts) -> list[Example]:
    """One example per (prompt end, kept text): the newest wins."""
    seen: dict[tuple[str, str, str], Example] = {}
    for example in examples:
        key = (example.prefix[-2000:], example.suffix[:500], example.kept)
        if key in seen:
            counts.duplicates += 1
        seen[key] = example
    return sorted(seen.values(), key=lambda e: (e.created_at, e.completion_id))


def cap_users(examples: Sequence[Example], share: float, counts: DataCounts) -> list[Example]:
    """Keep each user's newest examples up to ``share`` of the batch: no one steers alone.

    With a single user there is nobody to balance against, so nothing is dropped.
    """
    by_user: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_user[example.user].append(example)
    if len(by_user) > 1:
        others = {user: len(examples) - len(own) for user, own in by_user.items()}
        for user, own in by_user.items():
            # the largest n with n <= share * (n + others): n <= share * others / (1 - share)
            limit = len(own) if share >= 1.0 else max(1, int(share * others[user] / (1.0 - share)))
            if len(own) > limit:
                counts.capped += len(own) - limit
                by_user[user] = own[-limit:]
    kept = sorted(
        (e for own in by_user.values() for e in own), key=lambda e: (e.created_at, e.completion_id)
    )
    counts.users = {user: len(own) for user, own in sorted(by_user.items())}
    return kept


def split_by_time(
    examples: Sequence[Example], eval_share: float, counts: DataCounts
) -> tuple[list[Example], list[Example]]:
    """The newest ``eval_share`` is held out: the gate judges on the most recent data."""
    ordered = sorted(examples, key=lambda e: (e.created_at, e.completion_id))
    held_out = round(len(ordered) * eval_share) if len(ordered) > 1 else 0
    cut = len(ordered) - held_out
    train, held = list(ordered[:cut]), list(ordered[cut:])
    counts.train, counts.eval = len(train), len(held)
    return train, held
