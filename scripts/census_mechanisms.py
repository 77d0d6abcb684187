"""What distinguishes the bracket seeds that grow a count head or a negative head (issue 34, item 3).

Reads a bracket census (``reports/census/brackets/census.json``: each seed's claim values) and the
census store (each seed's card: training history; its zoo entry: the model at initialisation), and
writes ``mechanisms.md`` and ``mechanisms.png`` beside the census:

* per seed and recipe: the count-head and negative-head claims' values (AUROC of the bound head on its
  failure type, its attention q0 -> k1, its tracking of |p - 1/2|), the steps trained, the final
  held-out loss and accuracy;
* the layer-2 heads' attention from position 0 to position 1 at initialisation and after training
  (the count head's signature in the write-up), on 2,000 fresh strings starting with "(";
* how often each recipe grows each head (Fisher's exact test between two recipes), and within each
  recipe which of these differ between the seeds that grow the head and the others (Mann-Whitney U,
  exact two-sided p, Holm-adjusted over the four measures; with a handful of positives the test has
  little power and the table says so).

A seed "grows a count head" when the census claim ``count_head.auroc(elevation failure)`` passes on it
(AUROC >= 0.95 on the held-out strings, its lower bound), and a negative head when
``negative_head.auroc(negative failure)`` passes (>= 0.98): the hypotheses' own bars.

    CIRCUITS_CACHE=reports/census/store python scripts/census_mechanisms.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

COUNT = "test_count_head_separates_elevation_failures: count_head.auroc(elevation failure)"
NEGATIVE = "test_negative_head_separates_negative_failures: negative_head.auroc(negative failure)"
TRACKS = "test_count_head_tracks_open_proportion: count_head.spearman(contribution, |p - 1/2|)"
ATTENDS = "test_count_head_attends_to_position_1_from_position_0: count_head.attention(q=0 -> k=1)"
N_STRINGS = 2000
STRINGS_SEED = 20261207  # fresh strings, drawn apart from every training / test stream


def _cells(row: dict, column: str) -> dict:
    cell = row["claims"].get(column) or {}
    return cell.get("seeds", {})


def q0_to_k1(model, toks: torch.Tensor) -> list[float]:
    """Mean attention from position 0 to position 1 of each layer-2 head: [n_heads]."""
    name = "blocks.2.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names=[name])
    return cache[name][:, :, 0, 1].mean(0).tolist()


def seed_rows(census: dict, store) -> list[dict]:
    from circuits.tasks.brackets import data as D
    from circuits.zoo import registry as zoo

    strings = D.generate(N_STRINGS, STRINGS_SEED)
    toks = strings.toks[strings.starts_open]
    out = []
    for row in census["rows"]:
        if row.get("kind") == "reference":
            continue
        recipe = row["label"]
        name = "brackets" if recipe == "default" else f"brackets@{recipe}"
        entry = zoo.get_entry(name)
        count, neg, tracks, attends = (_cells(row, c) for c in (COUNT, NEGATIVE, TRACKS, ATTENDS))
        for seed in sorted(count, key=int):
            card = zoo.find_card(name, int(seed), store=store) or {}
            hist = card.get("history") or []
            model = zoo.load(name, seed=int(seed), store=store) if card else None
            model = getattr(model, "model", model)
            acc = (row.get("accuracy") or {}).get(seed) or {}
            out.append({
                "recipe": recipe, "seed": int(seed),
                "count_head": bool(count[seed].get("passed")), "negative_head": bool(neg.get(seed, {}).get("passed")),
                "count_auroc": count[seed].get("value"), "negative_auroc": neg.get(seed, {}).get("value"),
                "tracks": tracks.get(seed, {}).get("value"), "attends": attends.get(seed, {}).get("value"),
                "steps": card.get("steps"), "test_acc": acc.get("test_acc"),
                "final_eval_loss": hist[-1].get("eval_loss") if hist else None,
                "curve": [(h.get("step"), h.get("eval_loss")) for h in hist],
                "init_q0k1": q0_to_k1(entry.new_model(int(seed)).eval(), toks),
                "final_q0k1": q0_to_k1(model.eval(), toks) if model is not None else None,
            })
    return out


def mann_whitney_p(a: list, b: list) -> float | None:
    """Exact two-sided Mann-Whitney U p-value (None where a group is empty)."""
    from scipy.stats import mannwhitneyu

    a, b = [x for x in a if x is not None], [x for x in b if x is not None]
    if not a or not b:
        return None
    return float(mannwhitneyu(a, b, alternative="two-sided", method="exact" if len(a) + len(b) <= 60 else "auto").pvalue)


def holm(ps: list) -> list:
    """Holm's step-down adjustment of the p-values (None stays None): the comparisons of one role and
    recipe are a family of four, so one p of 0.03 among them is not evidence on its own."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out, running = list(ps), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * ps[i]))
        out[i] = running
    return out


COMPARED = [("steps trained", lambda r: r["steps"]),
            ("final held-out loss", lambda r: r["final_eval_loss"]),
            ("max layer-2 attention q0 -> k1 at initialisation", lambda r: max(r["init_q0k1"])),
            ("max layer-2 attention q0 -> k1 after training",
             lambda r: max(r["final_q0k1"]) if r["final_q0k1"] else None)]


