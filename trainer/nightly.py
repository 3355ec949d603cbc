"""``ghostloop train``: one idempotent nightly run from recorded feedback to a published
adapter, guarded by a lock.

Steps: label the completions logged since the last completed run, deduplicate, cap each
user's share, split by time (newest held out), store the pairs, train, gate, publish.
Every run is a row (parameters, data counts, losses, evaluation, status, timings). A
crash or Ctrl-C at any point leaves the registry and the active adapter as they were: the
adapter is renamed into the registry only after it is complete, and becomes active only
with its row.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from feedback import adapters as adapter_rows
from feedback.database import open_store, upgrade
from feedback.schema import PreferencePair, TrainingRun
from ghostloop import adapters as registry
from ghostloop import onnx_backend
from ghostloop.models import LoadedModel, load_model
from ghostloop.onnx_backend import OnnxModel
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
    started = time.monotonic()
    until = datetime.now(UTC)
    loaded = load_model(settings)
    base_model = loaded.name
    with Session(engine) as session:
        since = None if from_scratch else _last_cutoff(session, base_model)
        known = [row.version for row in adapter_rows.versions(session)]
        active = None if from_scratch else adapter_rows.active(session, base_model)
        baseline = (Path(active.path), active.version, active.checksum) if active else None
    removed = registry.clean(settings.store.adapters_dir, known)
    if removed:
        log.info("removed unfinished adapter directories: %s", ", ".join(removed))

    with Session(engine) as session:
        examples, counts = load_examples(session, since=since, until=until, base_model=base_model)
    if counts.completions == 0:
        window = f"since {since:%Y-%m-%d %H:%M} UTC" if since else "at all"
        return NightlyResult(0, f"nothing to train: no completions of {base_model} logged {window}")
    examples = cap_users(deduplicate(examples, counts), settings.training.max_user_share, counts)
    train, held_out = split_by_time(examples, settings.training.eval_share, counts)
    counts_json = {**dataclasses.asdict(counts), "until": until.isoformat()}
    if since is not None:
        counts_json["since"] = since.isoformat()
    run = TrainingRun(
        method=method,
        base_model=base_model,
        parameters=_parameters(settings, method),
        data_counts=counts_json,
    )
    training = settings.training
    if len(train) < training.min_train_examples or len(held_out) < training.min_eval_examples:
        message = (
            f"too little to train: {_describe(counts)}; need {training.min_train_examples} "
            f"training and {training.min_eval_examples} held-out examples"
        )
        run_id = _finish_row(engine, run, "skipped", message, started)
        return NightlyResult(0, message, run_id)

    with Session(engine) as session, session.begin():
        session.add(run)
        session.flush()
        _store_pairs(session, run.id, train, held_out)
        run_id = run.id
    log.info("run %d: %s %s", run_id, method, _describe(counts))
    try:
        return _train_gate_publish(
            settings, loaded, engine, run_id, method, train, held_out, baseline, started
        )
    except TooLittleData as error:
        message = f"too little to train with {method}: {error}"
        _update_row(engine, run_id, status="skipped", reason=message, started=started)
        return NightlyResult(0, message, run_id)
    except KeyboardInterrupt:
        _update_row(engine, run_id, status="interrupted", reason="Ctrl-C", started=started)
        raise
    except Exception as error:
        _update_row(engine, run_id, status="failed", reason=repr(error), started=started)
        raise
    finally:
        shutil.rmtree(_staging(settings, run_id), ignore_errors=True)


def _staging(settings: Settings, run_id: int) -> Path:
    """Where the candidate is written before the gate when the gate judges its export: moved
    into the registry when published, removed otherwise."""
    return settings.store.data_dir / "train-work" / f"run{run_id}-candidate"


def _save_adapter(model: Any, directory: Path) -> None:
    model.save_pretrained(str(directory), selected_adapters=["default"], safe_serialization=True)


def _served_baseline(
    settings: Settings, loaded: LoadedModel, baseline: tuple[Path, str, str] | None
) -> OnnxModel | None:
    """The baseline's onnxruntime export for the gate, loaded before training (while the
    base model has no LoRA yet, so it can be exported if it never was); None, and the gate
    generates with torch, when there is no usable one (an active adapter published under
    torch, say)."""
    try:
        if baseline is None:
            return onnx_backend.base_export(loaded, settings)
        path, version, checksum = baseline
        return onnx_backend.adapter_export(
            path, loaded, settings, version=version, checksum=checksum
        )
    except onnx_backend.OnnxExportError as error:
        log.warning("the gate generates with torch: the baseline's export: %s", error)
        return None


def _export_onnx(model: Any, directory: Path, loaded: LoadedModel, version: str) -> None:
    """The onnxruntime backend serves a model with the adapter folded into its weights:
    export it now, inside the version's directory before it is published, in the graph
    for this machine's device (onnx_backend.fused_for)."""
    import copy

    folded = copy.deepcopy(model).merge_and_unload()  # peft: W + scale * B A, plain Linears
    identity = (version, registry.checksum(directory))
    onnx_backend.export(
        folded,
        directory / registry.EXPORT_DIR,
        model_name=loaded.name,
        identity=identity,
        fused=onnx_backend.fused_for(loaded),
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


def _train_gate_publish(
    settings: Settings,
    loaded: LoadedModel,
    engine: Engine,
    run_id: int,
    method: str,
    train: list[Example],
    held_out: list[Example],
    baseline: tuple[Path, str, str] | None,
    started: float,
) -> NightlyResult:
    baseline_path = None
    if baseline is not None:
        path, version, digest = baseline
        try:
            registry.verify(path, digest)
            baseline_path = path
        except registry.AdapterError as error:
            log.error(
                "active adapter %s is unusable, training from the base model: %s", version, error
            )
    work = settings.store.data_dir / "train-work" / f"run{run_id}"
    staged = _staging(settings, run_id)
    served_baseline = None
    if settings.inference.backend == "onnxruntime":
        usable = baseline if baseline_path is not None else None  # the verified one
        served_baseline = _served_baseline(settings, loaded, usable)
    try:
        if settings.training.processes > 1:
            outcome = launch(settings, loaded, method, train, work, baseline_path)
        else:
            model = peft_model(loaded, settings, baseline_path)
            outcome = METHODS[method](loaded, settings, model, train, work)
        model = outcome.model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    losses = {
        "train_loss_before": outcome.loss_before,
        "train_loss_after": outcome.loss_after,
        "history": outcome.history,
        "train_seconds": round(outcome.seconds, 3),
        "examples_per_s": outcome.examples_per_s,
        "tokens_per_s": outcome.tokens_per_s,
        "processes": int(outcome.extra.get("processes", 1)),
    }
    _update_row(engine, run_id, losses=losses, started=started, status="evaluating")
    if "rankings" in outcome.extra:  # rrhf: store each prompt's ranked candidates
        _store_rankings(engine, run_id, outcome.extra["rankings"])
    version = _version(method, run_id)
    served = None
    if served_baseline is not None:
        # the candidate as it would be published and served: its export judged by the gate
        # is the one published with it
        _save_adapter(model, staged)
        _export_onnx(model, staged, loaded, version)
        served = (
            served_baseline,
            onnx_backend.adapter_export(
                staged, loaded, settings, version=version, checksum=registry.checksum(staged)
            ),
        )
    gate = run_gate(
        loaded,
        settings,
        model,
        held_out,
        baseline_adapter=baseline_path,
        baseline_name=baseline[1] if baseline_path and baseline else "base model",
        served=served,
    )
    evaluation = gate.to_json()
    published = None
    if gate.passed or not settings.training.gate_enforced:

        def save(directory: Path) -> None:
            if served is not None:
                for entry in staged.iterdir():
                    shutil.move(entry, directory / entry.name)
                return
            _save_adapter(model, directory)
            if settings.inference.backend == "onnxruntime":
                _export_onnx(model, directory, loaded, version)

        path, digest = registry.write_atomically(settings.store.adapters_dir, version, save)
        with Session(engine) as session, session.begin():
            adapter_rows.publish(
                session,
                version=version,
                base_model=loaded.name,
                run_id=run_id,
                path=path,
                checksum=digest,
                evidence={"gate": evaluation, "method": method, "gated": gate.passed},
                canary_share=settings.canary.share,
            )
            pruned = adapter_rows.prune(session, settings.training.keep_adapters)
        if pruned:
            log.info("pruned adapter files of %s", ", ".join(pruned))
        published = version
    timings = {**losses, "seconds": round(time.monotonic() - started, 3)}
    with Session(engine) as session, session.begin():
        row = session.get(TrainingRun, run_id)
        assert row is not None
        row.status = "finished"
        row.decision = "published" if published else "refused"
        row.reason = gate.reason if gate.passed or not published else _ungated(gate.reason)
        row.evaluation = evaluation
        row.losses = timings
        row.finished_at = datetime.now(UTC)
    verdict = f"published {published}" if published else "not published"
    if published and not gate.passed:
        verdict += " although the gate refused it (gate_enforced=false)"
    if published and settings.canary.share:
        verdict += f" as a canary for {settings.canary.share:.0%} of users"
    message = (
        f"run {run_id} ({method}): {verdict}: {gate.reason}; train loss "
        f"{outcome.loss_before:.3f} -> {outcome.loss_after:.3f}"
    )
    return NightlyResult(0, message, run_id, published, gate, outcome)
