"""``ghostloop replay PATH``: a simulated developer proves (or disproves) the loop on real code.

The developer (``evaluation.developer``) works through the repository's source files
through the real server over LSP, at sampled cursors (``evaluation.positions``); the
server records all of it as real events; survival windows are shortened so that the fates
settle in seconds.

Files are split by path (seeded) into a training half and a held-out half. In order:

1. baseline on the training half (server user ``replay-train``): the night's data;
2. a server for the held-out half starts (user ``replay-heldout``, adapters read at start
   only, so it keeps serving the base model);
3. one nightly ``ghostloop train`` per method over what step 1 recorded (the held-out half
   has not been replayed yet, so none of it can leak into training);
4. baseline on the held-out half, on that server (still the base model);
5. ``ghostloop/reloadAdapters``: the server hot-swaps each published adapter in;
6. the same held-out positions again.

The report (``evaluation.statistics`` over ``evaluation.scoring``) is computed from the
stored rows; it is printed, written to ``report.json`` with a chart ``report.png`` in the
replay's own data directory (read back by ``feedback.replays``), and ``--json`` prints it
on stdout (schema in docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from evaluation import charts, statistics
from evaluation.client import GhostloopClient
from evaluation.developer import Developer, Pass
from evaluation.positions import (
    Position,
    ReplayError,
    choose_positions,
    position_rows,
    source_files,
    split_files,
)
from evaluation.scoring import Scored, UnsettledError, load_scores, reach
from feedback import adapter_rows
from feedback.database import StoreError, default_database_url, open_engine, upgrade
from feedback.metrics import EDIT_SIMILARITY
from feedback.replays import CHART_FILE, REPORT_FILE, format_table
from feedback.schema import AdapterVersion, Completion, TrainingRun
from feedback.store import events_by_completion
from ghostloop.models import backend_name, served_backend, with_backend
from ghostloop.settings import Settings

log = logging.getLogger(__name__)

TRAIN_USER = "replay-train"
HELD_OUT_USER = "replay-heldout"
# The replay measures what the model suggests, not how busy the machine is: with the
# server's deadline (3 s) a slow moment cut a suggestion short, and the same walk on a
# loaded machine scored differently. Latency is measured and reported all the same.
REPLAY_DEADLINE_MS = 600_000
LONG_LINE = 15  # characters of a line that counts as copied, not written by any model


@dataclass(frozen=True)
class ReplayOptions:
    root: Path
    positions: int = 400  # held-out positions
    train_positions: int | None = None  # the training half's; None: as many as held out
    seed: int = 0
    methods: tuple[str, ...] = ()  # trained side by side; empty: the configured method
    ungated: bool = False  # publish the candidate even if the gate refuses it
    windows_s: str = "1,2,3"
    edit_threshold: float = EDIT_SIMILARITY
    work_dir: Path | None = None  # default: <data dir>/replays/<time>
    database_url: str = ""  # default: SQLite in the work dir
    progress: bool = True
    # walk the held-out half after each night again with another backend, e.g. fp32 when
    # serving int8: the paired lift of the served backend against it, the same adapter
    also_on: str | None = None


@dataclass(frozen=True)
class Plan:
    """What the replay walks: the two halves' files and positions."""

    root: Path
    train_files: list[Path]
    held_files: list[Path]
    train_positions: list[Position]
    held_positions: list[Position]


@dataclass(frozen=True)
class Night:
    """One ``ghostloop train`` of the replay and what it published."""

    method: str
    message: str
    seconds: float
    adapter: str | None
    gate_passed: bool | None


@dataclass
class Walks:
    """The walks of one replay: the training half's, the held-out half's before any night,
    and after each method's night whose adapter was published."""

    training: Pass
    model: str = ""
    before: Pass | None = None
    after: dict[str, Pass] = dataclasses.field(default_factory=dict)
    also: dict[str, Pass] = dataclasses.field(default_factory=dict)  # on options.also_on
    # with repository context on: the held-out half again, served without it
    before_without: Pass | None = None
    after_without: dict[str, Pass] = dataclasses.field(default_factory=dict)

    def all(self) -> list[Pass]:
        passes = (
            self.training,
            self.before,
            *self.after.values(),
            *self.also.values(),
            self.before_without,
            *self.after_without.values(),
        )
        return [w for w in passes if w is not None]


