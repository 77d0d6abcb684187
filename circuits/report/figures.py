"""Figures for the report: the ``figures`` fixture object and the training-curve plot.

Test figures are rendered to PNG with matplotlib's Agg canvas (no display, no pyplot state needed)
and closed; matplotlib is imported lazily. Training curves are small hand-written SVGs.
"""

from __future__ import annotations

import hashlib
import html
import io
import math
import re
from pathlib import Path
from typing import Any, Callable

from circuits.errors import CircuitsError

__all__ = ["Figures", "FigureNameError", "render_png", "overlaid_histograms", "training_curves_svg", "slug"]

DPI = 100


class FigureNameError(CircuitsError, ValueError):
    """A figure name that is empty or used twice in one test."""


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe version of ``text``, with a short hash so distinct texts stay distinct."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:limit] or "x"
    return f"{base}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def render_png(fig: Any, dpi: int = DPI) -> bytes:
    """PNG bytes of a matplotlib Figure; the figure is closed afterwards."""
    buf = io.BytesIO()
    # format="png" draws with the Agg renderer whatever backend pyplot uses. The canvas is saved as
    # laid out (tight_layout / constrained layout keep text inside it): cropping with
    # bbox_inches="tight" would lay out every figure twice, ~35% of the report's drawing time
    try:
        fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    finally:
        _close(fig)
    return buf.getvalue()


def _close(fig: Any) -> None:
    import sys

    plt = sys.modules.get("matplotlib.pyplot")  # only pyplot-made figures need closing
    if plt is not None:
        plt.close(fig)


def _check_figure(name: Any, fig: Any) -> None:
    from matplotlib.figure import Figure

    if isinstance(fig, Figure):
        return
    got = type(fig).__module__ + "." + type(fig).__qualname__ if fig is not None else "None"
    hint = ""
    if hasattr(fig, "figure") and isinstance(getattr(fig, "figure", None), Figure):
        hint = " (pass its .figure)"
    raise TypeError(f"figures.add({name!r}, ...) needs a matplotlib.figure.Figure, got {got}{hint}")


class Figures:
    """Collects a test's figures. Returned by the ``figures`` fixture.

    ``sink(name, png_bytes, caption)`` receives each rendered figure (the plugin writes it into
    the run directory and attaches it to the test's section of the report). A ``Figures`` made with
    ``render=False`` (negative-control runs, ``--circuits-no-report``) checks names and closes figures
    without rendering them: drawing a PNG costs ~0.1-1 s, and nothing would show it.
    ``fig`` may also be a zero-argument callable returning the figure, built only when rendered.
    """

    def __init__(self, sink: Callable[[str, bytes, str], None] | None = None, render: bool = True) -> None:
        self._sink = sink
        self.render = render
        self.names: list[str] = []

    def add(self, name: str, fig: Any, caption: str = "") -> None:
        """Render ``fig`` (a matplotlib Figure, or a callable making one) to PNG under ``name``,
        close it, attach it."""
        __tracebackhide__ = True
        if not isinstance(name, str) or not name.strip():
            raise FigureNameError(f"a figure name must be a non-empty string, got {name!r}")
        if name in self.names:
            raise FigureNameError(f"figure name {name!r} is used twice in this test")
        self.names.append(name)
        if not self.render:
            if not callable(fig):
                _check_figure(name, fig)
                _close(fig)
            return
        if callable(fig) and not hasattr(fig, "savefig"):
            fig = fig()
        _check_figure(name, fig)
        png = render_png(fig)
        if self._sink is not None:
            self._sink(name, png, str(caption or ""))


def overlaid_histograms(ax: Any, samples: dict, bins: Any, alpha: float = 0.55) -> None:
    """Filled histograms of several samples on one axes: ``samples`` maps a legend label to
    ``(values, colour)``. Each is one step patch (``ax.stairs``); ``ax.hist`` draws a rectangle per
    bin, and the bracket and palindrome grids (~1,400 rectangles) took ~1 s each to lay out and draw."""
    import numpy as np

    for label, (values, colour) in samples.items():
        counts, edges = np.histogram(np.asarray(values), bins=bins)
        ax.stairs(counts, edges, fill=True, alpha=alpha, color=colour, label=label)


