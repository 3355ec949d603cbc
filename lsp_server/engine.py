"""The completion engine: one inference worker fed fairly, off the event loop.

The LSP handlers only submit jobs and await their futures; prompt building, generation
and post-processing run on the worker thread. A newer request for the same document
supersedes an older one, a cancelled job stops between two tokens, and a job past its
deadline returns what it has.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from feedback.canary import arm_for
from ghostloop.decoding import PrefixCaches, TorchForward
from ghostloop.lora import LoraWeights
from ghostloop.onnx_backend import OnnxAdapter, OnnxForward, OnnxModel, base_export
from ghostloop.postprocess import CompletionMode, CursorContext
from ghostloop.prompts import Prompt
from ghostloop.settings import Settings
from lsp_server.fair_queue import FairQueue, QueueClosed

if TYPE_CHECKING:
    from ghostloop.suggest import Suggestion

log = logging.getLogger(__name__)

Adapter = LoraWeights | OnnxAdapter  # an adapter served: hooks (torch), a file's inputs (onnx)


class JobCancelled(Exception):
    """A job ended without a result: cancelled by the client or superseded by a newer one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class CompletionJob:
    """One request for a suggestion at one cursor, as the worker sees it."""

    key: str
    context: CursorContext
    user: str = ""
    queue: str = ""  # whose turn it takes in the fair queue: a document, or a connection
    arrival: float = field(default_factory=time.monotonic)
    future: Future[CompletionResult] = field(default_factory=Future)
    cancel_reason: str | None = None
    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class CompletionResult:
    """A finished suggestion with what produced it; ``text`` is empty when there is none."""

    completion_id: str
    key: str
    text: str
    offset: int  # where the cursor stood in the document when the request came
    prompt: Prompt
    mode: CompletionMode
    stop_reason: str
    prompt_tokens: int
    generated_tokens: int
    queue_ms: float
    prefill_ms: float
    latency_ms: float
    adapter_version: str | None = None  # None: the base model
    arm: str = "active"  # "canary" for a user in a running canary's share
    user: str = ""  # who asked: only they may send feedback on it


@dataclass(frozen=True)
class ServingState:
    """The adapters in force: replaced whole (one reference) when the table changes, so a
    job holds the state it started with until it finishes."""

    active: Adapter | None = None
    canary: Adapter | None = None
    canary_share: float = 0.0

    def pick(self, user: str) -> tuple[str, Adapter | None]:
        """(arm, adapter) for ``user``: sticky per user while a canary runs."""
        if self.canary is None:
            return "active", self.active
        arm = arm_for(user, self.canary.version, self.canary_share)
        return arm, self.canary if arm == "canary" else self.active

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": self.active.version if self.active else None,
            "canary": (
                {"version": self.canary.version, "share": self.canary_share}
                if self.canary
                else None
            ),
        }


@dataclass
class EngineStats:
    """Counters that ``ghostloop/status`` reports: the worker writes them all but
    ``accepted``, which the accept command counts on the event loop."""

    requests: int = 0
    completed: int = 0
    empty: int = 0
    cancelled: int = 0
    superseded: int = 0
    deadline: int = 0
    accepted: int = 0
    tokens_generated: int = 0
    batched: int = 0  # completions decoded in one batch with others
    last_stop_reason: str = ""
    last_generated_tokens: int = 0


@dataclass
class _Running:
    """A job the worker has taken on: what serves it and how it stops."""

    job: CompletionJob
    arm: str
    adapter: Adapter | None
    started: float
    should_stop: Callable[[], str | None]
    forward: OnnxForward | TorchForward

    @property
    def version(self) -> str | None:
        """The adapter version serving it (None: the base model)."""
        return self.adapter.version if self.adapter else None

    @property
    def cache_key(self) -> tuple[str, str | None]:
        return _cache_key(self.job.key, self.adapter)


def _cache_key(document: str, adapter: Adapter | None) -> tuple[str, str | None]:
    """Where a document's KV cache is kept: per document and the weights that made it."""
    return (document, adapter.version if adapter else None)


class RecentCompletions:
    """The last suggestions served, so commands can check the ids clients send back."""

    def __init__(self, capacity: int = 4096) -> None:
        self._items: OrderedDict[str, CompletionResult] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def add(self, result: CompletionResult) -> None:
        with self._lock:
            self._items[result.completion_id] = result
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def get(self, completion_id: str) -> CompletionResult | None:
        with self._lock:
            return self._items.get(completion_id)


ModelLoader = Callable[[Settings], Any]
Prepare = Callable[[], None]


class CompletionEngine:
    """Loads the model in the background, then serves jobs one at a time in fair order."""

    def __init__(
        self,
        settings: Settings,
        loader: ModelLoader | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        """``prepare`` runs once the model is loaded and before the first job (the
        adapters in force at start are read there)."""
        self.settings = settings
        self.serving = ServingState()  # replaced by the adapter watcher, read per job
        self._prepare = prepare
        self.stats = EngineStats()
        self.recent = RecentCompletions()
        self._loader = loader
        self._queue: FairQueue[CompletionJob] = FairQueue()
        self._latest: dict[str, CompletionJob] = {}
        self._lock = threading.Lock()
        self._model: Any = None
        self._onnx_base: OnnxModel | None = None  # the onnxruntime backend's base model
        self._load_error: Exception | None = None
        self._ready = threading.Event()
        self._ready_at = 0.0
        self._busy = False
        self._held: list[_Running] = []  # jobs for other weights taken during a batch
        # per document and weights: the KV cache of its last prompt (settings.serving.kv_cache_mb)
        self.prefix_caches = PrefixCaches(settings.serving.kv_cache_mb * 2**20)
        self._thread = threading.Thread(target=self._work, name="ghostloop-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel what runs and waits, and wait for the worker to end: a process that
        exits while the worker is inside torch or onnxruntime can abort in their C++
        teardown ("terminate called without an active exception")."""
        self._queue.close()
        with self._lock:
            for job in self._latest.values():
                job.cancel("shutdown")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the inference worker did not stop within %.0f s", timeout_s)

    @property
    def loaded(self) -> Any:
        """The loaded model, None until it is."""
        return self._model

    @property
    def onnx_base(self) -> OnnxModel | None:
        """The onnxruntime backend's base export, None until loaded (or with torch)."""
        return self._onnx_base

    @property
    def model_name(self) -> str:
        return self._model.name if self._model is not None else self.settings.inference.model

    @property
    def state(self) -> str:
        if self._load_error is not None:
            return "error"
        return "ready" if self._ready.is_set() else "starting"

    def status(self) -> dict[str, Any]:
        model = self._model
        return {
            "state": self.state,
            "error": str(self._load_error) if self._load_error else None,
            "model": model.name if model else None,
            "device": model.device if model else None,
            "backend": self.settings.inference.backend
            + (f" ({self._onnx_base.device})" if self._onnx_base is not None else ""),
            "template": model.template.name if model else None,
            **self.serving.describe(),
            "kv_cache": self.prefix_caches.describe(),
            "queued": len(self._queue),
            "stats": dict(vars(self.stats)),
        }

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def submit(
        self, key: str, context: CursorContext, user: str = "", queue: str | None = None
    ) -> CompletionJob:
        """Queue a job; an unfinished older job for the same document is superseded.

        ``queue`` names whose turn the job takes: the document by default (documents
        are served in turn), a connection on a team server (connections are)."""
        job = CompletionJob(key=key, context=context, user=user, queue=queue or key)
        with self._lock:
            older = self._latest.get(key)
            self._latest[key] = job
        if older is not None and not older.future.done():
            older.cancel("superseded")
        self._queue.put(job.queue, job)
        return job

    def cancel_queue(self, queue: str, reason: str = "disconnected") -> int:
        """Cancel every unfinished job of ``queue`` (a client went away); how many."""
        with self._lock:
            jobs = [job for job in self._latest.values() if job.queue == queue]
        for job in jobs:
            job.cancel(reason)
        return len(jobs)

    def forget(self, key: str) -> None:
        """The document closed: its KV caches go."""
        self.prefix_caches.drop(
            lambda cache_key: isinstance(cache_key, tuple) and cache_key[0] == key
        )

    def _load(self) -> bool:
        from ghostloop.models import load_model

        try:
            self._model = (self._loader or load_model)(self.settings)
            if self.settings.inference.backend == "onnxruntime":
                self._onnx_base = base_export(self._model, self.settings)
        except Exception as error:  # any failure must reach the client, not kill the thread
            log.error("model failed to load: %s", error)
            self._load_error = error
            return False
        if self._prepare is not None:
            try:
                self._prepare()
            except Exception:  # adapters are optional: the base model serves
                log.exception("reading the adapters in force failed; serving the base model")
        self._ready_at = time.monotonic()
        self._ready.set()
        return True

    def _work(self) -> None:
        loaded = self._load()
        while True:
            if self._held:  # taken while a batch of other weights ran: first in line
                group, self._held = self._held, []
            else:
                try:
                    jobs = [self._queue.get()]
                except QueueClosed:
                    return
                if loaded and self._onnx_base is None:  # what else waits joins this batch
                    jobs += self._queue.get_ready(self.settings.serving.batch_size - 1)
                group = [r for job in jobs if (r := self._accept(job, loaded)) is not None]
            self._busy = True
            versions: dict[str | None, list[_Running]] = {}
            for running in group:
                versions.setdefault(running.version, []).append(running)
            for same_weights in versions.values():
                self._serve(same_weights)
            self._busy = False

    def busy(self) -> bool:
        """A completion is being generated or waits: background work should hold back."""
        return self._busy or len(self._queue) > 0

    def _count_cancel(self, job: CompletionJob) -> None:
        if job.cancel_reason == "superseded":
            self.stats.superseded += 1
        else:
            self.stats.cancelled += 1

    def _accept(self, job: CompletionJob, loaded: bool) -> _Running | None:
        """Take ``job`` on; None when it ends here (cancelled before it ran, no model)."""
        self.stats.requests += 1
        if not job.future.set_running_or_notify_cancel():  # its request was cancelled
            self._count_cancel(job)
            self._forget_job(job)
            return None
        if not loaded:
            job.future.set_exception(self._load_error or RuntimeError("model not loaded"))
        elif job.cancelled:
            self._count_cancel(job)
            job.future.set_exception(JobCancelled(job.cancel_reason or "cancelled"))
        else:
            try:
                return self._start(job)
            except Exception as error:  # a bug in one request must not stop the worker
                log.exception("completion failed key=%s", job.key)
                job.future.set_exception(error)
        self._forget_job(job)
        return None

    def _forget_job(self, job: CompletionJob) -> None:
        with self._lock:
            if self._latest.get(job.key) is job:
                del self._latest[job.key]

    def _serve(self, group: list[_Running]) -> None:
        """Serve ``group`` (one set of weights). The torch backend decodes them together,
        and jobs for the same weights that arrive meanwhile join between two tokens, up to
        ``batch_size`` at once; the onnxruntime backend serves one after another."""
        from ghostloop.suggest import SuggestionBatch, suggest

        settings, loaded = self.settings, self._model
        adapter, version = group[0].adapter, group[0].version
        if self._onnx_base is not None:
            for running in group:
                try:
                    found = suggest(
                        loaded,
                        settings,
                        running.job.context,
                        forward=running.forward,
                        should_stop=running.should_stop,
                    )
                except Exception as error:  # a bug in one request must not stop the worker
                    self._deliver(running, error)
                else:
                    self._deliver(running, found)
            return
        pending: dict[int, _Running] = {}

        def join(batch: SuggestionBatch, running: _Running) -> None:
            pending[id(running)] = running

            def done(found: Suggestion | Exception) -> None:
                del pending[id(running)]
                self._deliver(running, found)

            forward = cast(TorchForward, running.forward)  # the torch backend's
            try:
                batch.add(running.job.context, forward, running.should_stop, done)
            except Exception as error:  # a bad input fails its own request, not the batch
                if pending.pop(id(running), None) is not None:
                    self._deliver(running, error)

        lora = adapter if isinstance(adapter, LoraWeights) else None
        batch = SuggestionBatch(loaded, settings, adapter=lora)
        try:
            with batch:
                for running in group:
                    join(batch, running)
                while len(batch):
                    batch.step()
                    room = settings.serving.batch_size - len(batch)
                    if len(batch) and room > 0:
                        for job in self._queue.get_ready(room):
                            if (joining := self._accept(job, True)) is None:
                                continue
                            if joining.version == version:
                                join(batch, joining)
                            else:
                                self._held.append(joining)
        except Exception as error:  # a bug in one request must not stop the worker
            for running in list(pending.values()):
                self._deliver(running, error)
        self.stats.batched += batch.shared

    def _deliver(self, running: _Running, found: Suggestion | Exception) -> None:
        """Settle ``running``'s future with its result, a cancellation or an error."""
        job = running.job
        if isinstance(found, Exception):
            log.error("completion failed key=%s", job.key, exc_info=found)
            job.future.set_exception(found)
        else:
            try:
                result = self._finish(running, found)
            except Exception as error:
                log.exception("completion failed key=%s", job.key)
                job.future.set_exception(error)
            else:
                if result is None:
                    self._count_cancel(job)
                    job.future.set_exception(JobCancelled(job.cancel_reason or "cancelled"))
                else:
                    job.future.set_result(result)
        self._forget_job(job)

    def _start(self, job: CompletionJob) -> _Running:
        """The weights ``job`` is served with, its stop rule, and its document's cache."""
        settings = self.settings
        arm, adapter = self.serving.pick(job.user)
        deadline = max(job.arrival, self._ready_at) + settings.serving.deadline_ms / 1000

        def should_stop() -> str | None:
            if job.cancelled:
                return "cancelled"
            return "deadline" if time.monotonic() >= deadline else None

        # The document's previous KV cache, made by the same weights, if it is still kept.
        reuse = (
            self.prefix_caches.take(_cache_key(job.key, adapter))
            if settings.serving.kv_cache_mb
            else None
        )
        forward: OnnxForward | TorchForward
        if self._onnx_base is not None:  # one session: the adapter's factors bound as inputs
            onnx_adapter = adapter if isinstance(adapter, OnnxAdapter) else None
            forward = OnnxForward(self._onnx_base, reuse=reuse, adapter=onnx_adapter)
        else:
            forward = TorchForward(self._model.model, self._model.device, reuse=reuse)
        return _Running(job, arm, adapter, time.monotonic(), should_stop, forward)

    def _finish(self, running: _Running, suggestion: Suggestion) -> CompletionResult | None:
        """The result of ``running`` (None: it was cancelled), its cache kept, its log line."""
        job, started, arm, adapter = running.job, running.started, running.arm, running.adapter
        generation, prompt, mode = suggestion.generation, suggestion.prompt, suggestion.mode
        if self.settings.serving.kv_cache_mb:
            self.prefix_caches.put(running.cache_key, running.forward.keep())
            self.prefix_caches.record(
                generation.reused_tokens, generation.prompt_tokens - generation.reused_tokens
            )
        stats = self.stats
        stats.tokens_generated += len(generation.token_ids)
        stats.last_generated_tokens = len(generation.token_ids)
        stats.last_stop_reason = generation.stop_reason
        if generation.stop_reason == "cancelled":
            return None
        stats.deadline += generation.stop_reason == "deadline"
        text = suggestion.text
        stats.completed += 1
        stats.empty += not text
        result = CompletionResult(
            completion_id=uuid.uuid4().hex,
            key=job.key,
            text=text,
            offset=len(job.context.prefix),
            prompt=prompt,
            mode=mode,
            stop_reason=generation.stop_reason,
            prompt_tokens=generation.prompt_tokens,
            generated_tokens=len(generation.token_ids),
            queue_ms=(started - job.arrival) * 1000,
            prefill_ms=generation.prefill_ms,
            latency_ms=(time.monotonic() - job.arrival) * 1000,
            adapter_version=adapter.version if adapter else None,
            arm=arm,
            user=job.user,
        )
        if text:
            self.recent.add(result)
        log.info(
            "completion_id=%s key=%s chars=%d tokens=%d prompt_tokens=%d stop=%s "
            "reused_tokens=%d queue_ms=%.1f prefill_ms=%.1f latency_ms=%.1f adapter=%s arm=%s",
            result.completion_id,
            job.key,
            len(text),
            result.generated_tokens,
            result.prompt_tokens,
            result.stop_reason,
            generation.reused_tokens,
            result.queue_ms,
            result.prefill_ms,
            result.latency_ms,
            result.adapter_version,
            arm,
        )
        return result
