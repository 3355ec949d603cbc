"""``ghostloop replay PATH``: a simulated developer proves (or disproves) the loop on real code.

The developer works through the repository's source files through the real server over
LSP. At each sampled cursor (line starts after the indentation, mid-line after a token;
comments and strings skipped) the document holds the file with the rest of that line
removed; the developer asks for an inline completion and reacts against the code that
really follows (``feedback.metrics.judge``): accepts an exact line, accepts a close one and
edits it into the true line, rejects the rest and types the true line. The server records
all of it as real events; survival windows are shortened so that the fates settle in
seconds.

Files are split by path (seeded) into a training half and a held-out half. In order:

1. baseline on the training half (server user ``replay-train``): the night's data;
2. a server for the held-out half starts (user ``replay-heldout``, adapters read at start
   only, so it keeps serving the base model);
3. one nightly ``ghostloop train`` over what step 1 recorded (the held-out half has not been
   replayed yet, so none of it can leak into training);
4. baseline on the held-out half, on that server (still the base model);
5. ``ghostloop/reloadAdapters``: the server hot-swaps the published adapter in;
6. the same held-out positions again.

The report (``feedback.replay_report``) is computed from the stored rows; it is printed,
written to ``report.json`` with a chart ``report.png`` in the replay's own data directory,
and ``--json`` prints it on stdout (schema in DESIGN.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from feedback import adapters as adapter_rows
from feedback import replay_report
from feedback.database import StoreError, default_database_url, open_engine, upgrade
from feedback.metrics import EDIT_SIMILARITY, judge
from feedback.replay_report import Position, Scored, UnsettledError
from feedback.schema import AdapterVersion, Completion, TrainingRun
from feedback.store import events_by_completion
from ghostloop.corpus import sample_positions
from ghostloop.settings import Settings, backend_name
from lsp_server.client import GhostloopClient

log = logging.getLogger(__name__)

TRAIN_USER = "replay-train"
HELD_OUT_USER = "replay-heldout"
SKIPPED_DIRS = {".git", ".hg", ".venv", "venv", "node_modules", "__pycache__", "build", "dist"}
# The replay measures what the model suggests, not how busy the machine is: with the
# server's deadline (3 s) a slow moment cut a suggestion short, and the same walk on a
# loaded machine scored differently. Latency is measured and reported all the same.
REPLAY_DEADLINE_MS = 600_000


class ReplayError(RuntimeError):
    """The replay cannot run as asked; the message says why and what to do."""


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


@dataclass
class Pass:
    """One walk over a set of positions: which completion each position was served."""

    name: str
    served: dict[str, str | None] = field(default_factory=dict)
    reactions: dict[str, str] = field(default_factory=dict)


def source_files(root: Path) -> list[Path]:
    """The Python files under ``root`` (a file counts as a repository of one), sorted."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ReplayError(f"{root} is neither a directory nor a file: give a repository path")
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & SKIPPED_DIRS or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            files.append(path)
    return files


def split_files(files: Sequence[Path], root: Path, seed: int) -> tuple[list[Path], list[Path]]:
    """Training half and held-out half, by a seeded hash of each relative path."""
    if len(files) < 2:
        raise ReplayError(
            f"{root} has {len(files)} Python file(s); the replay splits files into a training "
            "and a held-out half, so it needs at least two"
        )

    def rank(path: Path) -> str:
        relative = path.relative_to(root) if path != root else Path(path.name)
        return hashlib.sha256(f"{seed}:{relative.as_posix()}".encode()).hexdigest()

    ordered = sorted(files, key=rank)
    middle = len(ordered) // 2
    return sorted(ordered[:middle]), sorted(ordered[middle:])


