"""What a running server exposes to Prometheus: completion latency, requests, accepts,
rejects, survival and the adapter serving. Counters are this process's since it started
(each server has its own); the store remains the record. Figures carry no code, so they
are counted with telemetry off too."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
SURVIVAL_BUCKETS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
Serving = Callable[[], dict[str, Any]]  # {"adapter": version | None, "canary": {...} | None}


class _ServingCollector(Collector):
    """The adapter serving now, read when scraped (hot-swaps need no bookkeeping)."""

    def __init__(self) -> None:
        self.serving: Serving | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ghostloop_adapter_serving",
            "Adapters serving now: 1 per (version, arm); canary arm value is its share",
            labels=["version", "arm"],
        )
        state = self.serving() if self.serving else {}
        family.add_metric([state.get("adapter") or "base", "active"], 1.0)
        canary = state.get("canary")
        if canary:
            family.add_metric([canary["version"], "canary"], float(canary["share"]))
        yield family


class ServerMetrics:
    """One registry per server, so that tests and several servers in one process do not
    share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "ghostloop_completion_latency_seconds",
            "Time from a completion request to its suggestion",
            ["adapter"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.requests = Counter(
            "ghostloop_completion_requests",
            "Completion requests by result: served, empty, cancelled, error, rate_limited",
            ["result"],
            registry=self.registry,
        )
        self.feedback = Counter(
            "ghostloop_feedback_events",
            "Signals about suggestions: shown, accepted, partial, rejected, dismissed",
            ["kind"],
            registry=self.registry,
        )
        self.survival = Histogram(
            "ghostloop_survival_ratio",
            "Share of an accepted suggestion still standing after a survival window",
            ["window_s"],
            buckets=SURVIVAL_BUCKETS,
            registry=self.registry,
        )
        self._serving = _ServingCollector()
        self.registry.register(self._serving)
        self._lock = threading.Lock()
        self._http: Any = None
        self.url: str | None = None
        self.error: str | None = None

    def follow_serving(self, serving: Serving) -> None:
        self._serving.serving = serving

    def request(
        self, result: str, *, latency_ms: float | None = None, adapter: str | None = None
    ) -> None:
        self.requests.labels(result=result).inc()
        if latency_ms is not None:
            self.latency.labels(adapter=adapter or "base").observe(latency_ms / 1000.0)

    def event(self, kind: str, *, window_s: float | None, survival_ratio: float | None) -> None:
        if kind == "survival" and window_s is not None and survival_ratio is not None:
            self.survival.labels(window_s=f"{window_s:g}").observe(survival_ratio)
        elif kind in ("shown", "accepted", "partial", "rejected", "dismissed"):
            self.feedback.labels(kind=kind).inc()

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics over HTTP (once per server); a taken port is logged, not fatal:
        completions matter more than their figures."""
        with self._lock:
            if self._http is not None:
                return
            try:
                self._http = start_http_server(port, addr=host, registry=self.registry)
            except OSError as error:
                self.error = (
                    f"metrics not served on {host}:{port}: {error} — set "
                    "GHOSTLOOP_METRICS_PORT to a free port, or 0 to turn the endpoint off"
                )
                log.error("%s", self.error)
                return
            self.url = f"http://{host}:{port}/metrics"
            log.info("metrics at %s", self.url)

    def status(self) -> dict[str, Any]:
        """For ghostloop/status: where the endpoint is, or why it is not."""
        return {"url": self.url, "error": self.error}

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                server, thread = self._http
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)
                self._http = None
