"""``ghostloop train``: one idempotent nightly run from recorded feedback to a published
adapter, guarded by a lock.

Steps (``Night``): label the completions logged since the last completed run (deduplicated,
each user's share capped, split by time with the newest held out, the pairs stored), train,
export (onnxruntime), gate, publish, record.
Every run is a row (parameters, data counts, losses, evaluation, status, timings). A
crash or Ctrl-C at any point leaves the registry and the active adapter as they were: the
adapter is renamed into the registry only after it is complete, and becomes active only
with its row.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from feedback import adapter_rows
from feedback.database import open_store, upgrade
from feedback.schema import PreferencePair, TrainingRun
from ghostloop import onnx_backend, registry
from ghostloop.lora import read_factors
from ghostloop.models import LoadedModel, load_model, served_backend
from ghostloop.onnx_backend import OnnxModel, Served
from ghostloop.settings import Settings
from trainer.gate import GateResult, run_gate
from trainer.labels import (
    DataCounts,
    Example,
    cap_users,
    deduplicate,
    load_examples,
    split_by_time,
)
from trainer.methods import METHODS, TooLittleData, TrainOutcome, peft_model
from trainer.worker import launch

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class AlreadyRunning(RuntimeError):
    """Another ``ghostloop train`` holds the lock."""


@dataclass
class NightlyResult:
    exit_code: int
    message: str
    run_id: int | None = None
    published: str | None = None
    gate: GateResult | None = None
    training: TrainOutcome | None = None


@contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    handle: TextIO = path.open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise AlreadyRunning(
                f"another ghostloop train is running (pid {holder}, lock {path}); "
                "this run changes nothing"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def _last_cutoff(session: Session, base_model: str) -> datetime | None:
    row = session.scalars(
        select(TrainingRun)
        .where(TrainingRun.base_model == base_model, TrainingRun.status == "finished")
        .order_by(TrainingRun.id.desc())
    ).first()
    if row is None or not row.data_counts.get("until"):
        return None
    return datetime.fromisoformat(row.data_counts["until"])


def _parameters(settings: Settings, method: str) -> dict[str, Any]:
    """What the run trained with, as the training_runs row keeps it (flat keys)."""
    training = settings.training
    config = training.config_for(method)
    parameters: dict[str, Any] = {
        "method": method,
        "train_processes": training.processes,
        "lora_rank": training.lora_rank,
        "lora_alpha": training.lora_alpha,
        "lora_targets": training.lora_targets,
        "epochs": training.epochs,
        "train_batch_size": training.batch_size,
        "eval_share": training.eval_share,
        "max_user_share": training.max_user_share,
        "gate_min_lift": training.gate_min_lift,
        "seed": settings.seed,
        "context_tokens": settings.serving.context_tokens,
        "max_new_tokens": settings.serving.max_new_tokens,
        "max_lines": settings.serving.max_lines,
        "learning_rate": config.learning_rate,
        # every method's own settings, and the others' as before, so runs compare
        "dpo_beta": training.dpo.beta,
        "nll_weight": training.dpo.nll_weight if method != "rrhf" else training.rrhf.nll_weight,
        "rrhf_samples": training.rrhf.samples,
    }
    return parameters


def _store_pairs(
    session: Session, run_id: int, train: list[Example], held_out: list[Example]
) -> None:
    for split, examples in (("train", train), ("eval", held_out)):
        for example in examples:
            session.add(
                PreferencePair(
                    completion_id=example.completion_id,
                    run_id=run_id,
                    user=example.user,
                    split=split,
                    prompt_prefix=example.prefix,
                    prompt_suffix=example.suffix,
                    prompt_repository=example.repository,
                    chosen=example.kept,
                    rejected=example.rejected,
                    chosen_chars_saved=len(example.kept.rstrip()),
                    rejected_chars_saved=example.chars_saved,
                    ranking={
                        "candidates": [
                            {"text": example.kept, "source": "kept"},
                            {"text": example.suggestion, "source": "logged suggestion"},
                        ],
                        "outcome": example.outcome,
                        "events": list(example.event_ids),
                    },
                )
            )


def _store_rankings(engine: Engine, run_id: int, rankings: list[dict[str, Any]]) -> None:
    """RRHF's candidates with their characters saved, on the training pairs they rank."""
    with Session(engine) as session, session.begin():
        pairs = session.scalars(
            select(PreferencePair)
            .where(PreferencePair.run_id == run_id, PreferencePair.split == "train")
            .order_by(PreferencePair.id)
        ).all()
        for pair, ranking in zip(pairs, rankings, strict=False):
            candidates = [
                {"text": text, "chars_saved": score}
                for text, score in zip(ranking["texts"], ranking["scores"], strict=True)
            ]
            pair.ranking = {**(pair.ranking or {}), "candidates": candidates}


