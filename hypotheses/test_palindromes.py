"""Hypothesis (seed 001): the palindrome classifier (3 layers x 2 heads, no LayerNorm) decides at [CLS]
through its last MLP, and some early head compares each letter with its mirror partner.

* It classifies fresh strings from the seed's distribution with accuracy >= 0.99 (the seed reached
  0.879; a later version of its code 0.963).
* The seed's "palindrome direction": with no LayerNorm, the logit difference (palindrome minus not)
  at position 0 is exactly the sum of the residual components' projections on W_U[:, 1] - W_U[:, 0].
  One component carries the class separation: on the reference checkpoint L2.mlp (about 98% of the
  difference of class means, AUROC 0.9995); the last-layer heads add a few percent, layers 0-1 ~0.
  The carriers are found by search (fewest components covering >= 80% of the separation), pinned on
  the reference checkpoint, and named in the report with every component's share, AUROC and Cohen's d.
* Mirror attention: a layer-0 head (L0H0 on the reference) attends from letter positions to their
  mirror partners more than to other letters (mirror score vs the same score with the mirror map
  replaced by random derangements of the letter positions). The preference is real but weak and
  diffuse (about 0.11 vs 0.08 attention; the mirror is the most-attended other letter from 8 of the
  10 positions; not from the outermost pair). It is not universal: a model retrained with seed 1
  (same recipe, also 0.998 accurate) has no such head, and this test fails there (1 of 10 positions).
* Behaviour: among non-palindromes the logit difference falls as the palindrome distance (mismatched
  mirror pairs) grows: negative rank correlation (with a bootstrap CI) and strictly falling means.
* Causally, at position 0: mean-ablating the carriers' direct path (their contribution to the final
  residual replaced by its mean) destroys accuracy; mean-ablating every other component's direct path
  at once does not. (The carrier itself reads the last-layer heads: mean-ablating L2H1's output at
  position 0 *including* what L2.mlp reads from it also destroys accuracy, 0.50 on the reference; the
  "ablations at CLS" figure shows direct-path and total effects of every component side by side.)

Thresholds are the issue's (accuracy >= 0.99) or set with a stated margin below what the reference
checkpoint shows, and above what every negative control reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from circuits import analysis as A
from circuits.controls import register_control
from circuits.figures import overlaid_histograms
from circuits.model import HookedTransformer
from circuits.stats import auroc, cohens_d
from circuits.tasks import palindromes as P

N_ACCURACY = 20_000  # fresh strings for the accuracy claim
N_ANALYSIS = 4_000  # fresh strings for the mechanism claims
FRESH_SEED = 20_240_001  # not a training or held-out seed (train.data_seeds gives 1_000_003 * (s+1), ...)
REFERENCE_ROLES = {"carriers": ("L2.mlp",), "mirror_head": (0, 0)}  # pinned on the reference checkpoint
CARRIER_SHARE = 0.8  # carriers = fewest components whose summed share of the class separation reaches this


# --- data the claims are computed on (dataclasses so that data controls can transform them) --------------


@dataclass
class Contributions:
    """Per-component projections on the logit-difference direction at position 0."""

    values: torch.Tensor  # [component, batch]
    names: list
    labels: torch.Tensor  # [batch] 1 = palindrome


@dataclass
class MirrorMap:
    """Key position each letter position (1..10) is scored against: its mirror on the main run."""

    partner: torch.Tensor  # [10] token positions


@dataclass
class DistancePairs:
    values: torch.Tensor  # logit difference per non-palindrome
    labels: torch.Tensor  # its palindrome distance (shuffled by the shuffle_labels control)


@dataclass
class Binding:
    carriers: tuple
    others: tuple


def _shuffle_mirror(m: MirrorMap, seed: int = 0) -> MirrorMap:
    """The shuffled-position control: score each letter position against a random other letter
    position that is neither itself nor its mirror."""
    g = torch.Generator().manual_seed(seed)
    q = torch.arange(1, P.SEQ_LEN + 1)
    while True:
        perm = q[torch.randperm(P.SEQ_LEN, generator=g)]
        if bool(((perm != q) & (perm != P.SEQ_LEN + 1 - q)).all()):
            return MirrorMap(perm)


def _swap_carriers(b: Binding, seed: int = 0) -> Binding:
    return Binding(carriers=b.others, others=b.carriers)


register_control("shuffle_mirror_positions", kind="data", fn=_shuffle_mirror, replace=True,
                 accepts=lambda o: isinstance(o, MirrorMap),
                 description="score attention against a random derangement of letter positions instead of the mirror")
register_control("swap_carriers", kind="data", fn=_swap_carriers, replace=True,
                 accepts=lambda o: isinstance(o, Binding),
                 description="exchange the components named as carriers with all the others")


# --- analysis, computed once per model ------------------------------------------------------------------


@dataclass
class Analysis:
    data: P.PalindromeData
    cache: object
    contributions: torch.Tensor  # [component, batch] float64 along logit[1] - logit[0]
    names: list
    logit_diff: torch.Tensor  # [batch] logit[palindrome] - logit[not]


_MEMO = A.ModelMemo()


def fresh_data(n: int = N_ANALYSIS) -> P.PalindromeData:
    return P.generate(n, FRESH_SEED)


def analyse(model: HookedTransformer) -> Analysis:
    return _MEMO.get(model, "analysis", lambda: _analyse(model))


def _analyse(model: HookedTransformer) -> Analysis:
    data = fresh_data()
    names = A.decomposition_names(model) + [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    cache = A.run_in_batches(model, data.toks, names=names)
    values, labels = A.component_contributions(cache, A.logit_direction(model, 1, 0), pos=0)
    logits = A.predict(model, data.toks).double()
    return Analysis(data, cache, values, labels, logits[:, 1] - logits[:, 0])


def separations(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of class means (palindrome minus not) per component: [component]."""
    pal = labels.bool()
    return values[:, pal].mean(1) - values[:, ~pal].mean(1)


