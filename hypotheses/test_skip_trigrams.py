"""Hypothesis (seed 002): a one-layer attention-only model with frozen one-hot embed and unembed and
heads of d_head 1 solves the skip-trigram task up to the Bayes optimum by spreading the ten pair
classes across its heads (attention-head superposition).

* The task's Bayes optimum is accuracy 1/2 + 1/2 * 1/11 = 0.5455 and cross-entropy 1/2 ln 11 = 1.199
  nats (signal sequences perfectly, noise at chance); the seed stopped at accuracy 0.304. The seed's
  3-head model gets within 0.015 of the optimal accuracy and 0.05 nats of the optimal loss, and
  classifies >= 99% of signal sequences.
* On signal sequences [a, noise, b, 0] every head attends from the last position to positions 0 and
  2 (a and b: with no positional embedding it is the tokens 1..4 it looks for), on average >= 0.85,
  and far more than it attends to those positions on noise sequences.
* Per-head direct logit contributions (the seed's get_head_to_logits: with a one-hot unembed, head
  h's output *is* its logit vector) spread the pair classes across the heads: every head gives >= 5
  logits of correct-class margin to at least 3 of the 10 pair classes, and most classes get their
  margin from two or more heads. Every head is needed: mean-ablating any one of them drops signal
  accuracy by >= 0.3, and breaks (>= 0.5 accuracy lost) at least 2 pair classes -- a different
  subset for each head.
* On noise sequences the output distribution is close to uniform (KL to uniform <= 0.05 nats).
* Head sweep (1..6 heads of d_head 1): two or more heads reach the optimum on signal sequences
  (>= 0.99); one head does not (a strict expected failure: 0.38 on the reference, 4 of the 10 classes;
  0.57 for seed 1), though it learns far more than chance (0.125).

Bindings: none are searched. The heads are named by index and every per-head claim is its own test
(test_l0hH_...), so each head's mutations break exactly the claim about it; "min over heads" claims,
whose zero_ablate:L0H0 control failed by construction, are gone. The output claims (needed, serves)
are about ``ov:L0HH`` (zero / mean ablation of that head); the attention claims are the same for every
head (a head swap leaves them true by design), so their targeted mutation is the head's uniform
attention, given as a hand-written control, with ``about("model")`` for the untrained model. The
sequences are one draw of the module's stream (``--circuits-draws-seed`` changes them).

Mutations tried by hand on the 3-head reference (signal accuracy 1.000 on 10k signal sequences):
zero-ablating L0H0 / L0H1 / L0H2 gives 0.305 / 0.248 / 0.312, mean-ablating 0.437 / 0.375 / 0.376,
uniform attention 0.689 / 0.437 / 0.502, swapping a head with the next 1.000 (same function). In the
claims: under zero / mean ablation of L0HH "L0HH is needed" reads a drop of 0.0 and 0 broken classes
(main 0.56-0.63, 6 classes), "L0HH serves >= 3 classes" reads 0 (main 8 / 7 / 6); before the
margins were centred, mean-ablated L0H0 still "served" 3 classes (NO POWER, fixed). Uniform attention
of L0HH: its attention to a, b 0.50 and signal-minus-noise gap 0.0 (main 1.00 / 0.93 / 1.00 and
0.64 / 0.57 / 0.60). A head swap leaves every per-head claim true (the heads share one attention
rule and each serves 6-8 classes), which is why swap is no targeted mutation of these claims.

Models: `skip_trigrams` is the seed's 3-head model; `skip_trigrams_h{1,2,4,5,6}` complete the sweep.
Class c is logit c (the seed's CrossEntropyLoss on the 11 token logits); logit 10 is used only by
noise labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from circuits.analysis import measures as A
from circuits.analysis.interventions import mean_ablate_head
from circuits.claims.controls import register_control
from circuits.claims.draws import Draws
from circuits.claims.stats import mean_difference
from circuits.model.transformer import HookedTransformer
from circuits.tasks import skip_trigrams as S

N_EVAL = 20_000
SIGNAL_OPTIMUM = 1.0  # Bayes-optimal accuracy on signal sequences
SWEEP_BOUND = 0.99  # "reaches the optimum": signal accuracy >= 99% of SIGNAL_OPTIMUM
# Per-head claims are the same claim for every head (the hypothesis: EVERY head is needed and serves >= 3
# classes), so each also holds when its index names another head (specificity alternatives swap_with): known
# to be unspecific by the hypothesis's own symmetry, with what the other heads measured (draws-seed 0).
_EVERY_HEAD = ("the hypothesis says every head is needed, so the claim holds for the other heads too (by design, "
               "not evidence about this head in particular): ")
KNOWN_FAILURES = {
    "test_l0h0_is_needed unspecific": _EVERY_HEAD + "signal-accuracy drop 0.625 / 0.628 and 6 / 6 broken classes "
                                                    "with L0H1 / L0H2 in its place",
    "test_l0h1_is_needed unspecific": _EVERY_HEAD + "drop 0.557 / 0.628, 6 / 6 broken classes with L0H0 / L0H2",
    "test_l0h2_is_needed unspecific": _EVERY_HEAD + "drop 0.557 / 0.625, 6 / 6 broken classes with L0H0 / L0H1",
    "test_l0h0_serves_pair_classes unspecific": _EVERY_HEAD + "L0H1 / L0H2 serve 7 / 6 classes",
    "test_l0h1_serves_pair_classes unspecific": _EVERY_HEAD + "L0H0 / L0H2 serve 8 / 6 classes",
    "test_l0h2_serves_pair_classes unspecific": _EVERY_HEAD + "L0H0 / L0H1 serve 8 / 7 classes",
    "test_head_sweep_signal_accuracy[1]":
        "the hypothesis: one head of d_head 1 reaches >= 99% signal accuracy; under this recipe it stops in a local "
        "optimum (4 of 10 pair classes on the reference, 0.57 for seed 1, 0.33-0.50 across other inits), far "
        "below the bound for every draw",
}


@dataclass
class PositionSet:
    """Key positions whose combined attention is measured (a and b on the main run)."""

    positions: tuple


@dataclass
class RowSelection:
    """Which rows count as 'noise' for the near-uniform claim."""

    noise: torch.Tensor  # [n] bool


register_control("other_positions", kind="data", accepts=lambda o: isinstance(o, PositionSet),
                 fn=lambda p, seed=0: PositionSet((1, 3)),
                 description="measure attention to positions 1 and 3 (noise token, itself) instead of 0 and 2")
register_control("signal_rows", kind="data", accepts=lambda o: isinstance(o, RowSelection),
                 fn=lambda r, seed=0: RowSelection(~r.noise),
                 description="run the noise claim on signal sequences instead")


_DATA: dict = {}


def data(draws: Draws) -> S.SkipTrigramData:
    """N_EVAL fresh sequences drawn from the module's draws (memoised per draws seed)."""
    if draws.seed not in _DATA:
        _DATA[draws.seed] = S.generate(N_EVAL, draws.child("fresh").int())
    return _DATA[draws.seed]