def _version(method: str, run_id: int) -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{method}-run{run_id}"


def run_nightly(
    settings: Settings, method: str | None = None, *, from_scratch: bool = False
) -> NightlyResult:
    """One nightly run. ``from_scratch``: over everything logged, from the base model (not
    only since the last run, not on top of the active adapter): how the replay trains
    several methods on the same data."""
    method = method or settings.training.method
    if method not in METHODS:
        return NightlyResult(2, f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    try:
        with exclusive(settings.store.data_dir):
            engine = open_store(settings.store)
            try:
                upgrade(engine)
                return _run(settings, method, engine, from_scratch)
            finally:
                engine.dispose()
    except AlreadyRunning as error:
        return NightlyResult(0, str(error))


def _run(settings: Settings, method: str, engine: Engine, from_scratch: bool) -> NightlyResult:
    """The night's steps in order: label, train, export, gate, publish, record."""
    night = Night(settings, method, engine, load_model(settings))
    labelled = night.label(from_scratch)
    if isinstance(labelled, NightlyResult):  # nothing to train: said why
        return labelled
    try:
        outcome = night.train(labelled)
        candidate = night.export(outcome)
        gate = night.gate(outcome, labelled, candidate)
        published = night.publish(outcome, gate, candidate)
        return night.record(outcome, gate, published)
    except TooLittleData as error:
        message = f"too little to train with {method}: {error}"
        night.update_row(status="skipped", reason=message)
        return NightlyResult(0, message, night.run_id)
    except KeyboardInterrupt:
        night.update_row(status="interrupted", reason="Ctrl-C")
        raise
    except Exception as error:
        night.update_row(status="failed", reason=repr(error))
        raise
    finally:
        shutil.rmtree(_staging(settings, night.run_id), ignore_errors=True)


@dataclass(frozen=True)
class Labelled:
    """The night's data: labelled examples split by time, and the adapter it starts from."""

    train: list[Example]
    held_out: list[Example]
    baseline: tuple[Path, str, str] | None  # (path, version, checksum) of the active adapter


@dataclass(frozen=True)
class Candidate:
    """The trained adapter before the gate: its version, and with onnxruntime the baseline's
    and its own exports as a server would serve them (saved in the staging directory)."""

    version: str
    served: tuple[Served, Served] | None


class Night:
    """One nightly run: its settings, model, store and row, and its steps."""

    def __init__(
        self, settings: Settings, method: str, engine: Engine, loaded: LoadedModel
    ) -> None:
        self.settings = settings
        self.method = method
        self.engine = engine
        self.loaded = loaded
        self.started = time.monotonic()
        self.run_id = 0
        self.baseline_path: Path | None = None  # the active adapter, verified, if any
        self.onnx_base: OnnxModel | None = None  # the base export adapter files are for
        self.served_baseline: Served | None = None
        # the LoRA inputs of a base export with the night's slots: every publication carries
        # an onnxruntime adapter file, so a server on either backend can serve it
        self.adapter_shapes: dict[str, tuple[int, int]] | None = None

    def label(self, from_scratch: bool) -> Labelled | NightlyResult:
        """Label the completions logged since the last run, deduplicate, cap each user's
        share, split by time, and store the run's row with its pairs; a NightlyResult
        saying why when there is too little to train."""
        settings, base_model = self.settings, self.loaded.name
        until = datetime.now(UTC)
        with Session(self.engine) as session:
            since = None if from_scratch else _last_cutoff(session, base_model)
            known = [row.version for row in adapter_rows.versions(session)]
            active = None if from_scratch else adapter_rows.active(session, base_model)
            baseline = (Path(active.path), active.version, active.checksum) if active else None
        removed = registry.clean(settings.store.adapters_dir, known)
        if removed:
            log.info("removed unfinished adapter directories: %s", ", ".join(removed))
        with Session(self.engine) as session:
            examples, counts = load_examples(
                session, since=since, until=until, base_model=base_model
            )
        if counts.completions == 0:
            window = f"since {since:%Y-%m-%d %H:%M} UTC" if since else "at all"
            return NightlyResult(
                0, f"nothing to train: no completions of {base_model} logged {window}"
            )
        training = settings.training
        examples = cap_users(deduplicate(examples, counts), training.max_user_share, counts)
        train, held_out = split_by_time(examples, training.eval_share, counts)
        counts_json = {**dataclasses.asdict(counts), "until": until.isoformat()}
        if since is not None:
            counts_json["since"] = since.isoformat()
        run = TrainingRun(
            method=self.method,
            base_model=base_model,
            parameters=_parameters(settings, self.method),
            data_counts=counts_json,
        )
        if len(train) < training.min_train_examples or len(held_out) < training.min_eval_examples:
            message = (
                f"too little to train: {_describe(counts)}; need {training.min_train_examples} "
                f"training and {training.min_eval_examples} held-out examples"
            )
            run_id = _finish_row(self.engine, run, "skipped", message, self.started)
            return NightlyResult(0, message, run_id)
        with Session(self.engine) as session, session.begin():
            session.add(run)
            session.flush()
            _store_pairs(session, run.id, train, held_out)
            self.run_id = run.id
        log.info("run %d: %s %s", self.run_id, self.method, _describe(counts))
        return Labelled(train, held_out, baseline)

    def train(self, labelled: Labelled) -> TrainOutcome:
        """A LoRA trained by the night's method, on top of the active adapter if it is
        intact (from the base model if not); its losses and timings on the run's row."""
        settings, loaded = self.settings, self.loaded
        if labelled.baseline is not None:
            path, version, digest = labelled.baseline
            try:
                registry.verify(path, digest)
                self.baseline_path = path
            except registry.AdapterError as error:
                log.error(
                    "active adapter %s is unusable, training from the base model: %s",
                    version,
                    error,
                )
        # both before training, while the base model has no LoRA yet
        self.adapter_shapes = _adapter_shapes(loaded, settings)
        if served_backend(settings) == "onnxruntime":
            usable = labelled.baseline if self.baseline_path is not None else None
            self.onnx_base, self.served_baseline = _served_baseline(settings, loaded, usable)
        work = settings.store.data_dir / "train-work" / f"run{self.run_id}"
        try:
            if settings.training.processes > 1:
                outcome = launch(
                    settings, loaded, self.method, labelled.train, work, self.baseline_path
                )
            else:
                model = peft_model(loaded, settings, self.baseline_path)
                outcome = METHODS[self.method](loaded, settings, model, labelled.train, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.update_row(losses=_losses(outcome), status="evaluating")
        if "rankings" in outcome.extra:  # rrhf: store each prompt's ranked candidates
            _store_rankings(self.engine, self.run_id, outcome.extra["rankings"])
        return outcome

    def export(self, outcome: TrainOutcome) -> Candidate:
        """With onnxruntime, the candidate as it would be published and served: saved with
        its adapter file for the base export into the staging directory, so that the file
        the gate judges is the one published with it."""
        version = _version(self.method, self.run_id)
        base = self.onnx_base
        if self.served_baseline is None or base is None:
            return Candidate(version, None)
        staged = _staging(self.settings, self.run_id)
        _save_adapter(outcome.model, staged)
        shapes = {name: shape for name, (shape, _) in base.lora_inputs.items()}
        _write_adapter_file(staged, shapes, base.model_name, version)
        candidate = onnx_backend.adapter_file(
            staged, base, version=version, checksum=registry.checksum(staged)
        )
        return Candidate(version, (self.served_baseline, (base, candidate)))

    def gate(self, outcome: TrainOutcome, labelled: Labelled, candidate: Candidate) -> GateResult:
        """The candidate against the adapter it would replace, on the held-out examples."""
        baseline = labelled.baseline
        return run_gate(
            self.loaded,
            self.settings,
            outcome.model,
            labelled.held_out,
            baseline_adapter=self.baseline_path,
            baseline_name=baseline[1] if self.baseline_path and baseline else "base model",
            served=candidate.served,
        )

    def publish(self, outcome: TrainOutcome, gate: GateResult, candidate: Candidate) -> str | None:
        """Into the registry (written under a temporary name, checksummed, renamed) and the
        adapters table, if the gate passed it or is not enforced; the version, or None."""
        settings = self.settings
        if not (gate.passed or not settings.training.gate_enforced):
            return None
        staged = _staging(settings, self.run_id)

        def save(directory: Path) -> None:
            if candidate.served is not None:
                for entry in staged.iterdir():
                    shutil.move(entry, directory / entry.name)
                return
            _save_adapter(outcome.model, directory)
            if self.adapter_shapes is not None:
                _write_adapter_file(
                    directory, self.adapter_shapes, self.loaded.name, candidate.version
                )

        path, digest = registry.write_atomically(
            settings.store.adapters_dir, candidate.version, save
        )
        with Session(self.engine) as session, session.begin():
            adapter_rows.publish(
                session,
                version=candidate.version,
                base_model=self.loaded.name,
                run_id=self.run_id,
                path=path,
                checksum=digest,
                evidence={"gate": gate.to_json(), "method": self.method, "gated": gate.passed},
                canary_share=settings.canary.share,
            )
            pruned = adapter_rows.prune(session, settings.training.keep_adapters)
        if pruned:
            log.info("pruned adapter files of %s", ", ".join(pruned))
        return candidate.version

    def record(
        self, outcome: TrainOutcome, gate: GateResult, published: str | None
    ) -> NightlyResult:
        """The run's row finished with its decision and evidence, and the night's line."""
        timings = {**_losses(outcome), "seconds": round(time.monotonic() - self.started, 3)}
        with Session(self.engine) as session, session.begin():
            row = session.get(TrainingRun, self.run_id)
            assert row is not None
            row.status = "finished"
            row.decision = "published" if published else "refused"
            row.reason = gate.reason if gate.passed or not published else _ungated(gate.reason)
            row.evaluation = gate.to_json()
            row.losses = timings
            row.finished_at = datetime.now(UTC)
        verdict = f"published {published}" if published else "not published"
        if published and not gate.passed:
            verdict += " although the gate refused it (gate_enforced=false)"
        share = self.settings.canary.share
        if published and share:
            verdict += f" as a canary for {share:.0%} of users"
        message = (
            f"run {self.run_id} ({self.method}): {verdict}: {gate.reason}; train loss "
            f"{outcome.loss_before:.3f} -> {outcome.loss_after:.3f}"
        )
        return NightlyResult(0, message, self.run_id, published, gate, outcome)

    def update_row(self, **values: Any) -> None:
        if self.run_id:
            _update_row(self.engine, self.run_id, started=self.started, **values)


def _losses(outcome: TrainOutcome) -> dict[str, Any]:
    return {
        "train_loss_before": outcome.loss_before,
        "train_loss_after": outcome.loss_after,
        "history": outcome.history,
        "train_seconds": round(outcome.seconds, 3),
        "examples_per_s": outcome.examples_per_s,
        "tokens_per_s": outcome.tokens_per_s,
        "processes": int(outcome.extra.get("processes", 1)),
    }


def _staging(settings: Settings, run_id: int) -> Path:
    """Where the candidate is written before the gate when the gate judges its export: moved
    into the registry when published, removed otherwise."""
    return settings.store.data_dir / "train-work" / f"run{run_id}-candidate"


def _save_adapter(model: Any, directory: Path) -> None:
    model.save_pretrained(str(directory), selected_adapters=["default"], safe_serialization=True)


def _served_baseline(
    settings: Settings, loaded: LoadedModel, baseline: tuple[Path, str, str] | None
) -> tuple[OnnxModel | None, Served | None]:
    """The base export (made before training, while the base model has no LoRA yet) and
    what the baseline serves on it for the gate: the base alone, or the active adapter's
    file; None, and the gate generates with torch, when there is no usable one (an active
    adapter published under torch, say)."""
    try:
        base = onnx_backend.base_export(loaded, settings)
    except onnx_backend.OnnxExportError as error:
        log.warning("the gate generates with torch: the base export: %s", error)
        return None, None
    if base.lora is None:
        log.warning("the gate generates with torch: the base export has no LoRA slots")
        return base, None
    if baseline is None:
        return base, (base, None)
    path, version, checksum = baseline
    try:
        return base, (
            base,
            onnx_backend.adapter_file(path, base, version=version, checksum=checksum),
        )
    except onnx_backend.OnnxExportError as error:
        log.warning("the gate generates with torch: the baseline's adapter file: %s", error)
        return base, None


def _adapter_shapes(loaded: LoadedModel, settings: Settings) -> dict[str, tuple[int, int]] | None:
    """The LoRA inputs of ``loaded``'s base export, or None (and no adapter files) where
    onnxruntime is not installed or the model lacks a target the slots name."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        return onnx_backend.slot_shapes(loaded.model, onnx_backend.slots_for(settings))
    except onnx_backend.OnnxExportError as error:
        log.warning("publishing without onnxruntime adapter files: %s", error)
        return None


def _write_adapter_file(
    directory: Path, shapes: Mapping[str, tuple[int, ...]], model_name: str, version: str
) -> None:
    """The adapter saved at ``directory`` as an onnxruntime adapter file for an export with
    the LoRA inputs ``shapes`` (a few MB, bound at run time), inside the version's
    directory before it is published."""
    weights = read_factors(
        directory, version=version, expected_checksum=registry.checksum(directory)
    )
    onnx_backend.write_adapter(
        weights, directory / registry.EXPORT_DIR, shapes, model_name=model_name
    )


def _ungated(reason: str) -> str:
    return f"published without the gate's approval (gate_enforced=false); the gate said: {reason}"


def _describe(counts: DataCounts) -> str:
    return (
        f"{counts.completions} completions, {counts.labelled} labelled "
        f"({counts.unsettled} not settled yet, {counts.no_target} rejected with nothing typed "
        f"instead, {counts.unlabelled} without a fate, {counts.corrupt} corrupt), "
        f"{counts.duplicates} duplicates, {counts.capped} over a user's share, "
        f"{counts.train} to train and {counts.eval} held out"
    )


def _finish_row(engine: Engine, run: TrainingRun, status: str, reason: str, started: float) -> int:
    with Session(engine) as session, session.begin():
        run.status = status
        run.reason = reason
        run.finished_at = datetime.now(UTC)
        run.losses = {"seconds": round(time.monotonic() - started, 3)}
        session.add(run)
        session.flush()
        return run.id


def _update_row(engine: Engine, run_id: int, *, started: float, **values: Any) -> None:
    with Session(engine) as session, session.begin():
        row = session.get(TrainingRun, run_id)
        if row is None:
            return
        for name, value in values.items():
            setattr(row, name, value)
        row.finished_at = datetime.now(UTC)
        timings = dict(row.losses or {})
        timings["seconds"] = round(time.monotonic() - started, 3)
        row.losses = timings