def choose_positions(files: Sequence[Path], root: Path, count: int, seed: int) -> list[Position]:
    """``count`` positions over ``files``, at most one per line (a line is typed once)."""
    pool: list[Position] = []
    per_file = max(4, -(-count * 3 // max(1, len(files))))
    rng = random.Random(seed)
    for path in files:
        seen: set[int] = set()
        relative = path.relative_to(root).as_posix() if path != root else path.name
        samples = sample_positions(path, per_file, seed=seed)
        rng.shuffle(samples)  # which of a line's positions stays is left to chance, not order
        for sample in samples:
            if sample.line in seen or not sample.true_line_rest.strip():
                continue
            seen.add(sample.line)
            pool.append(
                Position(
                    key=f"{relative}:{sample.line}:{sample.character}",
                    path=relative,
                    line=sample.line,
                    character=sample.character,
                    kind=sample.kind,
                    truth=sample.true_line_rest,
                )
            )
    chosen = rng.sample(pool, min(count, len(pool)))
    return sorted(chosen, key=lambda p: (p.path, p.line))


def _offset(text: str, line: int, character: int) -> int:
    lines = text.split("\n")
    start = sum(len(part) + 1 for part in lines[:line])
    # character is in UTF-16 code units (LSP); walk the line to the same place
    units = 0
    for index, char in enumerate(lines[line]):
        if units >= character:
            return start + index
        units += 2 if ord(char) > 0xFFFF else 1
    return start + len(lines[line])


class Developer:
    """Asks at each position and reacts as someone who knows the code that follows."""

    def __init__(self, client: GhostloopClient, root: Path, edit_threshold: float) -> None:
        self.client = client
        self.base = root if root.is_dir() else root.parent  # a file is a repository of one
        self.edit_threshold = edit_threshold
        self._open: set[str] = set()

    async def work(self, positions: Sequence[Position], walk: Pass, bar: tqdm | None) -> None:
        for position in positions:
            walk.reactions[position.key], walk.served[position.key] = await self.one(position)
            if bar is not None:
                bar.update(1)

    async def one(self, position: Position) -> tuple[str, str | None]:
        path = self.base / position.path
        source = path.read_text(encoding="utf-8")
        uri = path.resolve().as_uri()
        if uri not in self._open:
            self.client.open(uri, source)
            self._open.add(uri)
        offset = _offset(source, position.line, position.character)
        cut = source[:offset] + source[offset + len(position.truth) :]
        self.client.replace(uri, cut)
        got = await self.client.inline(uri, position.line, position.character)
        suggestion = got.text.split("\n", 1)[0]
        if got.completion_id is None or not suggestion.strip():
            if got.completion_id is not None:  # blank: passed over, the line typed instead
                self.client.feedback(got.completion_id, "rejected")
            self.client.replace(uri, source)
            return "empty", got.completion_id
        outcome = judge(suggestion, position.truth, self.edit_threshold)
        if outcome.reaction in ("accepted", "edited"):
            # the editor inserts the suggestion and runs its accept command; an edit then
            # turns what was inserted into the true line
            self.client.replace(uri, cut[:offset] + got.text + cut[offset:])
            await self.client.accept(got.completion_id)
        else:
            self.client.feedback(got.completion_id, "rejected")
        self.client.replace(uri, source)
        return outcome.reaction, got.completion_id


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
        self.work_dir = options.work_dir or settings.data_dir / "replays" / stamp
        self.url = options.database_url or default_database_url(self.work_dir)
        self.windows = tuple(float(part) for part in options.windows_s.split(","))
        self._engine: Engine | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def env(self, user: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "GHOSTLOOP_DATA_DIR": str(self.work_dir),
                # the converted model is the user's, not the replay's: not made again each run
                "GHOSTLOOP_MODEL_CACHE": str(self.settings.model_cache_dir),
                "GHOSTLOOP_DATABASE_URL": self.url,
                "GHOSTLOOP_MODEL": self.settings.model,
                # servers and the nightly job (which exports adapters for onnxruntime) alike
                "GHOSTLOOP_BACKEND": self.settings.backend,
                "GHOSTLOOP_ONNX_INT8": str(self.settings.onnx_int8).lower(),
                "GHOSTLOOP_DEVICE": self.settings.device,
                "GHOSTLOOP_USER": user,
                "GHOSTLOOP_HASH_USER": "false",
                "GHOSTLOOP_TELEMETRY": "true",
                "GHOSTLOOP_SURVIVAL_WINDOWS_S": self.options.windows_s,
                "GHOSTLOOP_MAX_LINES": "1",
                "GHOSTLOOP_DEADLINE_MS": str(REPLAY_DEADLINE_MS),
                "GHOSTLOOP_ADAPTER_POLL_S": "0",
                "GHOSTLOOP_CANARY_SHARE": "0",
                "GHOSTLOOP_LOG_LEVEL": os.environ.get("GHOSTLOOP_LOG_LEVEL", "WARNING"),
            }
        )
        return env

    async def start_server(self, user: str) -> GhostloopClient:
        client = await GhostloopClient.start(env=self.env(user))
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

    async def walk(self, client: GhostloopClient, positions: Sequence[Position], name: str) -> Pass:
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
            await Developer(client, self.options.root, self.options.edit_threshold).work(
                positions, walk, bar
            )
        ids = [cid for cid in walk.served.values() if cid]
        await asyncio.to_thread(
            wait_settled, self.engine, ids, self.windows[-1], self.windows[-1] + 60.0
        )
        return walk

    def train(self, method: str) -> dict[str, Any]:
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
        return {
            "method": method,
            "message": message,
            "seconds": round(seconds, 1),
            "adapter": adapter,
            "gate_passed": gate.get("passed"),
        }

    def serve_adapter(self, version: str) -> None:
        with Session(self.engine) as session, session.begin():
            adapter_rows.promote(session, version, by="replay")

    def scores(self, positions: Sequence[Position], walk: Pass) -> list[Scored]:
        with Session(self.engine) as session:
            return replay_report.load_scores(session, positions, walk.served)

    async def run(self) -> dict[str, Any]:
        options = self.options
        root = options.root.resolve()
        self.options = options = dataclasses.replace(options, root=root)
        methods = list(options.methods) or [self.settings.train_method]
        files = source_files(root)
        train_files, held_files = split_files(files, root, options.seed)
        train_count = (
            options.positions if options.train_positions is None else options.train_positions
        )
        train_positions = choose_positions(train_files, root, train_count, options.seed)
        held_positions = choose_positions(held_files, root, options.positions, options.seed)
        if not train_positions or not held_positions:
            raise ReplayError(f"no cursor positions in the code under {root}")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._engine = self.open_store()
        self.say(
            f"replay of {root}: {len(train_files)} files to train on "
            f"({len(train_positions)} positions), {len(held_files)} held out "
            f"({len(held_positions)} positions); seed {options.seed}; data in {self.work_dir}"
        )
        started = time.perf_counter()
        client = await self.start_server(TRAIN_USER)
        try:
            model = (await client.status())["model"]
            training_pass = await self.walk(client, train_positions, "baseline, training half")
        finally:
            await client.stop()
        walks = [training_pass]
        trained: list[dict[str, Any]] = []
        after: dict[str, Pass] = {}
        held = await self.start_server(HELD_OUT_USER)  # reads adapters at start only: none yet
        try:
            for method in methods:
                self.say(f"training ({method}) on the training half ...")
                trained.append(self.train(method))
                self.say(trained[-1]["message"])
            before = await self.walk(held, held_positions, "baseline, held-out half")
            walks.append(before)
            for run in trained:
                version = run["adapter"]
                if not version:
                    self.say(f"{run['method']}: no adapter was published, nothing to replay")
                    continue
                self.serve_adapter(version)
                reloaded = await held.reload_adapters()
                if reloaded.get("adapter") != version:
                    raise ReplayError(
                        f"the server did not swap {version} in: {reloaded.get('refused')}"
                    )
                self.say(f"the server hot-swapped {version} in")
                after[run["method"]] = await self.walk(
                    held, held_positions, f"{version}, held-out half"
                )
                walks.append(after[run["method"]])
        finally:
            await held.stop()
        before_scores = self.scores(held_positions, before)
        results = {}
        for run in trained:
            walk = after.get(run["method"])
            scores = self.scores(held_positions, walk) if walk else None
            results[run["method"]] = {
                **run,
                **replay_report.compare(held_positions, before_scores, scores, options.seed),
                "served": walk.served if walk else None,
            }
        first = results[methods[0]]
        report: dict[str, Any] = {
            "before": first["before"],
            "after": first["after"],
            "paired_lift": first["paired_lift"],
            "by_kind": first["by_kind"],
            "kept_length": first["kept_length"],
            "model": model,
            "backend": backend_name(self.settings),
            "method": methods[0],
            "adapter": first["adapter"],
            "gated": not options.ungated,
            "methods": {
                name: {k: v for k, v in result.items() if k != "before"}
                for name, result in results.items()
            },
            "reach": replay_report.reach(
                held_positions,
                before_scores,
                train_positions,
                [path.read_text(encoding="utf-8", errors="replace") for path in train_files],
            ),
            "training_half": replay_report.summary(
                self.scores(train_positions, training_pass), options.seed
            ),
            "split": {
                "seed": options.seed,
                "root": str(root),
                "train_files": [p.relative_to(root).as_posix() for p in train_files],
                "held_out_files": [p.relative_to(root).as_posix() for p in held_files],
                "train_positions": len(train_positions),
                "held_out_positions": len(held_positions),
            },
            "reactions": {walk.name: dict(Counter(walk.reactions.values())) for walk in walks},
            "seconds": round(time.perf_counter() - started, 1),
            "store": self.url,
            "positions": replay_report.position_rows(held_positions),
            "served": {"before": before.served, "after": first["served"]},
        }
        passes = [("base model", report["before"])]
        passes += [
            (f"{name}: {result['adapter']}", result["after"])
            for name, result in results.items()
            if result["after"]
        ]
        report["chart"] = str(replay_report.chart(passes, self.work_dir / "report.png"))
        (self.work_dir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
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
        print(json.dumps(report))
    else:
        print("", file=out)
        print(replay_report.format_table(report), file=out)
        print(
            f"\nmethod {report['method']}, adapter {report['adapter'] or 'none'}, "
            f"served with {report['backend']}; "
            f"{report['seconds']:.0f} s; report {Path(report['chart']).with_suffix('.json')}, "
            f"chart {report['chart']}",
            file=out,
        )
    return 0