def training_curves_svg(model: dict, width: int = 420, height: int = 260) -> str | None:
    """Loss (and accuracy, if present) against step for a model's ``metrics.history``, as an inline
    SVG string for an HTML page (None without a history). Written by hand rather than with
    matplotlib: a report draws one per model (26 on the default run), and matplotlib spent ~0.1 s
    on each for four polylines; the SVG takes about a millisecond and stays sharp at any zoom."""
    hist = (model.get("metrics") or {}).get("history") or []
    rows = [h for h in hist if isinstance(h, dict) and _num(h.get("step")) is not None]
    # the trainer's held-out metrics are eval_loss / eval_acc (val_* kept for hand-made cards)
    series = {k: _xy(rows, k) for k in ("loss", "eval_loss", "val_loss", "acc", "eval_acc", "val_acc")}
    series = {k: xy for k, xy in series.items() if xy[0]}
    if not series:
        return None
    losses = [k for k in series if "loss" in k]
    accs = [k for k in series if "acc" in k]
    left, right, top, bottom = 50, (44 if accs and losses else 14), 26, 34
    x_all = [x for xs, _ in series.values() for x in xs]
    x_axis = _Axis(min(x_all), max(x_all), left, width - right)
    axes = {}
    if losses:
        y_all = [y for k in losses for y in series[k][1]]
        axes["loss"] = _Axis(min(y_all), max(y_all), height - bottom, top, log=min(y_all) > 0)
    if accs:
        axes["acc"] = _Axis(-0.02, 1.02, height - bottom, top, ticks=[0, 0.25, 0.5, 0.75, 1])
    out = [f'<svg viewBox="0 0 {width} {height}" width="100%" '
           f'role="img" font-family="sans-serif" font-size="9">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           f'fill="none" stroke="#bbb"/>']
    for t in x_axis.tick_values():
        px = x_axis.px(t)
        y = height - bottom
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y}" y2="{y + 3}" stroke="#555"/>'
                   f'<text x="{px:.1f}" y="{y + 13}" text-anchor="middle">{_tick_text(t)}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 6}" text-anchor="middle">step</text>')
    for name, ax in axes.items():
        on_left = name == "loss" or not losses
        edge = left if on_left else width - right
        for t in ax.tick_values():
            py = ax.px(t)
            tick_end, anchor, text_x = (edge - 3, "end", edge - 5) if on_left else (edge + 3, "start", edge + 5)
            out.append(f'<line x1="{edge}" x2="{tick_end}" y1="{py:.1f}" y2="{py:.1f}" stroke="#555"/>'
                       f'<text x="{text_x}" y="{py + 3:.1f}" text-anchor="{anchor}">{_tick_text(t)}</text>')
        label_x = 12 if on_left else width - 6
        out.append(f'<text transform="translate({label_x},{(top + height - bottom) / 2:.0f}) rotate(-90)" '
                   f'text-anchor="middle">{"loss" if name == "loss" else "accuracy"}</text>')
    for i, (k, (xs, ys)) in enumerate(series.items()):
        ax = axes["loss" if k in losses else "acc"]
        points = " ".join(f"{x_axis.px(x):.1f},{ax.px(y):.1f}" for x, y in zip(xs, ys))
        dash = ' stroke-dasharray="5 3"' if k in accs else ""
        out.append(f'<polyline points="{points}" fill="none" stroke="{_CURVE_COLOURS[k]}" stroke-width="1.4"{dash}/>')
        ly = top + 10 + 12 * i
        out.append(f'<line x1="{width - right - 78}" x2="{width - right - 62}" y1="{ly - 3}" y2="{ly - 3}" '
                   f'stroke="{_CURVE_COLOURS[k]}" stroke-width="1.4"{dash}/>'
                   f'<text x="{width - right - 58}" y="{ly}">{k}</text>')
    title = str(model.get("name", "model")) + (f" (seed {model['seed']})" if model.get("seed") is not None else "")
    out.append(f'<text x="{(left + width - right) / 2:.1f}" y="16" text-anchor="middle" font-size="11">'
               f'{html.escape(title)}</text></svg>')
    return "".join(out)


_CURVE_COLOURS = {"loss": "#2563eb", "eval_loss": "#60a5fa", "val_loss": "#60a5fa", "acc": "#d97706",
                  "eval_acc": "#fbbf24", "val_acc": "#fbbf24"}


class _Axis:
    """A data interval mapped onto a pixel interval (linear or log10), with readable tick values."""

    def __init__(self, lo: float, hi: float, px_lo: float, px_hi: float, log: bool = False, ticks=None):
        self.log, self.px_lo, self.px_hi, self._ticks = log, px_lo, px_hi, ticks
        f = math.log10 if log else float
        a, b = f(lo), f(hi)
        pad = (b - a) * 0.04 or (abs(a) * 0.1 or 1.0)
        self.lo, self.hi = a - pad, b + pad

    def px(self, v: float) -> float:
        u = math.log10(v) if self.log else v
        return self.px_lo + (u - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)

    def tick_values(self) -> list[float]:
        if self._ticks is not None:
            return list(self._ticks)
        if self.log:  # 1, 2, 5 x 10^k inside the range; only the powers of ten when that is too many
            ticks = [m * 10.0 ** e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1) for m in (1, 2, 5)]
            ticks = [t for t in ticks if self.lo <= math.log10(t) <= self.hi]
            if len(ticks) >= 3:
                return ticks if len(ticks) <= 7 else [t for t in ticks if f"{t:.0e}".startswith("1")]
            # less than a decade: evenly spaced values (drawn at their log positions)
            return [t for t in _linear_ticks(10.0 ** self.lo, 10.0 ** self.hi) if t > 0]
        return _linear_ticks(self.lo, self.hi)


def _linear_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2 or 5 x 10^k apart) inside [lo, hi]."""
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [round(i * step, 12) for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _tick_text(v: float) -> str:
    if abs(v) >= 10_000 and float(v).is_integer():
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _xy(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(_num(r["step"]), _num(r.get(key))) for r in rows if _num(r.get(key)) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_png(path: Path, png: bytes) -> None:
    """Write PNG bytes atomically."""
    from circuits.atomic import write_bytes_atomic

    write_bytes_atomic(path, png)