def find_carriers(an: Analysis) -> tuple:
    """Fewest components (largest share first) whose shares of the class separation sum to >= 0.8."""
    sep = separations(an.contributions, an.data.labels)
    share = sep / sep.sum()
    chosen, total = [], 0.0
    for i in torch.argsort(share, descending=True).tolist():
        chosen.append(an.names[i])
        total += float(share[i])
        if total >= CARRIER_SHARE:
            break
    return tuple(chosen)


def mirror_scores(pattern: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean attention from each letter position q to partner[q]: [batch].
    pattern: [batch, query, key] of one head."""
    q = torch.arange(1, P.SEQ_LEN + 1)
    return pattern[:, q, partner].mean(-1)


def shuffled_scores(pattern: torch.Tensor, n: int = 20, seed: int = 1) -> torch.Tensor:
    """Mirror score with the mirror replaced by random derangements (mean of n): the baseline."""
    return torch.stack([mirror_scores(pattern, _shuffle_mirror(MirrorMap(None), seed=seed + i).partner)
                        for i in range(n)]).mean(0)


def find_mirror_head(an: Analysis, model: HookedTransformer) -> tuple[int, int]:
    mirror = MirrorMap(P.SEQ_LEN + 1 - torch.arange(1, P.SEQ_LEN + 1))
    best, best_gain = None, -np.inf
    for l in range(model.cfg.n_layers):
        pat = an.cache[f"blocks.{l}.attn.hook_pattern"]
        for h in range(model.cfg.n_heads):
            gain = float(mirror_scores(pat[:, h], mirror.partner).mean() - shuffled_scores(pat[:, h]).mean())
            if gain > best_gain:
                best, best_gain = (l, h), gain
    return best


def component_hook(label: str) -> tuple[str, int | None]:
    if label.endswith(".mlp"):
        return f"blocks.{int(label[1:label.index('.')])}.hook_mlp_out", None
    layer, head = A.parse_label(label)
    return f"blocks.{layer}.attn.hook_z", head


def total_ablation_accuracy(model: HookedTransformer, data: P.PalindromeData, components, pos: int = 0) -> float:
    """Accuracy with each component's output at `pos` replaced by its mean over `data` (what later
    layers and the unembed see). Constant components (embed at [CLS], biases) are unaffected."""
    comps = [c for c in components if c.endswith(".mlp") or c.startswith("L") and "H" in c]
    names = sorted({component_hook(c)[0] for c in comps})
    hooks = []
    if names:
        with torch.no_grad():
            _, cache = model.run_with_cache(data.toks, names=names)
        for c in comps:
            name, head = component_hook(c)
            idx = (slice(None), pos) if head is None else (slice(None), pos, head)
            mean = cache[name][idx].mean(0)

            def fn(act, hook, idx=idx, mean=mean):
                act = act.clone()
                act[idx] = mean
                return act

            hooks.append((name, fn))
    with torch.no_grad():
        logits = model.run_with_hooks(data.toks, fwd_hooks=hooks)
    return float((logits.argmax(-1) == data.labels).double().mean())


def direct_ablation_accuracy(an: Analysis, components) -> float:
    """Accuracy when the components' direct contributions to the position-0 logit difference are
    replaced by their means (no LayerNorm: the logit difference is exactly their sum plus the rest)."""
    idx = [an.names.index(c) for c in components]
    v = an.contributions[idx]
    ld = an.logit_diff - (v - v.mean(1, keepdim=True)).sum(0)
    return float(((ld > 0).long() == an.data.labels).double().mean())


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def base_model(zoo_models, zoo_seed, request):
    """The uncontrolled model: role bindings are searched on it so a control cannot move them."""
    return zoo_models.get(request, "palindromes", zoo_seed).model


@pytest.fixture
def roles(base_model):
    an = analyse(base_model)
    return {"carriers": find_carriers(an), "mirror_head": find_mirror_head(an, base_model)}


@pytest.fixture
def head_roles(roles):
    return {"mirror_head": roles["mirror_head"]}


def _varying(an: Analysis) -> list:
    """Components whose contribution at [CLS] varies across strings (embed, pos_embed and biases are constant there)."""
    return [n for n, v in zip(an.names, an.contributions) if float(v.std()) > 1e-6 * float(an.logit_diff.std())]


def _binding(an: Analysis, roles: dict) -> Binding:
    carriers = tuple(roles["carriers"])
    return Binding(carriers, tuple(c for c in _varying(an) if c not in carriers))


def _share(values, total, labels, axis=-1):
    """Share of the class separation of `total` carried by `values` (vectorised for the bootstrap)."""
    pal = labels > 0.5
    n_pal = pal.sum(axis)
    n_not = (~pal).sum(axis)

    def sep(x):
        return (x * pal).sum(axis) / n_pal - (x * ~pal).sum(axis) / n_not

    return sep(values) / sep(total)


# --- the claims -------------------------------------------------------------------------------------------


@pytest.mark.controls("untrained")
def test_accuracy_on_fresh_strings(palindromes_model, claim):
    data = fresh_data(N_ACCURACY)
    logits = A.predict(palindromes_model, data.toks)
    correct = (logits.argmax(-1) == data.labels).double().numpy()
    hard = (data.distance == 1).numpy()
    estimate = claim.sample(correct, np.mean, method="percentile", n_resamples=1000)
    claim.at_least("accuracy(fresh 20k)", estimate, 0.99,
                   note=f"palindromes {correct[data.labels.numpy() == 1].mean():.4f}, "
                        f"distance-1 non-palindromes {correct[hard].mean():.4f} (n={int(hard.sum())})")


@pytest.mark.controls("untrained", "swap_carriers")
def test_palindrome_direction_is_carried_by_named_components(palindromes_model, roles, claim, control, figures):
    an = analyse(palindromes_model)
    contrib = Contributions(an.contributions, an.names, an.data.labels)
    binding = control.apply_data(_binding(an, roles))
    idx = [contrib.names.index(c) for c in binding.carriers]
    carried = contrib.values[idx].sum(0)
    total = contrib.values.sum(0)
    pal = contrib.labels.bool().numpy()
    sep = separations(contrib.values, contrib.labels)
    table = ", ".join(
        f"{n}: share {float(s / sep.sum()):+.3f} AUROC {auroc(v[pal], v[~pal]):.3f} d {cohens_d(v[pal], v[~pal]):+.2f}"
        for n, s, v in zip(contrib.names, sep, contrib.values.numpy()) if n in _varying(an))
    share = claim.sample((carried.numpy(), total.numpy(), contrib.labels.double().numpy()), _share, paired=True,
                         method="percentile", n_resamples=500)
    named = "+".join(binding.carriers)
    claim.at_least("share of the class separation carried by the carriers", share, 0.8,
                   note=f"carriers {named}; every component: {table}")
    c = carried.numpy()
    claim.at_least("AUROC(carriers' contribution, palindrome)", auroc(c[pal], c[~pal]), 0.99,
                   note=f"carriers {named}: Cohen's d {cohens_d(c[pal], c[~pal]):.2f}")
    if control.is_main:  # figures of the main run only
        figures.add("component histograms", lambda: _component_histograms(contrib, an),
                    caption="contribution of each component at [CLS] along W_U[:,1] - W_U[:,0], by class "
                            f"(carriers: {named})")


@pytest.mark.controls("untrained", "shuffle_mirror_positions")
def test_a_head_attends_to_mirror_positions(palindromes_model, roles, claim, control, figures):
    an = analyse(palindromes_model)
    layer, head = roles["mirror_head"]
    label = A.head_label(layer, head)
    pattern = an.cache[f"blocks.{layer}.attn.hook_pattern"][:, head]  # [batch, query, key]
    partner = control.apply_data(MirrorMap(P.SEQ_LEN + 1 - torch.arange(1, P.SEQ_LEN + 1))).partner
    score = mirror_scores(pattern, partner)
    baseline = shuffled_scores(pattern)
    gain = claim.sample((score - baseline).numpy(), np.mean, method="percentile", n_resamples=1000)
    claim.at_least("mirror_head.mirror_score - shuffled_position_score", gain, 0.015,
                   note=f"mirror head {label}: mirror score {float(score.mean()):.4f}, shuffled-position score {float(baseline.mean()):.4f}, "
                        f"uniform 1/12 = {1 / 12:.4f}")
    mean = pattern.mean(0).clone()  # [query, key]
    q = torch.arange(1, P.SEQ_LEN + 1)
    mean[q, q] = -1.0  # exclude attention to itself
    hits = int((mean[q].argmax(-1) == partner).sum())
    claim.at_least("mirror_head: letter positions whose most-attended other position is the partner (of 10)", hits, 6,
                   note=f"mirror head {label}")
    if control.is_main:  # figures of the main run only
        figures.add("mirror head attention", lambda: _attention_map(pattern.mean(0), label),
                    caption=f"{label}: mean attention pattern over {len(pattern)} fresh strings; boxes mark mirror pairs")


@pytest.mark.controls("untrained", "shuffle_labels")
def test_logit_difference_falls_with_palindrome_distance(palindromes_model, claim, control, figures):
    an = analyse(palindromes_model)
    non = an.data.labels == 0
    pairs = control.apply_data(DistancePairs(an.logit_diff[non], an.data.distance[non]))
    rho = claim.sample((pairs.values.numpy(), pairs.labels.double().numpy()), _spearman, paired=True,
                       method="percentile", n_resamples=500)
    claim.at_most("spearman(logit diff, palindrome distance | non-palindromes)", rho, -0.1)
    means = [float(pairs.values[pairs.labels == k].mean()) for k in range(1, P.K + 1)]
    claim.holds("mean logit diff strictly falls over distance 1..5", all(a > b for a, b in zip(means, means[1:])),
                detail="means " + ", ".join(f"{m:.1f}" for m in means))
    if control.is_main:  # figures of the main run only
        figures.add("logit diff by distance", lambda: _distance_boxes(an), caption="logit difference at [CLS] by palindrome distance")


@pytest.mark.controls("swap_carriers")
def test_ablating_the_carriers_direct_path_destroys_accuracy(palindromes_model, roles, claim, control, figures):
    an = analyse(palindromes_model)
    binding = control.apply_data(_binding(an, roles))
    clean = direct_ablation_accuracy(an, [])
    total = total_ablation_accuracy(palindromes_model, an.data, roles["carriers"])
    claim.at_most("accuracy, carriers' direct path mean-ablated", direct_ablation_accuracy(an, binding.carriers), 0.6,
                  note=f"carriers {'+'.join(binding.carriers)}; clean {clean:.4f}; total effect of mean-ablating "
                       f"{'+'.join(roles['carriers'])} at [CLS] (what later layers see too): {total:.4f}")
    claim.at_least("accuracy, every other component's direct path mean-ablated (jointly)",
                   direct_ablation_accuracy(an, binding.others), 0.99, note=f"others {'+'.join(binding.others)}")
    if control.is_main:  # figures of the main run only
        figures.add("ablations at CLS", lambda: _ablation_bars(palindromes_model, an, _varying(an)),
                    caption="accuracy after mean-ablating one component at [CLS]: direct path only vs total effect")


def test_reference_binding_is_pinned(roles, zoo_seed, claim):
    """On the reference checkpoint the search must find the pinned roles; on --seeds models it names them."""
    found = {"carriers": tuple(roles["carriers"]), "mirror_head": tuple(roles["mirror_head"])}
    detail = f"carriers {'+'.join(found['carriers'])}, mirror head {A.head_label(*found['mirror_head'])}"
    if zoo_seed is not None:  # nothing is pinned for other seeds: the binding is reported, not claimed
        pytest.skip(f"roles bound by search on seed {zoo_seed}: {detail}")
    claim.holds("search finds the pinned roles", found == REFERENCE_ROLES, detail=detail)


# --- helpers ------------------------------------------------------------------------------------------------


def _spearman(x, y, axis=-1):
    from circuits.stats import spearman

    return spearman(x, y, axis=axis)


def _component_histograms(contrib: Contributions, an: Analysis):
    keep = _varying(an)
    shown = [(n, v) for n, v in zip(contrib.names, contrib.values.numpy()) if n in keep]
    cols = 3
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.4 * rows))
    pal = contrib.labels.bool().numpy()
    for ax, (name, v) in zip(axes.flat, shown):
        lo, hi = np.percentile(v, [0.5, 99.5])
        bins = np.linspace(lo, hi + 1e-9, 50)
        overlaid_histograms(ax, {"palindrome": (np.clip(v[pal], lo, hi), "tab:blue"),
                                 "not": (np.clip(v[~pal], lo, hi), "tab:red")}, bins)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("component contributions at [CLS] along the palindrome direction (0.5-99.5% range)")
    fig.tight_layout()
    return fig


def _attention_map(mean_pattern: torch.Tensor, label: str):
    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(mean_pattern.numpy(), cmap="viridis")
    ticks = ["CLS"] + [str(i) for i in range(1, P.SEQ_LEN + 1)] + ["SEP"]
    ax.set_xticks(range(P.N_CTX), ticks, fontsize=7)
    ax.set_yticks(range(P.N_CTX), ticks, fontsize=7)
    for q in range(1, P.SEQ_LEN + 1):
        ax.add_patch(plt.Rectangle((P.SEQ_LEN + 1 - q - 0.5, q - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(f"{label} mean attention (red: mirror partner)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _distance_boxes(an: Analysis):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = [an.logit_diff[an.data.distance == k].numpy() for k in range(P.K + 1)]
    ax.boxplot(groups, positions=list(range(P.K + 1)), showfliers=False)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("palindrome distance (mismatched mirror pairs)")
    ax.set_ylabel("logit[pal] - logit[not]")
    fig.tight_layout()
    return fig


def _ablation_bars(model, an: Analysis, components):
    comps = [c for c in components if c not in ("embed", "pos_embed", "biases")]
    direct = [direct_ablation_accuracy(an, [c]) for c in comps]
    total = [total_ablation_accuracy(model, an.data, [c]) for c in comps]
    x = np.arange(len(comps))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(x - 0.2, direct, 0.4, label="direct path")
    ax.bar(x + 0.2, total, 0.4, label="total effect")
    ax.set_xticks(x, comps, fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