def logits_of(model: HookedTransformer, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).double()


def signal_accuracy(model: HookedTransformer, d: S.SkipTrigramData) -> float:
    sig = d.subset(d.signal)
    return float((logits_of(model, sig.toks).argmax(-1) == sig.labels).double().mean())


def class_accuracies(model: HookedTransformer, sig: S.SkipTrigramData) -> torch.Tensor:
    """Accuracy per pair class on signal sequences: [10]."""
    pred = logits_of(model, sig.toks).argmax(-1)
    return torch.stack([(pred[sig.labels == c] == c).double().mean() for c in range(S.N_PAIR_CLASSES)])


def class_weights(sig: S.SkipTrigramData) -> torch.Tensor:
    return torch.bincount(sig.labels, minlength=S.N_PAIR_CLASSES)[: S.N_PAIR_CLASSES].double() / len(sig)


def head_logits(model: HookedTransformer, toks: torch.Tensor) -> torch.Tensor:
    """The seed's get_head_to_logits without b_O: each head's output at the last position, which the
    one-hot unembed reads off as logits: [batch, head, 11]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names=["blocks.0.attn.hook_z"])
    return cache.head_results(0)[:, -1].double()


def pair_margins(model: HookedTransformer, d: S.SkipTrigramData) -> torch.Tensor:
    """[head, pair class]: mean over signal sequences of that class of the head's contribution to the
    correct logit minus its mean contribution to the other nine pair-class logits, with the head's
    mean output over all signal sequences removed first: a constant output (a bias, or the head
    mean-ablated: 3 classes "served" by L0H0's mean) favours some logits whatever the input, which
    is no contribution to telling the classes apart."""
    sig = d.subset(d.signal)
    out = head_logits(model, sig.toks)[..., : S.N_PAIR_CLASSES]  # [batch, head, 10]
    out = out - out.mean(0, keepdim=True)
    margins = torch.zeros(model.cfg.n_heads, S.N_PAIR_CLASSES, dtype=torch.float64)
    for c in range(S.N_PAIR_CLASSES):
        rows = out[sig.labels == c]  # [n_c, head, 10]
        own = rows[..., c]
        others = (rows.sum(-1) - own) / (S.N_PAIR_CLASSES - 1)
        margins[:, c] = (own - others).mean(0)
    return margins


# --- the seed's 3-head model ---------------------------------------------------------------------------------


@pytest.fixture
def d(circuits_options) -> S.SkipTrigramData:
    """The module's fresh sequences: one draw per --circuits-draws-seed, shared by the module's tests."""
    return data(circuits_options.shared_draws("hypotheses/test_skip_trigrams.py"))


@pytest.mark.about("model")
def test_reaches_the_bayes_optimum(skip_trigrams_model, d, claim):
    logits = logits_of(skip_trigrams_model, d.toks)
    correct = (logits.argmax(-1) == d.labels).double().numpy()
    loss = A.cross_entropy_per_example(logits, d.labels).numpy()
    sig = d.signal.numpy()
    # stratified at the task's prior P(signal) = 1/2, so the sample's signal fraction does not move them
    accuracy = S.P_SIGNAL * correct[sig].mean() + (1 - S.P_SIGNAL) * correct[~sig].mean()
    entropy = S.P_SIGNAL * loss[sig].mean() + (1 - S.P_SIGNAL) * loss[~sig].mean()
    claim.at_least("signal accuracy", claim.sample(correct[sig], np.mean, method="percentile", n_resamples=1000),
                   SWEEP_BOUND * SIGNAL_OPTIMUM)
    claim.close_to("accuracy (Bayes optimum 0.5455)", accuracy, S.BAYES_ACCURACY, atol=0.015,
                   note=f"signal {correct[sig].mean():.4f}, noise {correct[~sig].mean():.4f} (chance 1/11 = 0.0909), "
                        "weighted 1/2 each; the seed stopped at 0.304")
    claim.close_to("cross-entropy, nats (Bayes optimum 1.199)", entropy, S.BAYES_LOSS, atol=0.05,
                   note=f"signal {loss[sig].mean():.4f}, noise {loss[~sig].mean():.4f} (ln 11 = 2.398), weighted 1/2 each")


# Per-head claims: one test per head, each with the mutations of THAT head (a "min over heads" claim
# with a zero_ablate:L0H0 control failed by construction, whatever L0H1 and L0H2 did).


def _attention_test(h: int):
    @pytest.mark.about("model")
    @pytest.mark.controls(f"uniform_attention:L0H{h}", "other_positions")
    def test(skip_trigrams_model, d, claim, control, figures):
        """Attention is the same kind of claim for every head (a swap of two heads leaves it true by
        design), so its targeted mutation is the head's uniform attention, as a control."""
        with torch.no_grad():
            _, cache = skip_trigrams_model.run_with_cache(d.toks, names=["blocks.0.attn.hook_pattern"])
        pattern = cache["blocks.0.attn.hook_pattern"][:, :, -1]  # [batch, head, key] from the last position
        keys = list(control.apply_data(PositionSet((0, 2))).positions)
        combined = pattern[:, h, keys].sum(-1).double()  # [batch]
        sig = d.signal
        on_signal = claim.sample(combined[sig].numpy(), np.mean, method="percentile", n_resamples=1000)
        claim.at_least(f"L0H{h}: mean attention(last -> a, b positions) on signal", on_signal, 0.85,
                       note=f"key positions {keys}; noise {float(combined[~sig].mean()):.3f}")
        excess = claim.sample((combined[sig].numpy(), combined[~sig].numpy()), mean_difference, method="percentile",
                              n_resamples=1000)
        claim.at_least(f"L0H{h}: signal minus noise mean attention(last -> a, b positions)", excess, 0.3)
        if control.is_main and h == 0:  # figures of the main run only
            figures.add("attention from the last position", lambda: _attention_bars(pattern, d),
                        caption="mean attention from the last position, signal vs noise sequences, per head")

    return test


def _needed_test(h: int):
    @pytest.mark.about(f"ov:L0H{h}")
    def test(skip_trigrams_model, d, claim):
        sig = d.subset(d.signal)
        w = class_weights(sig)
        clean = class_accuracies(skip_trigrams_model, sig)
        ablated = class_accuracies(mean_ablate_head(skip_trigrams_model, 0, h, sig.toks), sig)
        drop = float(clean @ w - ablated @ w)
        claim.at_least(f"signal-accuracy drop when mean-ablating L0H{h}", drop, 0.3,
                       note=f"clean {float(clean @ w):.4f}, ablated {float(ablated @ w):.4f}")
        broken = [c for c in range(S.N_PAIR_CLASSES) if float(clean[c] - ablated[c]) >= 0.5]
        claim.at_least(f"pair classes losing >= 0.5 accuracy when L0H{h} is mean-ablated", len(broken), 2,
                       note=f"L0H{h} breaks {broken}")

    return test


def _spread_test(h: int):
    @pytest.mark.about(f"ov:L0H{h}")
    def test(skip_trigrams_model, d, claim, control, figures):
        margins = pair_margins(skip_trigrams_model, d)  # [head, class]
        served = [c for c in range(S.N_PAIR_CLASSES) if float(margins[h, c]) >= 5.0]
        positive = margins.clamp(min=0)
        top_share = positive.max(0).values / positive.sum(0).clamp(min=1e-12)
        claim.at_least(f"L0H{h}: pair classes given >= 5 logits of correct-class margin", len(served), 3,
                       note=f"L0H{h} serves {served}; median over classes of the top head's share of the margin "
                            f"{float(top_share.median()):.2f}")
        if control.is_main and h == 0:  # figures of the main run only
            figures.add("per-head direct logit contributions", lambda: _margin_map(margins),
                        caption="get_head_to_logits: each head's mean contribution to the correct pair logit minus "
                                "the other pair logits, per pair class (signal sequences)")

    return test


test_l0h0_attends_to_positions_0_and_2 = _attention_test(0)
test_l0h1_attends_to_positions_0_and_2 = _attention_test(1)
test_l0h2_attends_to_positions_0_and_2 = _attention_test(2)
test_l0h0_is_needed = _needed_test(0)
test_l0h1_is_needed = _needed_test(1)
test_l0h2_is_needed = _needed_test(2)
test_l0h0_serves_pair_classes = _spread_test(0)
test_l0h1_serves_pair_classes = _spread_test(1)
test_l0h2_serves_pair_classes = _spread_test(2)


@pytest.mark.about("model")
@pytest.mark.controls("signal_rows", "mean_ablate:L0H0")
def test_noise_sequences_get_a_near_uniform_output(skip_trigrams_model, d, claim, control):
    """Near-uniform output on noise is what a broken model gives too (with L0H0 mean-ablated, signal
    accuracy ~0.44, KL on noise 0.035 <= 0.05 held: the old claim had no teeth). The hypothesis is the
    Bayes split: uniform on noise AND certain on signal, KL to uniform 0 and ln 11. The claim is that
    split, KL(signal) - KL(noise) >= ln 11 - 0.1: the 0.05 nats the optimum claim allows its
    cross-entropy, on each of the two halves."""
    rows = control.apply_data(RowSelection(~d.signal)).noise
    model = skip_trigrams_model

    def kl_to_uniform(sel):
        logp = logits_of(model, d.toks[sel]).log_softmax(-1)
        return (logp.exp() * (logp + math.log(S.N_CLASSES))).sum(-1), logp  # KL(p || uniform) per sequence

    kl_noise, logp = kl_to_uniform(rows)
    kl_signal, _ = kl_to_uniform(~rows)
    claim.at_least("KL(output || uniform) on signal minus on noise, nats (Bayes: ln 11 = 2.398)",
                   claim.sample((kl_signal.numpy(), kl_noise.numpy()), mean_difference, method="percentile",
                                n_resamples=1000), math.log(S.N_CLASSES) - 0.1,
                   note=f"KL on noise {float(kl_noise.mean()):.4f} nats (the hypothesis: <= 0.05), on signal "
                        f"{float(kl_signal.mean()):.4f}; mean max probability on noise "
                        f"{float(logp.exp().max(-1).values.mean()):.3f} (uniform 1/11 = 0.091)")


# --- the head sweep ----------------------------------------------------------------------------------------


@pytest.mark.about("model")
@pytest.mark.parametrize("n_heads", S.HEAD_COUNTS)
def test_head_sweep_signal_accuracy(n_heads, zoo_models, zoo_seed, request, control, claim, d):
    model = control.apply_model(zoo_models.get(request, S.entry_name(n_heads), zoo_seed).model)
    acc = signal_accuracy(model, d)
    claim.at_least(f"signal accuracy, {n_heads} head(s) (optimum {SIGNAL_OPTIMUM:.0%})", acc,
                   SWEEP_BOUND * SIGNAL_OPTIMUM, note=f"short of the optimum by {SIGNAL_OPTIMUM - acc:.4f}")


@pytest.mark.about("model")
def test_a_single_head_learns_part_of_the_task(skip_trigrams_h1_model, d, claim):
    acc = signal_accuracy(skip_trigrams_h1_model, d)
    # chance on signal sequences: the most frequent pair classes (a != b) have probability 1/8
    claim.at_least("signal accuracy, 1 head", acc, 0.3, note="chance (most frequent class) is 0.125")


@pytest.mark.about("model")
def test_head_sweep_figure(zoo_models, zoo_seed, request, control, claim, figures, d):
    rows = []
    for n in S.HEAD_COUNTS:
        model = control.apply_model(zoo_models.get(request, S.entry_name(n), zoo_seed).model)
        logits = logits_of(model, d.toks)
        correct = (logits.argmax(-1) == d.labels).double()
        loss = A.cross_entropy_per_example(logits, d.labels)
        rows.append((n, signal_accuracy(model, d), _stratified(correct, d.signal), _stratified(loss, d.signal)))
    reaching = [n for n, sig, _, _ in rows if sig >= SWEEP_BOUND * SIGNAL_OPTIMUM]
    fewest = min(reaching) if reaching else max(S.HEAD_COUNTS) + 1
    claim.at_most("fewest heads reaching 99% signal accuracy", fewest, 2,
                  note="; ".join(f"{n} heads: signal {s:.4f}, acc {a:.4f}, CE {l:.4f}" for n, s, a, l in rows))
    if control.is_main:  # figures of the main run only
        figures.add("head sweep", lambda: _sweep_plot(rows),
                    caption="1-layer attention-only models with 1..6 heads of d_head 1: accuracy and loss vs the Bayes optimum")


# --- helpers -----------------------------------------------------------------------------------------------


def _stratified(values: torch.Tensor, signal: torch.Tensor) -> float:
    """Mean at the task's prior P(signal) = 1/2, whatever the sample's signal fraction."""
    return float(S.P_SIGNAL * values[signal].mean() + (1 - S.P_SIGNAL) * values[~signal].mean())


def _attention_bars(pattern: torch.Tensor, d: S.SkipTrigramData):
    n_heads = pattern.shape[1]
    fig, axes = plt.subplots(1, n_heads, figsize=(3.2 * n_heads, 2.8), sharey=True)
    axes = np.atleast_1d(axes)
    x = np.arange(S.SEQ_LEN)
    for h, ax in enumerate(axes):
        ax.bar(x - 0.2, pattern[d.signal, h].mean(0).numpy(), 0.4, label="signal [a, n, b, 0]")
        ax.bar(x + 0.2, pattern[~d.signal, h].mean(0).numpy(), 0.4, label="noise")
        ax.set_xticks(x, ["0", "1", "2", "3"])
        ax.set_xlabel("key position")
        ax.set_title(f"L0H{h}")
    axes[0].set_ylabel("attention from position 3")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _margin_map(margins: torch.Tensor):
    fig, ax = plt.subplots(figsize=(7, 0.6 * margins.shape[0] + 1.6))
    lim = float(margins.abs().max())
    im = ax.imshow(margins.numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    pairs = sorted(S.ANS_MAP, key=S.ANS_MAP.get)
    ax.set_xticks(range(S.N_PAIR_CLASSES), [f"{a}{b}" for a, b in pairs])
    ax.set_yticks(range(margins.shape[0]), [f"L0H{h}" for h in range(margins.shape[0])])
    ax.set_xlabel("pair class {a, b}")
    fig.colorbar(im, ax=ax, label="correct-logit margin")
    fig.tight_layout()
    return fig


def _sweep_plot(rows):
    n = [r[0] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(n, [r[1] for r in rows], "o-", label="signal accuracy")
    ax1.plot(n, [r[2] for r in rows], "s-", label="accuracy")
    ax1.axhline(SIGNAL_OPTIMUM, color="tab:blue", ls=":", lw=1)
    ax1.axhline(S.BAYES_ACCURACY, color="tab:orange", ls=":", lw=1, label="Bayes optimum")
    ax1.set_xlabel("heads (d_head 1)")
    ax1.set_ylim(0, 1.05)
    ax1.legend(fontsize=7)
    ax2.plot(n, [r[3] for r in rows], "o-", color="tab:red", label="cross-entropy")
    ax2.axhline(S.BAYES_LOSS, color="grey", ls=":", lw=1, label="Bayes optimum 1.199")
    ax2.set_xlabel("heads (d_head 1)")
    ax2.set_ylabel("nats")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig
