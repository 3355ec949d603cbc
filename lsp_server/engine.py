"""The completion engine: one inference worker fed fairly, off the event loop.

The LSP handlers only submit jobs and await their futures; prompt building, generation
and post-processing run on the worker thread. A newer request for the same document
supersedes an older one, a cancelled job stops between two tokens, and a job past its
deadline returns what it has.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from feedback.canary import arm_for
from ghostloop.decoding import PrefixCaches, TorchForward
from ghostloop.lora import LoraWeights
from ghostloop.models import served_backend
from ghostloop.onnx_backend import (
    OnnxAdapter,
    OnnxForward,
    OnnxModel,
    base_export,
    export_in_child,
)
from ghostloop.postprocess import CompletionMode, CursorContext
from ghostloop.prompts import Prompt, Snippet, repository_part
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
    # the repository's snippets for this cursor, best first (lsp_server.workspace), asked
    # on the worker; and the document's language, for their comment lines
    snippets: Callable[[], Sequence[Snippet]] | None = None
    language: str = ""
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
    """What serves: the adapters in force and the backend they were read for (an
    onnxruntime base export, or None for torch). Replaced whole (one reference) when the
    table or the backend changes, so a job holds the state it started with until it
    finishes, and never meets an adapter read for the other backend."""

    active: Adapter | None = None
    canary: Adapter | None = None
    canary_share: float = 0.0
    onnx_base: OnnxModel | None = None

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
    def weights(self) -> tuple[str | None, bool]:
        """What generates it: the adapter version, on onnxruntime or not."""
        return self.version, isinstance(self.forward, OnnxForward)

    @property
    def cache_key(self) -> tuple[str, str | None, bool]:
        return _cache_key(self.job.key, self.adapter, isinstance(self.forward, OnnxForward))


def _cache_key(document: str, adapter: Adapter | None, onnx: bool) -> tuple[str, str | None, bool]:
    """Where a document's KV cache is kept: per document and the weights that made it (a
    torch cache and an onnxruntime one are not interchangeable)."""
    return (document, adapter.version if adapter else None, onnx)


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
        """``prepare`` puts the adapters in force for the backend that serves: once the
        model is loaded, before the first job, and again when a background export makes
        onnxruntime the backend (``backend`` auto on a CPU)."""
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
        # the onnxruntime base export adapters are read for: at load (backend onnxruntime)
        # or when the background export is ready (auto); None while torch serves
        self._onnx_base: OnnxModel | None = None
        self.export_state: str | None = None  # auto: running | done | failed: why
        self._exporter: Any = None  # auto: the export's process while it runs
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
        exporter = self._exporter
        if exporter is not None and exporter.is_alive():  # made again at the next start
            exporter.kill()
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
        """The onnxruntime base export adapters are to be read for; None with torch (and
        until a background export is ready)."""
        return self._onnx_base

    @property
    def model_name(self) -> str:
        return self._model.name if self._model is not None else self.settings.inference.model

    @property
    def state(self) -> str:
        if self._load_error is not None:
            return "error"
        return "ready" if self._ready.is_set() else "starting"

    @property
    def backend(self) -> str:
        """What generates new completions now: torch, or onnxruntime [int8] (device)."""
        base = self.serving.onnx_base
        if base is None:
            return "torch"
        return f"onnxruntime{' int8' if self.settings.inference.onnx_int8 else ''} ({base.device})"

    def status(self) -> dict[str, Any]:
        model = self._model
        return {
            "state": self.state,
            "error": str(self._load_error) if self._load_error else None,
            "model": model.name if model else None,
            "device": model.device if model else None,
            "backend": self.backend,
            "onnx_export": self.export_state,
            "template": model.template.name if model else None,
            **self.serving.describe(),
            "kv_cache": self.prefix_caches.describe(),
            "queued": len(self._queue),
            "stats": dict(vars(self.stats)),
        }

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def submit(
        self,
        key: str,
        context: CursorContext,
        user: str = "",
        queue: str | None = None,
        *,
        snippets: Callable[[], Sequence[Snippet]] | None = None,
        language: str = "",
    ) -> CompletionJob:
        """Queue a job; an unfinished older job for the same document is superseded.

        ``queue`` names whose turn the job takes: the document by default (documents
        are served in turn), a connection on a team server (connections are).
        ``snippets`` gives the repository's snippets for the prompt (with
        ``repo_context_tokens`` above zero), in ``language``'s comments."""
        job = CompletionJob(
            key=key,
            context=context,
            user=user,
            queue=queue or key,
            snippets=snippets,
            language=language,
        )
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

        settings = self.settings
        try:
            self._model = (self._loader or load_model)(settings)
            if settings.inference.backend == "onnxruntime":
                self._onnx_base = base_export(self._model, settings)
                self.serving = ServingState(onnx_base=self._onnx_base)
        except Exception as error:  # any failure must reach the client, not kill the thread
            log.error("model failed to load: %s", error)
            self._load_error = error
            return False
        self._put_adapters_in_force()
        export = settings.inference.backend == "auto" and served_backend(settings) == "onnxruntime"
        if export:
            self.export_state = "running"
        self._ready_at = time.monotonic()
        self._ready.set()
        if export:
            threading.Thread(
                target=self._export_in_background, name="ghostloop-onnx-export", daemon=True
            ).start()
        return True

    def _put_adapters_in_force(self) -> None:
        if self._prepare is not None:
            try:
                self._prepare()
            except Exception:  # adapters are optional: the base model serves
                log.exception("reading the adapters in force failed; serving the base model")

    def _export_in_background(self) -> None:
        """``backend`` auto on a CPU: torch serves while a process of its own exports the
        base model for onnxruntime (once per model and machine, into the model cache); new
        jobs then go to onnxruntime, with the adapters in force read again for it. Jobs
        that started on torch finish on torch."""
        import multiprocessing

        started = time.perf_counter()
        context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=export_in_child,
            args=(self.settings, sender),
            name="ghostloop-onnx-export",
            daemon=True,
        )
        self._exporter = process
        try:
            process.start()
            sender.close()
            failure = receiver.recv() if receiver.poll(None) else "it sent no result"
        except EOFError:
            failure = f"the export process ended (exit code {process.exitcode})"
        except Exception as error:  # e.g. no process could be started
            failure = str(error)
        finally:
            process.join()
            receiver.close()
        if self._queue.closed:
            return
        base = None
        if failure is None:
            try:  # now in the model cache: loaded and checked, not exported again
                base = base_export(self._model, self.settings)
            except Exception as error:
                failure = str(error)
        if base is None:
            log.warning("the onnxruntime export failed, torch keeps serving: %s", failure)
            self.export_state = f"failed: {failure}"
            return
        self._onnx_base = base
        self._put_adapters_in_force()  # the watcher puts a state on this base in force
        if self._prepare is None and self.serving.active is None and not self.serving.canary:
            self.serving = dataclasses.replace(self.serving, onnx_base=base)
        self.export_state = "done"
        log.info(
            "onnxruntime serves from now on (%s), %.1f s after the export started",
            self.backend,
            time.perf_counter() - started,
        )

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
                if loaded and self.serving.onnx_base is None:  # what waits joins the batch
                    jobs += self._queue.get_ready(self.settings.serving.batch_size - 1)
                group = [r for job in jobs if (r := self._accept(job, loaded)) is not None]
            self._busy = True
            versions: dict[tuple[str | None, bool], list[_Running]] = {}
            for running in group:
                versions.setdefault(running.weights, []).append(running)
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
        adapter, weights = group[0].adapter, group[0].weights
        if isinstance(group[0].forward, OnnxForward):
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
                            if joining.weights == weights:
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
        settings, serving = self.settings, self.serving
        arm, adapter = serving.pick(job.user)
        base = serving.onnx_base
        budget = settings.context.repo_context_tokens
        if job.snippets is not None and budget:
            snippets = job.snippets()
            repository = repository_part(self._model.tokenizer, snippets, job.language, budget)
            job.context = dataclasses.replace(job.context, repository=repository)
        deadline = max(job.arrival, self._ready_at) + settings.serving.deadline_ms / 1000

        def should_stop() -> str | None:
            if job.cancelled:
                return "cancelled"
            return "deadline" if time.monotonic() >= deadline else None

        # The document's previous KV cache, made by the same weights, if it is still kept.
        reuse = (
            self.prefix_caches.take(_cache_key(job.key, adapter, base is not None))
            if settings.serving.kv_cache_mb
            else None
        )
        forward: OnnxForward | TorchForward
        if base is not None:  # one session: the adapter's factors bound as inputs
            onnx_adapter = adapter if isinstance(adapter, OnnxAdapter) else None
            forward = OnnxForward(base, reuse=reuse, adapter=onnx_adapter)
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
