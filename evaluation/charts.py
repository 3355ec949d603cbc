"""The replay's chart: characters saved per completion per adapter, with intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def chart(passes: Sequence[tuple[str, Mapping[str, Any]]], path: Path) -> Path:
    """A PNG of characters saved per completion per adapter, with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = [label for label, _ in passes]
    values = [float(m["chars_saved_per_completion"]) for _, m in passes]
    intervals = [
        m["intervals"].get("chars_saved_per_completion", [value] * 3)
        for value, (_, m) in zip(values, passes, strict=True)
    ]
    errors = [[v - i[1] for v, i in zip(values, intervals, strict=True)]]
    errors.append([i[2] - v for v, i in zip(values, intervals, strict=True)])
    figure, axes = pyplot.subplots(figsize=(6, 3.6), dpi=100)
    axes.bar(labels, values, yerr=errors, capsize=6, color=["#8a8f98", "#2f7ed8"][: len(labels)])
    axes.set_ylabel("characters saved per completion")
    axes.set_title("held-out positions, 95 % intervals")
    # each value above its interval's cap, not across the error bar
    caps = [max(v, i[2]) for v, i in zip(values, intervals, strict=True)]
    for index, (value, cap) in enumerate(zip(values, caps, strict=True)):
        axes.annotate(
            f"{value:.2f}",
            (index, cap),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    axes.set_ylim(0, max([*caps, 0.0]) * 1.15 or 1.0)
    figure.tight_layout()
    figure.savefig(path, format="png")
    pyplot.close(figure)
    return path
