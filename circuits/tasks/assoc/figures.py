"""The associative-memory claims' figures (the seed's cells): each function returns a matplotlib figure."""

from __future__ import annotations

import numpy as np
import torch

from circuits.tasks.assoc.laws import capacity_bound
from circuits.tasks.assoc.model import table_logits

__all__ = ["learning_dynamics", "scaling_figure", "freezing_figure", "geometry_figure", "skip_connection_figure"]


def _pyplot():
    """pyplot on the Agg canvas, imported when a figure is drawn (the report renders figures lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_dynamics(law, baseline, loaded_models):
    fig, ax = _pyplot().subplots(figsize=(6.4, 4))
    for l in loaded_models:
        hist = l.card.get("history") or []
        ax.plot([h["step"] for h in hist], [h["divergence"] for h in hist],
                label=f"AoT H={l.entry.config.n_heads}")
    ax.axhline(law.random_baseline(), color="red", ls="--", label="random baseline log N - H")
    ax.axhline(baseline.divergence, color="green", ls="--", label=f"optimal rank-{baseline.d} baseline")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("divergence (nats)")
    ax.set_title("learning dynamics on the last-position law (N=10, d=5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def scaling_figure(heads, ours, paper, slope, intercept, n, seeds, on_table, tolerance: float):
    fig, ax = _pyplot().subplots(figsize=(6.6, 4.4))
    H = np.asarray(heads)
    ax.fill_between(H, np.asarray(paper) - tolerance, np.asarray(paper) + tolerance, color="grey",
                    alpha=0.2, label=f"paper +-{tolerance}")
    ax.plot(H, paper, "s--", color="black", label="paper (Data_exp_1_10)")
    ax.plot(H, [m for m, _ in ours], "o-", color="tab:blue", label=f"ours (mean of seeds {list(seeds)})")
    ax.plot(H, on_table, "o:", color="tab:orange", ms=3,
            label="ours scored on the whole table (each pair once, not by training count)")
    for h, (_, accs) in zip(H, ours):
        ax.scatter([h] * len(accs), accs, color="tab:blue", s=10, alpha=0.5)
    xs = np.linspace(H[0], H[n - 1], 50)
    ax.plot(xs, slope * xs + intercept, color="tab:blue", ls=":", label=f"linear fit: {slope:.4f} per head")
    ax.plot(H, [capacity_bound(50, h, 10, 10) for h in H], color="tab:green", label="Corollary 2 lower bound")
    ax.axhline(1 / 50, color="tab:red", lw=0.8, label="chance 1/N")
    ax.set_xlabel("heads H")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("scaling law for N=50, d=d_h=10")
    fig.tight_layout()
    return fig


def freezing_figure(loaded, law):
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.6))
    names = list(loaded)
    accs = [law.accuracy(table_logits(loaded[n].model).double()) for n in names]
    axes[0].bar(names, accs, color="tab:purple")
    axes[0].axhline(1 / law.N, color="red", ls="--", lw=0.8)
    axes[0].set_ylabel("accuracy")
    axes[0].tick_params(axis="x", labelsize=7)
    for n in names:
        hist = loaded[n].card.get("history") or []
        axes[1].plot([h["step"] for h in hist], [h["divergence"] for h in hist], label=n)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("divergence")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def geometry_figure(tv, cos: torch.Tensor, label: str):
    fig, axes = _pyplot().subplots(1, 3, figsize=(12, 3.6))
    U = tv.unembed
    G = (U @ U.t()).numpy()
    lim = np.abs(G).max()
    im = axes[0].imshow(G, cmap="bwr", vmin=-lim, vmax=lim)
    axes[0].set_title(r"$W_U W_U^T$")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    order = torch.argsort(tv.targets, stable=True)
    V = tv.vectors[order]
    GV = (V @ V.t()).numpy()
    lim = np.abs(GV).max()
    im = axes[1].imshow(GV, cmap="bwr", vmin=-lim, vmax=lim)
    axes[1].set_title(f"Gram of {label} (sorted by target)", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[2].hist(cos.numpy(), bins=30, color="tab:orange")
    axes[2].set_xlabel("cos(vector, w_U(target))")
    fig.tight_layout()
    return fig


def skip_connection_figure(histories: dict, seeds) -> object:
    """Accuracy during training with and without the residual connection: `histories` maps
    (residual, seed) to a card's history."""
    fig, ax = _pyplot().subplots(figsize=(6, 3.6))
    for r, colour in ((True, "tab:blue"), (False, "tab:orange")):
        for s in seeds:
            hist = histories[(r, s)] or []
            ax.plot([h["step"] for h in hist], [h["accuracy"] for h in hist], color=colour,
                    alpha=0.8, label=f"residual={r}" if s == seeds[0] else None)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title("with and without the residual connection (N=100, 1600 pairs, 10 heads)", fontsize=10)
    fig.tight_layout()
    return fig
