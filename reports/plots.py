"""Matplotlib figures for the report, returned as ``data:image/svg+xml;base64,...`` URIs.

Figures are built with :class:`matplotlib.figure.Figure` and never through ``pyplot``, so no GUI
backend is ever selected and no global figure state leaks into a notebook that imports this
module; rendering uses matplotlib's non-interactive canvases (SVG here, Agg for rasters), which
is what ``matplotlib.use("Agg")`` would give without changing the process-wide backend. SVG keeps
line plots sharp and small: text stays text (``svg.fonttype = none``) and element ids are salted
deterministically so that the same records give the same bytes. Each figure is an ``<img>``
source, so the ids of different figures cannot collide in the page.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import textwrap
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

Color = str

# Okabe-Ito (colour-blind safe) first, then the rest of tab20 for larger comparisons.
_PALETTE: tuple[Color, ...] = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#8C6D31",
    "#000000",
    "#7F7F7F",
    "#BCBD22",
    "#17BECF",
    "#9467BD",
)

DIAGONAL: Color = "#d62728"
"""Outline of the heatmap's diagonal cells."""

_LINE_STYLES: tuple[tuple[str, str], ...] = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
"""Line style and marker of the 1st, 2nd... group drawn in one strategy's colour."""

_STYLE: dict[str, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "cl-bench-report",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e5e5",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#888888",
    "legend.frameon": False,
    "legend.fontsize": 8,
    "lines.linewidth": 1.8,
    "lines.markersize": 4,
}


def strategy_colors(names: Sequence[str]) -> dict[str, Color]:
    """One colour per strategy name, the same in every plot of a report (sorted-name order)."""
    ordered = sorted(set(names))
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(ordered)}


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """The report's matplotlib style; NaN-only slices (undefined cells) are gaps, not warnings."""
    with mpl.rc_context(cast(Any, _STYLE)), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


LEGEND_MIN_LINE = 24
"""The fewest characters a legend line is wrapped to, however narrow the figure."""

LEGEND_GAP = 0.1
"""Inches added below the axes with a legend, besides the legend's own height (the layout's padding)."""


def _legend_width(
    fig: Figure, handles: Sequence[Any], labels: Sequence[str], ncols: int, renderer: Any
) -> float:
    """The width in pixels of a figure legend of these entries in ``ncols`` columns."""
    probe = fig.legend(handles, labels, ncols=ncols)
    width = float(probe.get_window_extent(renderer).width)
    probe.remove()
    return width


def _fitted_labels(fig: Figure, handles: Sequence[Any], labels: Sequence[str], renderer: Any) -> list[str]:
    """The labels on one line each if the widest fits the figure's width, else wrapped at spaces to
    ever shorter lines (15 % at a time, down to :data:`LEGEND_MIN_LINE` characters) until it does."""
    line = max(len(label) for label in labels)
    while True:
        texts = ["\n".join(textwrap.wrap(label, line, break_on_hyphens=False)) or label for label in labels]
        if line <= LEGEND_MIN_LINE or _legend_width(fig, handles, texts, 1, renderer) <= fig.bbox.width:
            return texts
        line = max(LEGEND_MIN_LINE, int(line * 0.85))


