"""The server follows the adapters table: new versions hot-swapped in, canaries judged.

A thread polls the table every ``adapter_poll_s`` (and at once on
``ghostloop/reloadAdapters``). A version the server does not hold yet is read, checked
(checksum, safetensors only, every factor fits the served model) and then put in force by
replacing the engine's ServingState in one assignment: jobs that started keep the state
they read, new jobs get the new one, nothing waits. A version that fails its checks is
refused with a log line naming why; what served before keeps serving. Only the active and
the canary adapter are held; a replaced one is dropped with the last job that used it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from feedback import adapter_rows
from feedback import canary as canaries
from feedback.database import StoreError, open_store
from feedback.schema import AdapterVersion
from ghostloop.lora import read_adapter
from ghostloop.onnx_backend import OnnxModel, adapter_file
from ghostloop.registry import AdapterError
from ghostloop.settings import Settings
from lsp_server.engine import Adapter, CompletionEngine, ServingState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wanted:
    """What the table says should serve."""

    active: AdapterVersion | None
    canary: AdapterVersion | None


class AdapterWatcher:
    """Keeps ``engine.serving`` equal to what the adapters table names, where it can."""

    def __init__(self, settings: Settings, engine: CompletionEngine) -> None:
        self.settings = settings
        self.engine = engine
        self._db: Engine | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ghostloop-adapters", daemon=True)
        # (version, checksum, for onnxruntime) -> why
        self._refused: dict[tuple[str, str, bool], str] = {}
        self._held = Wanted(None, None)  # the rows of the adapters in force
        self._last_canary_check = 0.0
        self.swaps = 0
        self.last_read_ms: float | None = None  # reading and checking the new adapter
        self.error: str | None = None

    # -- life
    def start(self) -> None:
        if self.settings.canary.adapter_poll_s > 0:
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop polling and wait for a check in progress (it may be loading weights)."""
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.settings.canary.adapter_poll_s)
            self._wake.clear()
            if self._stopped.is_set() or self.engine.loaded is None:
                continue
            try:
                self.check()
            except Exception:  # the watcher must outlive any one bad check
                log.exception("checking the adapters table failed")

    # -- checks
    def _database(self) -> Engine | None:
        if self._db is None:
            self._db = open_store(self.settings.store)  # a bad URL raises StoreError; made once
        database = self._db.url.database
        sqlite = self._db.url.get_backend_name() == "sqlite"
        if sqlite and database and not Path(database).is_file():
            return None  # no store yet: nothing was ever published
        return self._db

    def _wanted(self, session: Session, base_model: str) -> Wanted:
        return Wanted(
            adapter_rows.active(session, base_model), adapter_rows.canary(session, base_model)
        )

    def check(self) -> dict[str, Any]:
        """Bring the served adapters in line with the table now; returns ``status()``."""
        with self._lock:
            self._check()
        return self.status()

    def _check(self) -> None:
        # the backend to serve on, taken first: the adapters are read for it and the state
        # put in force names it (a background export may make onnxruntime serve meanwhile)
        base = self.engine.onnx_base
        if self.engine.loaded is None:
            return
        try:
            database = self._database()
        except StoreError as error:
            self._fail(str(error), base)
            return
        if database is None:  # no store yet: nothing was ever published
            self._apply(Wanted(None, None), base)
            return
        base_model = self.engine.model_name
        try:
            with Session(database, expire_on_commit=False) as session:
                if self._canary_due():
                    self._judge_canary(session, base_model)
                wanted = self._wanted(session, base_model)
        except SQLAlchemyError as error:
            message = " ".join(str(error).split())[:300]
            self._fail(f"cannot read the adapters table: {message}", base)
            return
        if self.error is not None:
            log.info("adapters table readable again")
        self.error = None
        self._apply(wanted, base)

    def _fail(self, message: str, base: OnnxModel | None) -> None:
        if message != self.error:
            log.warning("%s; the adapters in force keep serving", message)
        self.error = message
        if base is not self.engine.serving.onnx_base:  # the backend changes all the same
            self._apply(self._held, base)

    def _canary_due(self) -> bool:
        return time.monotonic() - self._last_canary_check >= self.settings.canary.check_s

    def _judge_canary(self, session: Session, base_model: str) -> None:
        self._last_canary_check = time.monotonic()
        canaries.check(session, base_model, **self.settings.canary_plan)

    def _weights(self, row: AdapterVersion | None, base: OnnxModel | None) -> Adapter | None:
        """The weights for ``row`` on ``base``'s backend: held already or read now; None
        when ``row`` is or when they are refused."""
        if row is None:
            return None
        serving = self.engine.serving
        for held in (serving.active, serving.canary):
            if (
                held is not None
                and (held.version, held.checksum) == (row.version, row.checksum)
                and serving.onnx_base is base
            ):
                return held
        return self._load(row, base)

    def _load(self, row: AdapterVersion, base: OnnxModel | None) -> Adapter | None:
        key = (row.version, row.checksum, base is not None)
        if key in self._refused:
            return None
        started = time.perf_counter()
        try:
            weights = self._read(row, base)
        except AdapterError as error:
            self._refused[key] = str(error)
            log.error("refused adapter %s: %s", row.version, error)
            return None
        self.last_read_ms = (time.perf_counter() - started) * 1000
        log.info("read adapter %s in %.1f ms", row.version, self.last_read_ms)
        return weights

    def _read(self, row: AdapterVersion, base: OnnxModel | None) -> Adapter:
        """The adapter checked against the served model: LoRA factors for the torch
        backend; for onnxruntime, the adapter file published beside them, checked against
        the base export and bound per request."""
        directory, loaded = Path(row.path), self.engine.loaded
        # the registry's checks (files, checksum, factors that fit) hold for both backends
        weights = read_adapter(
            directory, loaded.model, version=row.version, expected_checksum=row.checksum
        )
        if base is None:
            return weights
        return adapter_file(directory, base, version=row.version, checksum=row.checksum)

    def _apply(self, wanted: Wanted, base: OnnxModel | None) -> None:
        current = self.engine.serving
        rebase = base is not current.onnx_base
        active = self._weights(wanted.active, base)
        if active is None and wanted.active is not None:
            if rebase:  # the active adapter cannot serve on the new backend: stay
                log.error(
                    "adapter %s cannot be served on %s; %s keeps serving it",
                    wanted.active.version,
                    "onnxruntime" if base is not None else "torch",
                    "onnxruntime" if current.onnx_base is not None else "torch",
                )
                return
            # a refused active version leaves what served before serving
            active, wanted = current.active, Wanted(self._held.active, wanted.canary)
        canary = self._weights(wanted.canary, base)  # a refused canary: none
        share = float(wanted.canary.canary_share or 0.0) if wanted.canary and canary else 0.0
        state = ServingState(active, canary, share, base)
        if state != current:
            self.engine.serving = state  # one assignment: running jobs keep theirs
            self._held = Wanted(
                wanted.active if active else None, wanted.canary if canary else None
            )
            # the same adapters read again for the other backend are no swap
            self.swaps += not rebase or _versions(active, canary) != _versions(
                current.active, current.canary
            )
            log.info(
                "serving adapter=%s canary=%s share=%.2f on %s",
                active.version if active else "base model",
                canary.version if canary else None,
                share,
                self.engine.backend,
            )

    def status(self) -> dict[str, Any]:
        return {
            **self.engine.serving.describe(),
            "swaps": self.swaps,
            "last_read_ms": self.last_read_ms,
            "refused": [
                {"version": version, "reason": why}
                for (version, _, _), why in self._refused.items()
            ],
            "error": self.error,
        }


def _versions(*adapters: Adapter | None) -> tuple[str | None, ...]:
    return tuple(adapter.version if adapter else None for adapter in adapters)
