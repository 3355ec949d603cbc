"""What serves completions: the engine (its model loaded in the background) and the
watcher that puts published adapters in force; one pair per stdio server, one shared by
a team server's connections."""

from __future__ import annotations

from feedback.prometheus import ServerMetrics
from ghostloop.settings import Settings
from lsp_server.adapter_watch import AdapterWatcher
from lsp_server.engine import CompletionEngine


def start_serving(
    settings: Settings, metrics: ServerMetrics
) -> tuple[CompletionEngine, AdapterWatcher]:
    """The completion engine (loading its model in the background) and the adapter watcher
    that puts published adapters in force, both started; ``metrics`` follows them."""

    def read_adapters() -> None:  # once the model is loaded: the adapters in force
        watcher.check()

    # A progress bar on stderr is no log line: an editor shows each of its redraws as an
    # error (vscode-languageclient logs stderr at error level).
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    engine = CompletionEngine(settings, prepare=read_adapters)
    watcher = AdapterWatcher(settings, engine)
    engine.start()
    watcher.start()
    metrics.follow_serving(lambda: engine.serving.describe())
    if settings.team.metrics_port:
        metrics.serve(settings.team.metrics_host, settings.team.metrics_port)
    return engine, watcher