@dataclass(frozen=True)
class ReplayReport:
    """The replay's report. ``as_json`` is what ``report.json`` and ``--json`` hold (the
    schema the admin views read); the first method's figures also stand at the top."""

    before: dict[str, Any]
    after: dict[str, Any] | None
    paired_lift: dict[str, Any] | None
    by_kind: dict[str, Any]
    kept_length: dict[str, Any] | None
    model: str
    backend: str
    method: str
    adapter: str | None
    gated: bool
    methods: dict[str, dict[str, Any]]
    reach: dict[str, Any]
    training_half: dict[str, Any]
    split: dict[str, Any]
    reactions: dict[str, dict[str, int]]
    seconds: float
    store: str
    positions: list[dict[str, Any]]
    served: dict[str, Any]
    # with repository context on: the held-out half served without it, and the lifts
    context: dict[str, Any] | None = None
    chart: str = ""

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _settled(completion: Completion, events: Sequence[Any], last_window: float) -> bool:
    if completion.outcome in ("rejected", "dismissed"):
        return any(e.kind == "typed_instead" for e in events)
    if completion.outcome in ("accepted", "partial"):
        return any(
            e.kind == "survival" and e.window_s is not None and e.window_s >= last_window
            for e in events
        )
    return False


def wait_settled(engine: Engine, ids: Sequence[str], last_window: float, timeout_s: float) -> None:
    """Until every served completion is stored with its final event."""
    deadline = time.monotonic() + timeout_s
    while True:
        with Session(engine) as session:
            rows = {
                c.id: c
                for c in session.query(Completion).filter(Completion.id.in_(list(ids))).all()
            }
            events = events_by_completion(session=session, completion_ids=list(rows))
            waiting = [
                cid
                for cid in ids
                if cid not in rows or not _settled(rows[cid], events[cid], last_window)
            ]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ReplayError(
                f"{len(waiting)} of {len(ids)} completions had no final event after "
                f"{timeout_s:.0f} s (first: {waiting[0]}); is the server's store writable?"
            )
        time.sleep(0.25)


