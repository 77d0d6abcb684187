"""Figures for the report: the ``figures`` fixture object and the training-curve plot.

Figures are rendered to PNG with matplotlib's Agg canvas (no display, no pyplot state needed) and
closed. matplotlib is imported lazily.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any, Callable

from .errors import CircuitsError

__all__ = ["Figures", "FigureNameError", "render_png", "training_curves_png", "slug"]

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
    try:  # format="png" draws with the Agg renderer whatever backend pyplot uses
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
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
    ``render=False`` (negative-control runs, ``--no-report``) checks names and closes figures
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


def training_curves_png(model: dict) -> bytes | None:
    """Loss (and accuracy, if present) against step for a model's ``metrics.history``."""
    hist = (model.get("metrics") or {}).get("history") or []
    rows = [h for h in hist if isinstance(h, dict) and isinstance(h.get("step"), (int, float))]
    if not rows:
        return None
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    # the trainer's held-out metrics are eval_loss / eval_acc (val_* kept for hand-made cards)
    series = [k for k in ("loss", "eval_loss", "val_loss", "acc", "eval_acc", "val_acc")
              if any(_num(r.get(k)) for r in rows)]
    if not series:
        return None
    losses = [k for k in series if "loss" in k]
    accs = [k for k in series if "acc" in k]
    fig = Figure(figsize=(4.2, 2.6))
    ax = fig.add_subplot()
    colors = {"loss": "#2563eb", "eval_loss": "#60a5fa", "val_loss": "#60a5fa", "acc": "#d97706",
              "eval_acc": "#fbbf24", "val_acc": "#fbbf24"}
    for k in losses:
        ax.plot(*_xy(steps, rows, k), color=colors[k], label=k, lw=1.4)
    if losses:
        ax.set_ylabel("loss")
        if all(_num(r.get(k)) is None or r[k] > 0 for r in rows for k in losses):
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_yscale("log")  # ticks at 1, 2, 5 x 10^k written plainly (0.02, 0.05, 0.1...)
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    ax2 = ax.twinx() if (accs and losses) else ax
    for k in accs:
        ax2.plot(*_xy(steps, rows, k), color=colors[k], label=k, lw=1.4, ls="--")
    if accs:
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    title = model.get("name", "model")
    if model.get("seed") is not None:
        title += f" (seed {model['seed']})"
    ax.set_title(title, fontsize=10)
    handles = ax.get_legend_handles_labels()
    if ax2 is not ax:
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    ax.legend(*handles, fontsize=7, frameon=False, loc="center right")
    for a in {ax, ax2}:
        a.tick_params(labelsize=7)
        for side in ("top",):
            a.spines[side].set_visible(False)
    # fixed margins: tight_layout cost ~40% of the render, and render_png crops to the drawn area anyway
    fig.subplots_adjust(left=0.13, right=0.87, bottom=0.17, top=0.89)
    return render_png(fig)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x else None


def _xy(steps: list, rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(s, _num(r.get(key))) for s, r in zip(steps, rows) if _num(r.get(key)) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_png(path: Path, png: bytes) -> None:
    """Write PNG bytes atomically."""
    from .atomic import write_bytes_atomic

    write_bytes_atomic(path, png)