def summary(rows: list[dict]) -> list[str]:
    """Per role: how often each recipe grows it (Fisher's exact test between two recipes), then, within
    each recipe (steps and losses are not comparable across recipes), the seeds that grow it against
    the others on each measure (Mann-Whitney, raw and Holm-adjusted over the four)."""
    from scipy.stats import fisher_exact

    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    lines = []
    for role in ("count_head", "negative_head"):
        label = role.replace("_", " ")
        counts = {rc: (sum(r[role] for r in rows if r["recipe"] == rc), sum(r["recipe"] == rc for r in rows))
                  for rc in recipes}
        lines += [f"### Seeds with a {label}: " + ", ".join(f"{rc} {k} of {n}" for rc, (k, n) in counts.items()), ""]
        if len(recipes) == 2:
            (k1, n1), (k2, n2) = counts.values()
            p = fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue
            lines += [f"- {recipes[0]} against {recipes[1]}: Fisher's exact test p = {p:.2g}", ""]
        for rc in recipes:
            mine = [r for r in rows if r["recipe"] == rc]
            grown, rest = [r for r in mine if r[role]], [r for r in mine if not r[role]]
            if not grown:
                lines += [f"{rc}: none, nothing to compare.", ""]
                continue
            ps = [mann_whitney_p([get(r) for r in grown], [get(r) for r in rest]) for _, get in COMPARED]
            lines.append(f"{rc} ({len(grown)} with, {len(rest)} without):")
            for (what, get), p, adj in zip(COMPARED, ps, holm(ps)):
                a = [get(r) for r in grown if get(r) is not None]
                b = [get(r) for r in rest if get(r) is not None]
                lines.append(f"- {what}: medians {np.median(a):.3g} vs {np.median(b):.3g}, "
                             + ("p –" if p is None else f"p = {p:.2g} (Holm {adj:.2g})"))
            lines.append("")
    return lines


def table(rows: list[dict]) -> list[str]:
    def f(x, fmt=".3f"):
        return "–" if x is None else format(x, fmt)

    out = ["| recipe | seed | count head | AUROC (count) | negative head | AUROC (negative) | tracks \\|p-1/2\\| | "
           "attn q0->k1 | steps | held-out acc | layer-2 q0->k1 at init | after training |", "|" + "---|" * 12]
    for r in rows:
        out.append(f"| {r['recipe']} | {r['seed']} | {'yes' if r['count_head'] else 'no'} | {f(r['count_auroc'])} | "
                   f"{'yes' if r['negative_head'] else 'no'} | {f(r['negative_auroc'])} | {f(r['tracks'])} | "
                   f"{f(r['attends'])} | {r['steps']} | {f(r['test_acc'], '.4%')} | "
                   f"{', '.join(f'{x:.3f}' for x in r['init_q0k1'])} | "
                   f"{', '.join(f'{x:.3f}' for x in r['final_q0k1']) if r['final_q0k1'] else '–'} |")
    return out


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"default": "tab:blue", "arena_like": "tab:orange"}
    for r in rows:
        c = colours.get(r["recipe"], "tab:gray")
        marker = "*" if r["count_head"] or r["negative_head"] else "o"
        if r["count_auroc"] is not None and r["negative_auroc"] is not None:
            axes[0].scatter(r["count_auroc"], r["negative_auroc"], c=c, marker=marker, s=80 if marker == "*" else 25)
        steps, losses = zip(*[(s, l) for s, l in r["curve"] if s is not None and l is not None]) if r["curve"] else ((), ())
        axes[1].plot(steps, losses, c=c, lw=2 if marker == "*" else 0.6, alpha=1 if marker == "*" else 0.5)
        if r["count_auroc"] is not None:
            axes[2].scatter(max(r["init_q0k1"]), r["count_auroc"], c=c, marker=marker, s=80 if marker == "*" else 25)
    axes[0].axvline(0.95, c="k", ls=":", lw=0.8)
    axes[0].axhline(0.98, c="k", ls=":", lw=0.8)
    axes[0].set(xlabel="count head AUROC (elevation failures)", ylabel="negative head AUROC (negative failures)",
                title="the bound heads' separation, per seed")
    axes[1].set(xlabel="step", ylabel="held-out loss", yscale="log", title="training curves (thick: a head grown)")
    axes[2].set(xlabel="max layer-2 attention q0 -> k1 at initialisation", ylabel="count head AUROC",
                title="initial attention vs the count head")
    for recipe, c in colours.items():
        axes[0].scatter([], [], c=c, label=recipe)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--census", default="reports/census/brackets/census.json")
    parser.add_argument("--store", default=os.environ.get("CIRCUITS_CACHE", "reports/census/store"))
    args = parser.parse_args(argv)
    from circuits.zoo.store import ModelStore

    torch.set_num_threads(1)
    os.environ.setdefault("CIRCUITS_TRAIN_BACKEND", "ensemble")  # the census's models (references keep their own)
    census = json.loads(Path(args.census).read_text())
    rows = seed_rows(census, ModelStore(Path(args.store)))
    out = Path(args.census).parent
    lines = ["# Bracket census: what the seeds with a count or negative head have in common", "",
             f"From `{args.census}` and the models in `{args.store}` (`python scripts/census_mechanisms.py`). "
             "A seed grows a count head when the census claim count_head.auroc(elevation failure) passes on it, a "
             "negative head when negative_head.auroc(negative failure) does. Attention q0 -> k1: mean over "
             f"{N_STRINGS:,} fresh strings (those starting with '('), per layer-2 head.", ""]
    lines += summary(rows) + table(rows)
    tmp = out / "mechanisms.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "mechanisms.md")
    figure(rows, out / "mechanisms.png")
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
