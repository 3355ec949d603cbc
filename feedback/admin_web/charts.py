"""Line charts as inline SVG, drawn on the server: the dashboard needs no script, no build
step and nothing fetched from elsewhere. Each point carries a <title> so hovering tells
its value."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 150, 14, 34
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")

Series = Mapping[str, Sequence[tuple[str, float | None]]]  # name -> [(x label, y)]


def line_chart(
    series: Series, *, title: str, y_format: Callable[[float], str] = "{:.2f}".format
) -> Markup:
    """One line per series over the union of their x labels (days, in order)."""
    xs = sorted({x for points in series.values() for x, _ in points})
    values = [y for points in series.values() for _, y in points if y is not None]
    if not xs or not values:
        return Markup('<p class="empty">{}: no data yet</p>').format(title)
    top = max(values) * 1.1 or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x_at(label: str) -> float:
        return LEFT + (plot_w * xs.index(label) / (len(xs) - 1) if len(xs) > 1 else plot_w / 2)

    def y_at(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" '
        'stroke="#999"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - fraction)
        parts.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{escape(y_format(top * fraction))}</text>"
        )
    step = max(1, len(xs) // 6)
    for label in xs[::step]:
        parts.append(
            f'<text x="{x_at(label):.1f}" y="{HEIGHT - 12}" text-anchor="middle" '
            f'font-size="11">{escape(label[5:] if len(label) == 10 else label)}</text>'
        )
    for index, (name, points) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        known = [(x, y) for x, y in points if y is not None]
        line = " ".join(f"{x_at(x):.1f},{y_at(y):.1f}" for x, y in known)
        parts.append(
            f'<polyline class="series" data-series="{escape(name)}" points="{line}" '
            f'fill="none" stroke="{color}" stroke-width="2"/>'
        )
        for x, y in known:
            parts.append(
                f'<circle class="point" cx="{x_at(x):.1f}" cy="{y_at(y):.1f}" r="3" '
                f'fill="{color}"><title>{escape(name)} {escape(x)}: '
                f"{escape(y_format(y))}</title></circle>"
            )
        legend_y = TOP + 14 + 16 * index
        parts.append(
            f'<rect x="{WIDTH - RIGHT + 12}" y="{legend_y - 9}" width="10" height="10" '
            f'fill="{color}"/><text x="{WIDTH - RIGHT + 26}" y="{legend_y}" font-size="11">'
            f"{escape(name[:22])}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
