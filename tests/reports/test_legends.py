"""Legends that never squeeze the axes (issue 22): 40 groups of 60-character labels draw axes as
wide as 2 groups do, the figure growing taller instead; a legend never runs off its figure.

Axes sizes are read from the SVG the report embeds (each axes' background rectangle), in CSS pixels.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg

from reports import plots
from tests.reports.records import make_record

SVG = "{http://www.w3.org/2000/svg}"
PX_PER_PT = 96 / 72
"""An SVG length in pt is 4/3 CSS pixels."""


def _axes_px(uri: str) -> list[tuple[float, float]]:
    """Width and height in CSS pixels of each axes of an SVG figure (its background rectangle)."""
    svg = ET.fromstring(base64.b64decode(uri.split(",", 1)[1]))
    sizes = []
    for group in svg.iter(f"{SVG}g"):
        if re.fullmatch(r"axes_\d+", group.get("id", "")):
            path = group.find(f"{SVG}g/{SVG}path")
            assert path is not None
            numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path.get("d", ""))]
            xs, ys = numbers[0::2], numbers[1::2]
            sizes.append(((max(xs) - min(xs)) * PX_PER_PT, (max(ys) - min(ys)) * PX_PER_PT))
    return sizes


def _label(i: int) -> str:
    """A group label of 60+ characters, unique per ``i``."""
    return f"lora [strategy_args.initialisation=orthogonal-kaiming-{i:02d}, strategy_args.r=16]"


def _groups(n: int) -> dict[str, list[dict[str, Any]]]:
    return {
        _label(i): [make_record(f"run-{i}", "lora", matrix=[[0.8, 0.1], [0.6 + 0.005 * i, 0.9]])]
        for i in range(n)
    }


def _same_axes(few: Sequence[tuple[float, float]], many: Sequence[tuple[float, float]]) -> None:
    """``many`` draws every axes as wide as ``few`` (to a pixel) and at least as tall."""
    assert len(few) == len(many)
    for (w_few, h_few), (w_many, h_many) in zip(few, many, strict=True):
        assert abs(w_many - w_few) <= 1.0, (few, many)
        assert h_many >= h_few - 1.0, (few, many)


def test_scenario_curves_keep_their_axes_with_40_long_labels() -> None:
    colors = {"lora": "#0072B2"}
    few = _axes_px(plots.scenario_curves(_groups(2), colors))
    many = _axes_px(plots.scenario_curves(_groups(40), colors))
    assert len(few) == 2
    assert all(w >= 440 for w, _ in few)  # each of the two axes ~ 460 px of a 1008 px figure
    _same_axes(few, many)


def _points(n: int) -> list[plots.TradeoffPoint]:
    return [
        plots.TradeoffPoint(
            label=_label(i),
            strategy="lora",
            forgetting=0.1 + 0.001 * i,
            forgetting_std=0.0,
            cost=1000.0 * (i + 1),
            cost_std=0.0,
            n=2,
            note="did not learn" if i % 3 == 0 else "",
        )
        for i in range(n)
    ]


def test_tradeoff_plots_keep_their_axes_with_40_long_labels() -> None:
    colors = {"lora": "#0072B2"}
    kwargs: dict[str, Any] = {"x_label": "trainable parameters", "title": "t", "log_x": True}
    few, many = (plots.tradeoff_plot(_points(n), colors, **kwargs) for n in (2, 40))
    assert few is not None
    assert many is not None
    assert _axes_px(few)[0][0] >= 480
    _same_axes(_axes_px(few), _axes_px(many))


def test_a_legend_stays_within_its_figure_and_wraps_long_labels() -> None:
    with plots._style():
        fig = plots._figure(5.8, 3.3)
        ax = fig.add_subplot()
        labels = [f"{'x' * 30} {_label(i)} {'y' * 30}" for i in range(3)]  # ~140 characters each
        lines = [ax.plot([0, 1], [0, i])[0] for i in range(3)]
        plots.legend_below(fig, lines, labels)
        legend = fig.legends[0]
        width = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer()).width
    assert width <= fig.bbox.width
    texts = [t.get_text() for t in legend.get_texts()]
    assert all("\n" in t for t in texts)
    assert [t.replace("\n", " ") for t in texts] == labels  # wrapped at spaces, nothing lost
    assert fig.get_figheight() > 3.3 + 0.5  # grown by the legend, not carved out of the axes


def test_short_labels_share_a_row() -> None:
    with plots._style():
        fig = plots._figure(10.5, 3.2)
        ax = fig.add_subplot()
        lines = [ax.plot([0, 1], [0, i])[0] for i in range(4)]
        plots.legend_below(fig, lines, ["lora (n=2)", "sora (n=2)", "mora (n=2)", "finetune (n=1)"])
    assert fig.get_figheight() < 3.2 + 0.35  # one row of four entries, not four rows