def _legend_columns(fig: Figure, handles: Sequence[Any], labels: Sequence[str], renderer: Any) -> int:
    """The most legend columns that fit the figure's width (at least one)."""
    entry = _legend_width(fig, handles, labels, 1, renderer)
    ncols = max(1, min(len(labels), int(fig.bbox.width // max(entry, 1.0))))
    while ncols > 1 and _legend_width(fig, handles, labels, ncols, renderer) > fig.bbox.width:
        ncols -= 1
    return ncols


def legend_below(fig: Figure, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """A figure legend under the axes, as wide as the figure at most, and the figure grown by the
    legend's height.

    Constrained layout makes room for a legend outside the axes by shrinking the axes; growing the
    figure by the legend's own height instead keeps the axes the size they have without a legend,
    however many entries there are and however long their labels (40 runs of 60-character labels
    draw axes as wide as 2 runs do). Entries fill as many columns as fit; a label wider than the
    figure wraps at spaces instead of running off its edge.
    """
    if not handles:
        return
    renderer = FigureCanvasAgg(fig).get_renderer()
    texts = _fitted_labels(fig, handles, [str(label) for label in labels], renderer)
    ncols = _legend_columns(fig, handles, texts, renderer)
    legend = fig.legend(handles, texts, loc="outside lower left", ncols=ncols)
    height = legend.get_window_extent(renderer).height / fig.dpi
    fig.set_figheight(fig.get_figheight() + height + LEGEND_GAP)


def to_data_uri(fig: Figure) -> str:
    """Serialise ``fig`` as an SVG data URI (no date metadata, so output is reproducible)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _ticks(positions: Iterable[Any], labels: Sequence[str], most: int = 16) -> tuple[list[float], list[str]]:
    """At most ``most`` evenly thinned ticks (long streams stay readable), always keeping the first."""
    values = [float(p) for p in positions]
    step = max(1, math.ceil(len(values) / most))
    return values[::step], list(labels)[::step]


def _honest_y(ax: Any, *series: np.ndarray) -> None:
    """Start the y axis at 0 for non-negative data, so a flat or tiny change does not look dramatic."""
    values = np.concatenate([np.ravel(v) for v in series]) if series else np.array([])
    values = values[np.isfinite(values)]
    if values.size and values.min() >= 0:
        top = values.max()
        ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)


def _finite(values: Sequence[Any]) -> np.ndarray:
    """Floats with ``None``/non-numbers as NaN (matplotlib leaves gaps there)."""
    return np.array(
        [float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan for v in values],
        dtype=np.float64,
    )


def accuracy_heatmap(
    matrix: Sequence[Sequence[Any]],
    initial: Sequence[Any] | None,
    domains: Sequence[str] | None = None,
) -> str:
    """The accuracy matrix with the before-training row ``b`` on top; cells annotated for small T.

    Rows: ``b``, then "after experience i"; columns: test experience j. With ``domains`` (one name
    per experience, in experience order: a multi-domain benchmark) the columns are named by domain
    and the rows "after <domain>"; a list of another length is ignored (numeric axes). The diagonal
    (accuracy on the experience just learned) is outlined in :data:`DIAGONAL` red, 2 px, visible on
    every viridis shade; cells right of it are zero-shot on future experiences.
    """
    rows = [_finite(r) for r in matrix]
    T = len(rows[0]) if rows else 0
    b = _finite(initial) if initial is not None and len(initial) == T else None
    has_b = b is not None
    data = np.vstack(([b] if b is not None else []) + rows) if T else np.zeros((0, 0))
    named = domains is not None and len(domains) == T and len(rows) <= T
    columns = [str(d) for d in domains] if named and domains is not None else [str(j) for j in range(T)]
    after = [f"after {columns[i]}" for i in range(len(rows))] if named else [str(i) for i in range(len(rows))]
    labels = (["b"] if has_b else []) + after
    with _style():
        cell = min(0.42, 7.0 / max(T, 1))
        label_inches = 0.065 * max((len(c) for c in columns), default=0) if named else 0.0
        fig = _figure(cell * max(T, 3) + 1.6 + label_inches, cell * max(len(labels), 3) + 1.0 + label_inches)
        ax = fig.add_subplot()
        ax.grid(False)
        mesh = ax.pcolormesh(
            np.ma.masked_invalid(data), cmap="viridis", vmin=0.0, vmax=1.0, edgecolors="white", linewidth=0.8
        )
        ax.invert_yaxis()
        ax.set_xticks(*_ticks(np.arange(T) + 0.5, columns))
        ax.set_yticks(*_ticks(np.arange(len(labels)) + 0.5, labels))
        if named:
            ax.tick_params(axis="x", labelrotation=90)
        ax.set_xlabel("test domain" if named else "test experience j")
        ax.set_ylabel("after training domain" if named else "after training experience i")
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        offset = 1 if has_b else 0
        if has_b:
            ax.axhline(1, color="white", linewidth=3)
        for i in range(len(rows)):
            if i < T:
                ax.add_patch(
                    mpl.patches.Rectangle(
                        (i, i + offset),
                        1,
                        1,
                        fill=False,
                        edgecolor=DIAGONAL,
                        linewidth=1.5,  # 2 px
                    )
                )
        if T <= 12:
            for (r, c), value in np.ndenumerate(data):
                if math.isfinite(value):
                    ax.text(
                        c + 0.5,
                        r + 0.5,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7 if T > 8 else 8,
                        color="black" if value > 0.6 else "white",
                    )
        fig.colorbar(mesh, ax=ax, shrink=0.8, label="accuracy")
        return to_data_uri(fig)


def run_curves(record: dict[str, Any], color: Color) -> str:
    """Accuracy over experiences for one run: seen classes, all experiences, the one just learned."""
    accuracy = record.get("accuracy") or {}
    matrix = np.array([_finite(r) for r in accuracy.get("matrix") or []])
    T = matrix.shape[0]
    initial = accuracy.get("initial")
    with _style():
        fig = _figure(4.6, 3.0)
        ax = fig.add_subplot()
        x = np.arange(T)
        seen = _finite(accuracy.get("seen") or [])
        if len(seen) == T:
            ax.plot(x, seen, color=color, marker="o", label="A_seen[i] (seen classes)")
        all_mean = np.nanmean(matrix, axis=1) if T else np.array([])
        if initial is not None and len(initial) == T:
            xs = np.arange(-1, T)
            ys = np.concatenate([[np.nanmean(_finite(initial))], all_mean])
        else:
            xs, ys = x, all_mean
        ax.plot(xs, ys, color=color, linestyle="--", marker="s", label="mean_j R[i][j] (all experiences)")
        ax.plot(
            x,
            np.diag(matrix) if T else [],
            color=color,
            linestyle=":",
            marker="^",
            label="R[i][i] (just learned)",
        )
        ticks = list(xs)
        ax.set_xticks(*_ticks(ticks, ["b" if t == -1 else str(t) for t in ticks]))
        ax.set_xlabel("after training experience i")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="best")
        return to_data_uri(fig)


def _mean_std(series: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise mean, sample std and count of ragged series (shorter runs leave NaN)."""
    length = max((len(s) for s in series), default=0)
    data = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        data[i, : len(s)] = _finite(s)
    count = np.sum(np.isfinite(data), axis=0)
    safe = np.maximum(count, 1)
    mean = np.where(count > 0, np.nansum(data, axis=0) / safe, np.nan)
    squares = np.nansum((data - mean) ** 2, axis=0)
    std = np.where(count > 1, np.sqrt(squares / np.maximum(count - 1, 1)), np.nan)
    return mean, std, count


def scenario_curves(groups: Mapping[str, Sequence[dict[str, Any]]], colors: Mapping[str, Color]) -> str:
    """All strategies of one scenario on one figure: mean over seeds with a +-1 std band.

    ``groups`` maps a legend label to the runs averaged under it; groups of one strategy share its
    colour and differ in line style and marker.

    Left: ``A_seen[i]`` (accuracy on all classes seen so far). Right: the mean over every test
    experience of row i (before training as ``b``), which includes zero-shot accuracy on the
    future experiences. The legend is below both axes (:func:`legend_below`): many groups or long
    labels make the figure taller, never the axes smaller.
    """
    with _style():
        fig = _figure(10.5, 3.2)
        left, right = fig.subplots(1, 2)
        max_T = 0
        styles_used: dict[Color, int] = {}
        for label, records in groups.items():
            strategy = records[0]["config"]["strategy"]
            color = colors.get(strategy, "#333333")
            # groups of one strategy (configurations, backbones) share its colour: vary the line
            nth = styles_used[color] = styles_used.get(color, -1) + 1
            linestyle, marker = _LINE_STYLES[nth % len(_LINE_STYLES)]
            seen = [(r.get("accuracy") or {}).get("seen") or [] for r in records]
            rows = []
            for r in records:
                acc = r.get("accuracy") or {}
                matrix = [_finite(row) for row in acc.get("matrix") or []]
                initial = acc.get("initial")
                head = [float(np.nanmean(_finite(initial)))] if initial else [math.nan]
                rows.append(head + [float(np.nanmean(row)) for row in matrix])
            suffix = f" (n={len(records)})"
            for ax, series, start in ((left, seen, 0), (right, rows, -1)):
                mean, std, _ = _mean_std(series)
                if not len(mean):
                    continue
                x = np.arange(start, start + len(mean))
                max_T = max(max_T, len(mean) + start)
                ax.plot(x, mean, color=color, linestyle=linestyle, marker=marker, label=label + suffix)
                if len(records) > 1:
                    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        for ax, title, start in (
            (left, "accuracy on seen classes  A_seen[i]", 0),
            (right, "mean accuracy on all experiences  mean_j R[i][j]", -1),
        ):
            ticks = list(range(start, max_T))
            ax.set_xticks(*_ticks(ticks, ["b" if t == -1 else str(t) for t in ticks]))
            ax.set_title(title, loc="left")
            ax.set_xlabel("after training experience i")
            ax.set_ylim(0, 1.02)
        left.set_ylabel("accuracy")
        legend_below(fig, *left.get_legend_handles_labels())
        return to_data_uri(fig)


def line_plot(
    x: Sequence[Any],
    ys: Mapping[str, Sequence[Any]],
    *,
    x_label: str = "",
    y_label: str = "",
    title: str = "",
    color: Color = "#0072B2",
    reference: tuple[str, float] | None = None,
    log2_x: bool = False,
) -> str:
    """A small line plot of one or several named series over ``x`` (a strategy curve).

    ``reference`` draws a labelled horizontal line (the main model's value); ``log2_x`` puts
    positive numeric x (ranks 1, 2, 4, 8...) on a base-2 axis with a tick at each value.
    """
    with _style():
        fig = _figure(4.4, 2.8)
        ax = fig.add_subplot()
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in x)
        xs = _finite(x) if numeric else np.arange(len(x), dtype=np.float64)
        drawn = []
        for i, (name, y) in enumerate(ys.items()):
            c = color if i == 0 else _PALETTE[(i + 1) % len(_PALETTE)]
            values = _finite(y)[: len(xs)]
            drawn.append(values)
            ax.plot(xs[: len(values)], values, marker="o", color=c, label=name if len(ys) > 1 else None)
        if not numeric:
            ax.set_xticks(*_ticks(xs, [str(v) for v in x]))
        elif log2_x and np.all(xs > 0):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
        elif all(float(v).is_integer() for v in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if reference is not None and math.isfinite(reference[1]):
            ax.axhline(reference[1], color="#888888", linestyle="--", linewidth=1, label=reference[0])
            drawn.append(np.array([reference[1]]))
        _honest_y(ax, *drawn)
        if len(ys) > 1 or reference is not None:
            ax.legend(loc="best")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        if title:
            ax.set_title(title, loc="left")
        return to_data_uri(fig)


def small_multiples(frame: Any, color: Color, x_label: str = "after training experience i") -> str:
    """One small line plot per column of ``frame`` (index = x), e.g. a strategy's per-experience scalars."""
    names = list(frame.columns)
    n_cols = min(len(names), 4)
    n_rows = math.ceil(len(names) / n_cols)
    with _style():
        fig = _figure(2.5 * n_cols + 0.3, 2.1 * n_rows + 0.2)
        axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
        x = np.asarray(frame.index, dtype=np.float64)
        for ax, name in zip(axes, names, strict=False):
            values = frame[name].to_numpy(dtype=np.float64)
            ax.plot(x, values, color=color, marker="o")
            _honest_y(ax, values)
            ax.set_title(name, loc="left", fontsize=9)
            ax.set_xticks(*_ticks(x, [str(int(v)) for v in x], most=8))
            ax.set_xlabel(x_label, fontsize=8)
        for ax in axes[len(names) :]:
            ax.set_visible(False)
        return to_data_uri(fig)


def bar_plot(
    labels: Sequence[Any],
    values: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    title: str = "",
    color: Color = "#0072B2",
    x_label: str = "",
    y_label: str = "",
) -> str:
    """Bars over ``labels`` in the given order: a per-layer figure, or a curve of counts (``kind: bar``).

    ``values`` is one series, or named series of the same length drawn side by side with a legend
    (colours as in :func:`line_plot`). Long lists thin and turn their labels; short labels (ranks)
    stay upright.
    """
    n = len(labels)
    series = dict(values) if isinstance(values, Mapping) else {"": values}
    texts = [str(v) for v in labels]
    with _style():
        fig = _figure(min(max(4.4, 0.16 * n * len(series) + 1.5), 11.0), 3.0)
        ax = fig.add_subplot()
        ax.grid(axis="x", visible=False)
        ax.set_axisbelow(True)  # grid lines behind the bars
        width = 0.8 / len(series)
        for i, (name, ys) in enumerate(series.items()):
            c = color if i == 0 else _PALETTE[(i + 1) % len(_PALETTE)]
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar(np.arange(n) + offset, _finite(ys)[:n], color=c, width=width, label=name or None)
        step = max(1, math.ceil(n / 60))
        upright = all(len(t) <= 4 for t in texts)
        ax.set_xticks(
            np.arange(n)[::step],
            texts[::step],
            rotation=0 if upright else 90,
            fontsize=6 if n > 24 else 8,
        )
        if len(series) > 1:
            ax.legend(loc="best")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        if title:
            ax.set_title(title, loc="left")
        return to_data_uri(fig)


@dataclass(frozen=True)
class TradeoffPoint:
    """One group of runs in a forgetting trade-off plot: mean and sample std over its seeds.

    ``note`` is empty for a group eligible for a best mark, else why not (``did not learn``,
    ``does not train``): such a point is drawn hollow and its legend entry says so.
    """

    label: str
    strategy: str
    forgetting: float
    forgetting_std: float
    cost: float
    cost_std: float
    n: int
    note: str = ""


def _spread(value: float, n: int) -> float | None:
    return value if n > 1 and math.isfinite(value) and value > 0 else None


def human_count(value: float, _pos: Any = None) -> str:
    """``500``, ``2k``, ``1.5M``: an axis tick of a parameter count."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def tradeoff_plot(
    points: Sequence[TradeoffPoint],
    colors: Mapping[str, Color],
    *,
    x_label: str,
    title: str,
    log_x: bool = False,
    zero_label: str = "cost 0",
) -> str | None:
    """Forgetting (y, lower is better) against a cost (x): one point per group of runs.

    Colours are the strategies' colours of the other plots; groups of one strategy differ in their
    marker. Each point is labelled with its strategy, and the legend gives the full group label and
    its number of runs. Error bars are ± 1 sample std over seeds (both axes, only with several
    seeds). Groups that are not eligible for a best mark (``TradeoffPoint.note``) are hollow and
    their legend entry says why. On a log axis a group of cost 0 (zero-shot: no trainable
    parameters) cannot be placed: it is a dashed horizontal line at its forgetting, its legend
    entry ending in ``zero_label``. The legend sits below the axes (:func:`legend_below`), so it
    never narrows them. None when no point has a defined forgetting (T = 1).
    """
    drawable = [p for p in points if math.isfinite(p.forgetting)]
    if not drawable:
        return None
    with _style():
        fig = _figure(5.8, 3.3)
        ax = fig.add_subplot()
        nth: dict[Color, int] = {}
        low, high = 0.0, 0.0
        for point in drawable:
            color = colors.get(point.strategy, "#333333")
            nth[color] = nth.get(color, -1) + 1
            marker = _LINE_STYLES[nth[color] % len(_LINE_STYLES)][1]
            hollow = bool(point.note)
            label = f"{point.label} (n={point.n})" + (f" — {point.note}" if hollow else "")
            y_err = _spread(point.forgetting_std, point.n) or 0.0
            low, high = min(low, point.forgetting - y_err), max(high, point.forgetting + y_err)
            if log_x and not point.cost > 0:
                ax.axhline(
                    point.forgetting,
                    color=color,
                    linestyle="--",
                    linewidth=1.2,
                    alpha=0.6 if hollow else 1.0,
                    label=f"{label}; {zero_label}",
                )
                continue
            ax.errorbar(
                [point.cost],
                [point.forgetting],
                xerr=_spread(point.cost_std, point.n),
                yerr=y_err or None,
                color=color,
                ecolor=color,
                marker=marker,
                markersize=7,
                markerfacecolor="white" if hollow else color,
                markeredgecolor=color,
                markeredgewidth=1.4,
                linestyle="none",
                elinewidth=1.0,
                capsize=2.5,
                alpha=0.6 if hollow else 1.0,
                label=label,
            )
            ax.annotate(
                point.strategy,
                (point.cost, point.forgetting),
                xytext=(6, 4),
                textcoords="offset points",
                fontsize=7.5,
                color="#888888" if hollow else "#1d2330",
            )
        ax.margins(x=0.2)  # room for the point labels
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(human_count))
            lo, hi = ax.get_xlim()
            few_decades = lo > 0 and math.log10(hi / lo) < 2
            ax.xaxis.set_minor_formatter(FuncFormatter(human_count) if few_decades else NullFormatter())
        else:
            ax.set_xlim(left=0)
        span = (high - low) or 1.0
        ax.set_ylim(low - 0.08 * span, high + 0.12 * span)  # a point at 0 stays clear of the axis
        ax.set_xlabel(x_label)
        ax.set_ylabel("forgetting (lower is better)")
        ax.set_title(title, loc="left")
        legend_below(fig, *ax.get_legend_handles_labels())
        return to_data_uri(fig)


_BINARY_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def _in_units(value: float, number: str, plain: str) -> str:
    """``value`` in the largest binary unit it reaches, formatted with ``number`` (bytes: ``plain``)."""
    for unit, size in _BINARY_UNITS:
        if abs(value) >= size:
            return f"{value / size:{number}} {unit}"
    return f"{value:{plain}} B"


def human_bytes(value: float) -> str:
    """``512 B``, ``1.5 KiB``, ``12.0 MiB``, ``2.3 GiB``: a byte count in binary units, one decimal."""
    return _in_units(value, ",.1f", ",.0f")


def _byte_tick(value: float, _pos: Any = None) -> str:
    """An axis tick of a byte count: ``4 MiB``, ``1.5 GiB`` (no trailing ``.0``)."""
    return _in_units(value, "g", "g")


@dataclass(frozen=True)
class CommunicationPoint:
    """One federated run in :func:`communication_plot`: bytes it communicated, accuracy it reached."""

    label: str
    strategy: str
    communication_bytes: float
    accuracy: float


def communication_plot(points: Sequence[CommunicationPoint], colors: Mapping[str, Color]) -> str | None:
    """Final accuracy (y) against the total bytes communicated (x, log scale): one point per run.

    Each point is labelled with its strategy and coloured like it everywhere in the report; runs
    of one strategy differ in marker, and the legend below the axes (:func:`legend_below`) names
    every run. A run without a positive byte count or without an accuracy cannot be placed and
    is left out; None when no run can be.
    """
    drawable = [p for p in points if math.isfinite(p.accuracy) and math.isfinite(p.communication_bytes)]
    drawable = [p for p in drawable if p.communication_bytes > 0]
    if not drawable:
        return None
    with _style():
        fig = _figure(5.8, 3.3)
        ax = fig.add_subplot()
        nth: dict[Color, int] = {}
        for point in drawable:
            color = colors.get(point.strategy, "#333333")
            nth[color] = nth.get(color, -1) + 1
            marker = _LINE_STYLES[nth[color] % len(_LINE_STYLES)][1]
            ax.plot(
                [point.communication_bytes],
                [point.accuracy],
                color=color,
                marker=marker,
                markersize=7,
                linestyle="none",
                label=point.label,
            )
            ax.annotate(
                point.strategy,
                (point.communication_bytes, point.accuracy),
                xytext=(6, 4),
                textcoords="offset points",
                fontsize=7.5,
                color="#1d2330",
            )
        ax.set_xscale("log", base=2)  # ticks at powers of two: 4 MiB, 16 MiB, 1 GiB
        ax.margins(x=0.25)  # room for the point labels, and a single run is not on the frame
        ax.xaxis.set_major_locator(LogLocator(base=2, numticks=8))
        ax.xaxis.set_major_formatter(FuncFormatter(_byte_tick))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("bytes communicated, upload + download, all rounds (log scale)")
        ax.set_ylabel("acc_final")
        ax.set_title("final accuracy vs communication", loc="left")
        legend_below(fig, *ax.get_legend_handles_labels())
        return to_data_uri(fig)


@dataclass(frozen=True)
class RoundSeries:
    """The seen-class accuracy of one federated run after each round, on the experience axis:
    round r of an experience e with R rounds sits at ``e + (r + 1) / R`` (so the last round of
    experience e is at e + 1, and runs with different R line up at the experience boundaries)."""

    label: str
    strategy: str
    x: list[float]
    accuracy: list[float]


def round_curves(
    series: Sequence[RoundSeries], colors: Mapping[str, Color], n_experiences: int
) -> str | None:
    """Seen-class accuracy after every round, one line per run, experience boundaries dashed.

    Runs of one strategy share its colour and differ in line style and marker; the legend is below
    the axes (:func:`legend_below`). None when no run recorded a round.
    """
    drawn = [s for s in series if s.x]
    if not drawn:
        return None
    with _style():
        fig = _figure(7.2, 3.2)
        ax = fig.add_subplot()
        styles_used: dict[Color, int] = {}
        for s in drawn:
            color = colors.get(s.strategy, "#333333")
            nth = styles_used[color] = styles_used.get(color, -1) + 1
            linestyle, marker = _LINE_STYLES[nth % len(_LINE_STYLES)]
            ax.plot(s.x, _finite(s.accuracy), color=color, linestyle=linestyle, marker=marker, label=s.label)
        T = max(n_experiences, math.ceil(max(max(s.x) for s in drawn)))
        for boundary in range(1, T):
            ax.axvline(boundary, color="#888888", linestyle="--", linewidth=0.9)
        ax.grid(axis="x", visible=False)
        ax.set_xlim(-0.02 * T, 1.02 * T)  # the last round's point (at T) stays inside the frame
        ax.set_xticks(*_ticks(np.arange(T) + 0.5, [str(e) for e in range(T)]))
        ax.set_xlabel("experience (its rounds left to right; dashed: experience boundaries)")
        ax.set_ylabel("accuracy on seen classes")
        ax.set_ylim(0, 1.02)
        ax.set_title("seen-class accuracy after each round", loc="left")
        legend_below(fig, *ax.get_legend_handles_labels())
        return to_data_uri(fig)