class Replay:
    def __init__(self, settings: Settings, options: ReplayOptions, out: TextIO) -> None:
        self.settings = settings
        self.options = options
        self.out = out
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.work_dir = options.work_dir or settings.store.data_dir / "replays" / stamp
        self.url = options.database_url or default_database_url(self.work_dir)
        self.windows = tuple(float(part) for part in options.windows_s.split(","))
        self._engine: Engine | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    @property
    def context_tokens(self) -> int:
        return self.settings.context.repo_context_tokens

    def env(self, user: str, backend: str | None = None, context: bool = True) -> dict[str, str]:
        """A server's or the nightly job's environment; ``backend`` (as ``--backend``
        names one) instead of the replay's; ``context`` False: no repository snippets."""
        settings = self.settings
        if backend is not None:
            settings = with_backend(settings, backend)
        env = dict(os.environ)
        env.update(
            {
                "GHOSTLOOP_DATA_DIR": str(self.work_dir),
                # the converted model is the user's, not the replay's: not made again each run
                "GHOSTLOOP_MODEL_CACHE": str(self.settings.store.model_cache_dir),
                "GHOSTLOOP_DATABASE_URL": self.url,
                "GHOSTLOOP_MODEL": self.settings.inference.model,
                # servers and the nightly job alike, on the backend they end on: a server on
                # auto would switch from torch to onnxruntime in the middle of a walk
                "GHOSTLOOP_BACKEND": served_backend(settings),
                "GHOSTLOOP_ONNX_INT8": str(settings.inference.onnx_int8).lower(),
                "GHOSTLOOP_DEVICE": self.settings.inference.device,
                "GHOSTLOOP_USER": user,
                "GHOSTLOOP_HASH_USER": "false",
                "GHOSTLOOP_TELEMETRY": "true",
                "GHOSTLOOP_SURVIVAL_WINDOWS_S": self.options.windows_s,
                "GHOSTLOOP_MAX_LINES": "1",
                "GHOSTLOOP_DEADLINE_MS": str(REPLAY_DEADLINE_MS),
                "GHOSTLOOP_ADAPTER_POLL_S": "0",
                "GHOSTLOOP_REPO_CONTEXT_TOKENS": str(self.context_tokens if context else 0),
                "GHOSTLOOP_CANARY_SHARE": "0",
                "GHOSTLOOP_LOG_LEVEL": os.environ.get("GHOSTLOOP_LOG_LEVEL", "WARNING"),
            }
        )
        return env

    async def start_server(
        self,
        user: str,
        backend: str | None = None,
        *,
        root: Path | None = None,
        context: bool = True,
    ) -> GhostloopClient:
        """A server for ``user``; ``root``: the workspace the client names at initialize
        (what repository context indexes)."""
        client = await GhostloopClient.start(env=self.env(user, backend, context), root=root)
        try:
            await client.wait_ready()
        except RuntimeError as error:  # the model could not be loaded: the server says why
            await client.stop()
            raise ReplayError(str(error)) from error
        except BaseException:
            await client.stop()
            raise
        return client

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the replay's store is opened by run()")
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def open_store(self) -> Engine:
        """The replay's store, usable before anything is replayed into it."""
        try:
            engine = open_engine(self.url)
            try:
                upgrade(engine)
            except BaseException:
                engine.dispose()
                raise
        except StoreError as error:
            raise ReplayError(f"cannot use the store {self.url}: {error}") from error
        return engine

    async def walk(
        self,
        client: GhostloopClient,
        positions: Sequence[Position],
        name: str,
        root: Path | None = None,
    ) -> Pass:
        """The developer at ``positions`` of the files under ``root`` (default: the
        replay's root)."""
        walk = Pass(name)
        bar = tqdm(
            total=len(positions),
            desc=name,
            unit="pos",
            file=sys.stderr,
            disable=not self.options.progress,
            dynamic_ncols=True,
        )
        with bar:
            developer = Developer(client, root or self.options.root, self.options.edit_threshold)
            await developer.work(positions, walk, bar)
        ids = [cid for cid in walk.served.values() if cid]
        await asyncio.to_thread(
            wait_settled, self.engine, ids, self.windows[-1], self.windows[-1] + 60.0
        )
        return walk

    def train(self, method: str) -> Night:
        """One ``ghostloop train --from-scratch``: every method sees the same data."""
        env = self.env(TRAIN_USER)
        if self.options.ungated:
            env["GHOSTLOOP_GATE_ENFORCED"] = "false"
        command = [sys.executable, "-m", "ghostloop", "train", "--method", method]
        started = time.perf_counter()
        # with progress bars on, the night's own bars (training, gate) show on our stderr
        errors = None if self.options.progress else subprocess.PIPE
        done = subprocess.run(
            [*command, "--from-scratch"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - started
        message = (done.stdout.strip().splitlines() or [""])[-1]
        if done.returncode != 0:
            detail = message or (done.stderr or "").strip()[-2000:] or "its output is above"
            raise ReplayError(f"ghostloop train failed (exit {done.returncode}): {detail}")
        with Session(self.engine) as session:
            run = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())).first()
            adapter = None
            if run is not None and run.decision == "published":
                adapter = session.scalars(
                    select(AdapterVersion.version).where(AdapterVersion.run_id == run.id)
                ).first()
            gate = dict(run.evaluation or {}) if run is not None else {}
        return Night(method, message, round(seconds, 1), adapter, gate.get("passed"))

    def serve_adapter(self, version: str) -> None:
        with Session(self.engine) as session, session.begin():
            adapter_rows.promote(session, version, by="replay")

    async def swap_in(self, client: GhostloopClient, version: str, server: str) -> None:
        """``version`` made active and read by ``client``'s server now, or ReplayError."""
        self.serve_adapter(version)
        reloaded = await client.reload_adapters()
        if reloaded.get("adapter") != version:
            raise ReplayError(f"{server} did not swap {version} in: {reloaded.get('refused')}")

    def scores(self, positions: Sequence[Position], walk: Pass) -> list[Scored]:
        with Session(self.engine) as session:
            return load_scores(session, positions, walk.served)

    async def run(self) -> ReplayReport:
        """Plan, walk the training half, train each night and walk the held-out half before
        and after it, then score, report and write."""
        started = time.perf_counter()
        plan = self.plan()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._engine = self.open_store()
        self.say(
            f"replay of {plan.root}: {len(plan.train_files)} files to train on "
            f"({len(plan.train_positions)} positions), {len(plan.held_files)} held out "
            f"({len(plan.held_positions)} positions); seed {self.options.seed}; "
            f"data in {self.work_dir}"
        )
        walks = await self.walk_training_half(plan)
        nights = await self.nights_and_held_out_walks(plan, walks)
        report = self.report(plan, walks, nights, time.perf_counter() - started)
        return self.write(report)

    def plan(self) -> Plan:
        """The split and the positions of both halves."""
        root = self.options.root.resolve()
        self.options = options = dataclasses.replace(self.options, root=root)
        files = source_files(root)
        train_files, held_files = split_files(files, root, options.seed)
        train_count = (
            options.positions if options.train_positions is None else options.train_positions
        )
        plan = Plan(
            root,
            train_files,
            held_files,
            choose_positions(train_files, root, train_count, options.seed),
            choose_positions(held_files, root, options.positions, options.seed),
        )
        if not plan.train_positions or not plan.held_positions:
            raise ReplayError(f"no cursor positions in the code under {root}")
        return plan

    def training_workspace(self, plan: Plan) -> Path:
        """The training half's developer's repository: its files alone, copied, so that no
        snippet of a training prompt (and so nothing the night learns) comes from a
        held-out file."""
        tree = self.work_dir / "training-workspace"
        for path in plan.train_files:
            copy = tree / path.relative_to(plan.root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
        return tree

    async def walk_training_half(self, plan: Plan) -> Walks:
        """Step 1: the base model on the training half, recorded as the night's data."""
        root = self.training_workspace(plan) if self.context_tokens else None
        client = await self.start_server(TRAIN_USER, root=root)
        try:
            model = (await client.status())["model"]
            walk = await self.walk(client, plan.train_positions, "baseline, training half", root)
        finally:
            await client.stop()
        return Walks(walk, model)

    async def nights_and_held_out_walks(self, plan: Plan, walks: Walks) -> list[Night]:
        """Steps 2-6: a held-out server on the base model, each method's night, the
        held-out baseline, then each published adapter hot-swapped in and walked. With
        repository context on, a second held-out server without it walks beside the first
        (the held-out developer's workspace is the repository on disk: the current file is
        searched from the editor's document only, and never for its own completion)."""
        methods = list(self.options.methods) or [self.settings.training.method]
        nights: list[Night] = []
        # both read adapters at start only: none yet
        held = await self.start_server(HELD_OUT_USER, root=plan.root)
        bare = None
        try:
            if self.context_tokens:
                bare = await self.start_server(HELD_OUT_USER, root=plan.root, context=False)
            for method in methods:
                self.say(f"training ({method}) on the training half ...")
                nights.append(self.train(method))
                self.say(nights[-1].message)
            walks.before = await self.walk(held, plan.held_positions, "baseline, held-out half")
            if bare is not None:
                walks.before_without = await self.walk(
                    bare, plan.held_positions, "baseline without context, held-out half"
                )
            for night in nights:
                if not night.adapter:
                    self.say(f"{night.method}: no adapter was published, nothing to replay")
                    continue
                await self.swap_in(held, night.adapter, "the server")
                self.say(f"the server hot-swapped {night.adapter} in")
                walks.after[night.method] = await self.walk(
                    held, plan.held_positions, f"{night.adapter}, held-out half"
                )
                if bare is not None:
                    await self.swap_in(bare, night.adapter, "the server without context")
                    walks.after_without[night.method] = await self.walk(
                        bare, plan.held_positions, f"{night.adapter} without context"
                    )
        finally:
            await held.stop()
            if bare is not None:
                await bare.stop()
        if self.options.also_on and walks.after:
            await self.walk_again(plan, walks, nights, self.options.also_on)
        return nights

    async def walk_again(
        self, plan: Plan, walks: Walks, nights: Sequence[Night], backend: str
    ) -> None:
        """Step 7 (``also_on``): each published adapter walked again on ``backend``."""
        held = await self.start_server(HELD_OUT_USER, backend, root=plan.root)
        try:
            for night in nights:
                if night.method not in walks.after or not night.adapter:
                    continue
                await self.swap_in(held, night.adapter, f"the {backend} server")
                walks.also[night.method] = await self.walk(
                    held, plan.held_positions, f"{night.adapter} on {backend}, held-out half"
                )
        finally:
            await held.stop()

    def report(
        self, plan: Plan, walks: Walks, nights: Sequence[Night], seconds: float
    ) -> ReplayReport:
        """Every figure, from the stored rows of the walks."""
        assert walks.before is not None
        seed = self.options.seed
        before_scores = self.scores(plan.held_positions, walks.before)
        # with context on: the base model's walk without it, which every lift pairs against
        without = (
            self.scores(plan.held_positions, walks.before_without)
            if walks.before_without is not None
            else None
        )
        results = {}
        for night in nights:
            walk = walks.after.get(night.method)
            scores = self.scores(plan.held_positions, walk) if walk else None
            results[night.method] = {
                **dataclasses.asdict(night),
                **statistics.compare(plan.held_positions, before_scores, scores, seed),
                "served": walk.served if walk else None,
            }
            bare = walks.after_without.get(night.method)
            if scores is not None and bare is not None and without is not None:
                results[night.method]["context"] = self.night_context(plan, without, bare, scores)
            again = walks.also.get(night.method)
            if scores is not None and again is not None:
                on_other = self.scores(plan.held_positions, again)
                results[night.method]["also_on"] = {
                    "backend": self.options.also_on,
                    "after": statistics.summary(on_other, seed),
                    # the served backend against the other, the same adapter and positions
                    "paired_lift": statistics.paired_lift(on_other, scores, seed),
                    "served": again.served,
                }
        first_method = nights[0].method
        first = results[first_method]
        return ReplayReport(
            before=first["before"],
            after=first["after"],
            paired_lift=first["paired_lift"],
            by_kind=first["by_kind"],
            kept_length=first["kept_length"],
            model=walks.model,
            backend=backend_name(self.settings),
            method=first_method,
            adapter=first["adapter"],
            gated=not self.options.ungated,
            methods={
                name: {k: v for k, v in result.items() if k != "before"}
                for name, result in results.items()
            },
            reach=reach(
                plan.held_positions,
                before_scores,
                plan.train_positions,
                [path.read_text(encoding="utf-8", errors="replace") for path in plan.train_files],
            ),
            training_half=statistics.summary(
                self.scores(plan.train_positions, walks.training), seed
            ),
            split={
                "seed": seed,
                "root": str(plan.root),
                "train_files": [p.relative_to(plan.root).as_posix() for p in plan.train_files],
                "held_out_files": [p.relative_to(plan.root).as_posix() for p in plan.held_files],
                "train_positions": len(plan.train_positions),
                "held_out_positions": len(plan.held_positions),
            },
            reactions={walk.name: dict(Counter(walk.reactions.values())) for walk in walks.all()},
            seconds=round(seconds, 1),
            store=self.url,
            positions=position_rows(plan.held_positions),
            served={"before": walks.before.served, "after": first["served"]},
            context=self.context_report(plan, walks, before_scores, without, first.get("context")),
        )

    def night_context(
        self, plan: Plan, base: Sequence[Scored], after_without: Pass, after: Sequence[Scored]
    ) -> dict[str, Any]:
        """A night's figures without repository context, and the lifts context makes;
        ``base``: the base model's scores without context."""
        seed = self.options.seed
        bare = self.scores(plan.held_positions, after_without)
        return {
            "after_without": statistics.summary(bare, seed),
            # the night with context against the same night without: what context adds
            "paired_lift_night_context": statistics.paired_lift(bare, after, seed),
            # the product (night and context) against today's base model without context
            "paired_lift_product": statistics.paired_lift(base, after, seed),
            "served": after_without.served,
        }

    def context_report(
        self,
        plan: Plan,
        walks: Walks,
        before: Sequence[Scored],
        without: Sequence[Scored] | None,
        night: Mapping[str, Any] | None,
    ) -> dict[str, Any] | None:
        """With repository context on: the base model without it, the paired lift context
        makes, and the positions whose snippets held the true line (where the model can
        copy it), each served with and without context."""
        if walks.before_without is None or walks.before is None or without is None:
            return None
        seed = self.options.seed
        hits = self.snippet_hits(plan, walks.before)
        night = dict(night or {})

        def at(chosen: Sequence[int]) -> dict[str, Any]:
            pair = [without[i] for i in chosen], [before[i] for i in chosen]
            return {
                "positions": len(chosen),
                "share": round(len(chosen) / len(hits), 4) if hits else 0.0,
                "without": statistics.summary(pair[0], seed),
                "with": statistics.summary(pair[1], seed),
                "paired_lift": statistics.paired_lift(*pair, seed),
            }

        return {
            "tokens": self.context_tokens,
            "before_without": statistics.summary(without, seed),
            "paired_lift_context": statistics.paired_lift(without, before, seed),
            "after_without": night.get("after_without"),
            "paired_lift_night_context": night.get("paired_lift_night_context"),
            "paired_lift_product": night.get("paired_lift_product"),
            "snippet_hits": {
                **at([i for i, (hit, _) in enumerate(hits) if hit]),
                # lines any model writes (`else:`) aside: where copying is the point
                "long_lines": {
                    **at([i for i, (hit, long) in enumerate(hits) if hit and long]),
                    "min_chars": LONG_LINE,
                },
            },
            "served": {"before_without": walks.before_without.served},
        }

    def snippet_hits(self, plan: Plan, walk: Pass) -> list[tuple[bool, bool]]:
        """Per held-out position: whether the snippets served there held its whole line
        (what was typed and the true rest), word for word, and whether that line has
        ``LONG_LINE`` characters or more."""
        ids = [cid for cid in walk.served.values() if cid]
        with Session(self.engine) as session:
            rows = session.execute(
                select(Completion.id, Completion.prompt_repository).where(Completion.id.in_(ids))
            )
            repository = {cid: text or "" for cid, text in rows}
        sources: dict[str, list[str]] = {}
        hits = []
        for position in plan.held_positions:
            if position.path not in sources:
                text = (plan.root / position.path).read_text(encoding="utf-8")
                sources[position.path] = text.split("\n")
            line = sources[position.path][position.line].strip()
            served = repository.get(walk.served.get(position.key) or "", "")
            hits.append((bool(line) and line in served, len(line) >= LONG_LINE))
        return hits

    def write(self, report: ReplayReport) -> ReplayReport:
        """The chart and ``report.json`` in the replay's data directory."""
        passes = [("base model", report.before)]
        passes += [
            (f"{name}: {result['adapter']}", result["after"])
            for name, result in report.methods.items()
            if result["after"]
        ]
        chart = charts.chart(passes, self.work_dir / CHART_FILE)
        report = dataclasses.replace(report, chart=str(chart))
        (self.work_dir / REPORT_FILE).write_text(
            json.dumps(report.as_json(), indent=2), encoding="utf-8"
        )
        return report


async def run_replay(settings: Settings, options: ReplayOptions, *, as_json: bool) -> int:
    out = sys.stderr if as_json else sys.stdout
    for noisy in ("pygls", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    replay = Replay(settings, options, out)
    try:
        report = await replay.run()
    except (ReplayError, UnsettledError) as error:
        print(f"ghostloop replay: {error}", file=sys.stderr)
        return 2
    finally:
        replay.close()
    if as_json:
        print(json.dumps(report.as_json()))
    else:
        print("", file=out)
        print(format_table(report.as_json()), file=out)
        print(
            f"\nmethod {report.method}, adapter {report.adapter or 'none'}, "
            f"served with {report.backend}; "
            f"{report.seconds:.0f} s; report {Path(report.chart).with_suffix('.json')}, "
            f"chart {report.chart}",
            file=out,
        )
    return 0
