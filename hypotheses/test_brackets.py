"""Hypothesis (seed 000): the balanced-bracket classifier decides "unbalanced" through two heads in
its last attention layer that read the two failure conditions.

* It classifies (almost) perfectly, and its final LayerNorm is close to linear at position 0, so the
  "unbalanced" logit direction can be pulled back through a linear fit of that LN and read off the
  residual stream as a sum of component contributions (embeddings, heads, MLPs, W_O biases).
* Along that direction a "count head" and a "negative head" carry most of the difference between
  unbalanced and balanced strings. On strings starting with "(", the count head flags total-
  elevation failures (#"(" != #")") and the negative head flags negative failures (a suffix with
  more "(" than ")", the seed's right-to-left scan); the count head's contribution grows with the
  distance of the open-proportion from 1/2; from position 0 it attends mostly to position 1; each
  head's output is used for the failures it flags: on the strings only its test fails, mean-ablating
  it costs more loss than mean-ablating the other head of its layer (or nothing).
* Causally: the count head's input at position 1 carries the count test, not the horizon test:
  resampled from strings agreeing on the count test it keeps >= 80% of the loss a random source
  loses, and more than sources agreeing on the horizon test; sources agreeing on the horizon test
  but not the count test do no better than random ones.

What each test is about (`@pytest.mark.about`) and so which mutations must break it: whole role heads
(`head:` zero / mean ablation and a swap with the other head of layer 2), their outputs (`ov:`), the
count head's attention (`qk:` uniform attention, swap) and the positional embeddings, L2's MLP on our
model, and the whole model for accuracy. Two tests are identities of the analysis that hold for any
weights (LN linearity: an untrained model's final LN is linear too, r^2 1.00; the decomposition
sums): they have no `about`, and their hand-written controls check the measurement instead.

Bindings. ARENA: pinned to the seed's heads 2.0 (count) and 2.1 (negative), no search. Ours:
`find_roles` searches on a SEARCH split (the first 5,000 distinct published strings outside the
evaluation set) among 6 heads (count) then 5 (negative), and every claim scores the binding on the
5,000 held-out evaluation strings; the separation claims decide on a Bonferroni-corrected bootstrap
interval (level 1 - 0.05/k). Notes on each claim record the binding, both split sizes and k. The
binding comes from the unmutated model (session memo), so a mutation run is scored under it.

Specificity (issue 30): every role claim is also run with its role pointed at the other head of layer 2
(the layer the hypothesis names: `about(..., alternatives="layer")`) and must fail there. Measured on the
ARENA checkpoint with every other head of the model as the alternative: 1.0 also attends from position 0
to position 1 (0.647, ratio 9.85) and also passes the count-not-horizon resampling contrast (0.36, -4.27):
1.0 is the write-up's second count head (scrubbing hypothesis 1a), outside the layer this hypothesis
names. The old "mean-ablating the count head's output costs loss" held for 5 of 6 heads (L0H0 1.02, L0H1
0.0097, L1H0 0.016, L2H0 0.0065, L2H1 0.064 nats): rewritten as the comparison on the strings each head
should flag. "Count-agreeing resampling keeps >= 80%" holds for the negative head too (0.999): a known
unspecific claim (its head-specific form is the count-not-horizon contrast).

Random draws (resampling sources, bootstrap seeds) come from `draws` / `--circuits-draws-seed`; resampling
pools 5 draws of sources and decides on a bootstrap interval over strings, so known failures do not
turn on one draw (the old single-draw "0.796 < 0.80" ranged 0.768-0.821 over 20 generator seeds).

Mutations tried by hand (values; "flips" = the claim turns red):
* ARENA, heads 2.0 and 2.1 swapped (all weights): count-agreeing resampling of the pinned head's
  input still recovers 0.999 (the old claim's defect, issue 15) -- but so do horizon-agreeing (0.999)
  and horizon-only (0.999) sources, while the random-resample gap grows from 0.03 to 1.1 nats; so the
  contrast (count - horizon: 0.19 -> 0.00) and the horizon-only claim (-2.48 -> +0.999) flip. The
  count head's AUROC for elevation failures becomes the negative head's 0.939 < 0.95 (flips), its
  d-contrast 4.23 - 2.44 -> 2.44 - 4.23 (flips); the negative head's AUROC 0.998 -> 0.910 (flips).
* ARENA, count head (2.0) mean-ablated: accuracy on the 5,000 5000 -> 4987 (flips), loss 0.00016 ->
  +0.0067 nats; negative head (2.1) mean-ablated: 5000 -> 4944 (flips); zero-ablation of
  either: every contribution/AUROC/resampling claim on that head flips (constant contribution: AUROC
  0.5; no loss gap to recover).
* Count head attention made uniform: attention(0 -> 1) and the ratio flip on both models. Positions
  permuted (all of W_pos): ARENA's attention claims flip, ours do not (ratio 14.1 -> 4.55 >= 4: our
  count head finds the first bracket without the positional table), so `positions` is not among
  that test's targets. Swapping 2.0/2.1: attention(0 -> 1) 0.573 -> 0.369 (ARENA), flips.
* Mean-ablation here is over all 5,000 evaluation strings at once (one batch): over the length-
  sorted chunks the analysis used before, the "mean" kept length, hence imbalance, and the pair
  claim survived mean-ablating the negative head.
* Ours, count head (L2H0) mean-ablated: loss +1.6 nats; negative head (L2H1): +0.012 nats (5x its
  own loss); L2.mlp zero / mean ablated: the L2.mlp claim flips (5.34 -> -0.10). Ours' negative-bound
  head separates negative failures with AUROC 0.942 while the count-bound head reaches 0.989 (a
  known failure).
* Ours: count-agreeing resampling recovers 0.793 [0.774, 0.811] pooled over 5 draws (per draw
  0.78-0.82): a known failure decided on the interval; the contrast (0.79 - 0.50) and horizon-only
  (-2.26) claims pass, and flip under the swap (horizon-only -0.49 [-1.19, 0.29]).

Thresholds are the seed's where it gives numbers (r^2 >= 0.98, attention ~0.5 or more), otherwise
from the hypothesis's wording (see each test), and above what every control reaches.

Census decision (issue 17; `python -m circuits census brackets --recipes
default,label_only,originators,arena_like --circuits-seeds 0-4 --recipe-select TestOurModel --acc-target 0.999`,
table in reports/census/brackets/census.md and the README): 20 models, 4 recipes x seeds 0-4 (ours with
per-position suffix targets; label-only cross-entropy at position 0 on the published distribution; the
same on an originators'-like distribution; that plus dropout 0.1 and sqrt(d_model)-scaled embeddings).
On 20/20 the last MLP is the top component along the unbalanced direction; on 0/20 does a head separate
the "goes negative" failures (best AUROC 0.947 < 0.95); a count head in the seed's sense (AUROC, tracking
|p - 1/2|, attention q0 -> k1) on 2/20, both below the 99.9% target. No recipe gives the two-head
mechanism on most seeds at the accuracy target, so the default recipe stays the reference (99.9% on 100k
fresh strings on 4 of seeds 0-4; seed 3 99.899%, seed 7 99.883%) and the head-level claims stay known
failures on our models, with these measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from circuits.analysis import interventions as I
from circuits.analysis import measures as A
from circuits.claims.controls import register_control
from circuits.claims.stats import auroc_ci, bootstrap_ci, cohens_d, mean_difference, spearman
from circuits.report.figures import overlaid_histograms
from circuits.tasks.brackets.subjects import (ArenaSubject, OursSubject, analyse, head_contribution, mean_ablated_logits,
                                              predictions_on_all, resample_count_head)

COMPONENTS = ["embed", "pos_embed", "L0H0", "L0H1", "L0.mlp", "L1H0", "L1H1", "L1.mlp", "L2H0", "L2H1",
              "L2.mlp", "biases"]


@dataclass
class LNPairs:
    """Inputs and outputs of the final LayerNorm at position 0 (targets are what the fit predicts)."""

    features: torch.Tensor
    targets: torch.Tensor


@dataclass
class Decomposition:
    stack: torch.Tensor  # [component, batch, d_model]
    labels: list


def _drop_component(d: Decomposition, label: str, seed: int = 0) -> Decomposition:
    keep = [i for i, l in enumerate(d.labels) if l != label]
    if len(keep) == len(d.labels):
        raise ValueError(f"no component {label!r} in {d.labels}")
    return Decomposition(d.stack[keep], [d.labels[i] for i in keep])


register_control("drop_component", kind="data", fn=_drop_component,
                 accepts=lambda obj: isinstance(obj, Decomposition),
                 description="leave one component out of a residual decomposition")


def _rescale_ln_inputs(pairs: LNPairs, seed: int = 0) -> LNPairs:
    """Each row's LN input scaled by a random factor in [1/4, 4] (log-uniform), its output kept: a
    LayerNorm's output does not change with its input's scale, so a linear fit must fail on these
    pairs. It checks that the r^2 measurement can see the non-linearity a LayerNorm has."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp((torch.rand(len(pairs.features), 1, generator=gen) * 2 - 1) * np.log(4.0))
    return LNPairs(pairs.features * scale.to(pairs.features.dtype), pairs.targets)


register_control("rescale_ln_inputs", kind="data", fn=_rescale_ln_inputs,
                 accepts=lambda obj: isinstance(obj, LNPairs),
                 description="final-LN inputs rescaled row by row, outputs kept (a LayerNorm's non-linearity)")


@pytest.fixture
def resampling_draws(circuits_options):
    """The resampling tests' draws of sources: one stream for both tests (they share the resampled
    losses, computed once per model), derived from --circuits-draws-seed like every `draws` fixture."""
    return circuits_options.shared_draws("test_brackets.py: resampling sources")


class BracketHypotheses:
    """The claims, written once; `subject` is provided by the ARENA and our-model subclasses.

    Figures are added before the claims: a refuted claim raises, and the report should still show
    what was measured on that model."""

    # thresholds that differ between a published checkpoint and our retrained models
    MIN_CORRECT_FIRST_5000 = 5000
    MIN_ACCURACY_ALL = 0.9999

    @pytest.mark.about("model")
    @pytest.mark.controls("mean_ablate:count_head", "mean_ablate:negative_head")
    def test_accuracy_on_the_seeds_5000(self, subject, claim):
        an = analyse(subject.model, subject.data)
        correct = int((an.logits.argmax(-1) == subject.data.isbal.long()).sum())
        claim.at_least("correct_of_first_5000", correct, self.MIN_CORRECT_FIRST_5000)

    @pytest.mark.about("model")
    @pytest.mark.controls("shuffle_labels")
    def test_accuracy_on_all_100k(self, subject, claim, control):
        predicted, labels, counts = predictions_on_all(subject.model)
        labels = control.apply_labels(labels)  # shuffle_labels permutes them
        accuracy = float(((predicted == labels).double() * counts).sum() / counts.sum())
        claim.at_least("accuracy_all_100k", accuracy, self.MIN_ACCURACY_ALL)

    @pytest.mark.about(none="a precondition of the analysis, true of an untrained model too (r^2 1.00): "
                            "no mutation can be required to break it")
    @pytest.mark.controls("shuffle_labels", "rescale_ln_inputs")
    def test_final_layernorm_is_linear_at_position_0(self, subject, claim, control):
        """A precondition of the direction analysis, not evidence for the mechanism: a randomly
        initialised model's final LN is linear too (r^2 1.00), so this test has no `about` target
        (no mutation of a part can be required to break it). Its controls check the measurement: the
        rows' LN inputs rescaled (the non-linearity a LayerNorm has) must fail the fit."""
        an = analyse(subject.model, subject.data)
        x, y = A.ln_final_io(an.cache, pos=0)
        pairs = control.apply_data(LNPairs(x, y))
        _, r2 = A.linear_fit(pairs.features, pairs.targets)
        claim.at_least("ln_final_pos0_r2", r2, 0.98)

    @pytest.mark.about(none="an identity of the decomposition, true of any model: no mutation can break it")
    @pytest.mark.controls(*(f"drop_component:{c}" for c in COMPONENTS))
    def test_components_sum_to_pre_final_ln_residual(self, subject, claim, control):
        """An identity of the decomposition (true of any model); each control leaves one component out."""
        an = analyse(subject.model, subject.data)
        stack, labels = an.cache.head_decomposition(None, pos=0)
        assert labels == COMPONENTS, labels
        d = control.apply_data(Decomposition(stack[:, :, 0].double(), labels))
        resid = an.cache.residual(None, pos=0)[:, 0].double()
        error = float((d.stack.sum(0) - resid).abs().max())
        claim.at_most("max_abs_error(sum(components) - resid)", error, 1e-4)

    @pytest.mark.about("ov:count_head", "ov:negative_head", alternatives="layer")
    @pytest.mark.controls("untrained")
    def test_unbalanced_direction_carried_by_the_two_role_heads(self, subject, claim, figures):
        """A claim about the two heads' outputs as a pair (a swap of the two leaves the pair, so it
        is not one of its mutations: the role-specific tests below carry that)."""
        an = analyse(subject.model, subject.data)
        ranked = A.heads_by_mean_difference(an.contributions, an.labels, ~subject.data.isbal)
        top2 = {ranked[0][0], ranked[1][0]}
        roles = {A.head_label(*subject.head("count_head")), A.head_label(*subject.head("negative_head"))}
        figures.add("component histograms", lambda: _component_histograms(an, subject),
                    caption=f"{subject.name}: contribution along the unbalanced direction, balanced mean subtracted")
        claim.holds("top2_components_are_the_role_heads", top2 == roles,
                    detail=f"top components {[(l, round(v, 2)) for l, v in ranked[:3]]}; roles {sorted(roles)}",
                    note=subject.binding)
        difference = dict(ranked)
        others = max(abs(v) for label, v in ranked if label not in roles)
        claim.at_least("min(role heads) / max |other components| (mean difference)",
                       min(difference[r] for r in roles) / max(others, 1e-9), 2.0)

    @pytest.mark.about("head:count_head", alternatives="layer")
    @pytest.mark.controls("swap_roles")
    def test_count_head_separates_elevation_failures(self, subject, claim, figures, draws):
        an = analyse(subject.model, subject.data)
        so = subject.data.starts_open
        count = head_contribution(an, subject.head("count_head"))[so].numpy()
        negh = head_contribution(an, subject.head("negative_head"))[so].numpy()
        elev = subject.data.total_elevation_failure[so].numpy()
        neg = subject.data.negative_failure[so].numpy()
        figures.add("count vs negative head", lambda: _failure_scatter(count, negh, elev, neg, subject),
                    caption=f"{subject.name}: strings starting with '(' coloured by failure type")
        # each head separates its own failure type, and better than the other head does
        _separation_claims(claim, subject, draws, "count_head", count, negh, elev, "count", "negative",
                           "elevation", min_auroc=0.95, min_gap=1.0)

    @pytest.mark.about("head:negative_head", alternatives="layer")
    @pytest.mark.controls("swap_roles")
    def test_negative_head_separates_negative_failures(self, subject, claim, draws):
        an = analyse(subject.model, subject.data)
        so = subject.data.starts_open
        count = head_contribution(an, subject.head("count_head"))[so].numpy()
        negh = head_contribution(an, subject.head("negative_head"))[so].numpy()
        neg = subject.data.negative_failure[so].numpy()
        _separation_claims(claim, subject, draws, "negative_head", negh, count, neg, "negative", "count",
                           "negative", min_auroc=0.98, min_gap=2.0)

    @pytest.mark.about("head:count_head", "feature:open_proportion", alternatives="layer")
    @pytest.mark.controls("swap_roles")
    def test_count_head_tracks_open_proportion(self, subject, claim, control, figures):
        an = analyse(subject.model, subject.data)
        contribution = head_contribution(an, subject.head("count_head"))
        # the feature the head should track; its specificity alternative is an independent one of the
        # same distribution (the values permuted across strings)
        distance = control.feature("open_proportion", (subject.data.open_proportion - 0.5).abs())
        figures.add("count head vs open proportion", lambda: _open_proportion_scatter(contribution, subject),
                    caption=f"{subject.name}: count-head contribution against the proportion of '('")
        estimate = claim.sample((contribution.numpy(), distance.numpy()), statistic=spearman,
                                paired=True, method="percentile", n_resamples=400)
        claim.at_least("count_head.spearman(contribution, |p - 1/2|)", estimate, 0.65, note=subject.binding)

    @pytest.mark.about("qk:count_head", alternatives="layer")
    @pytest.mark.controls("swap_roles")
    def test_count_head_attends_to_position_1_from_position_0(self, subject, claim, figures):
        """Where the count head looks; its effect is test_mean_ablating_the_count_heads_output_costs_loss."""
        an = analyse(subject.model, subject.data)
        layer, head = subject.head("count_head")
        attention = an.attention_from_query_0(layer, head)[subject.data.starts_open].mean(0)
        figures.add("count head attention from position 0", lambda: _attention_bar(attention, subject),
                    caption=f"{subject.name}: mean over strings starting with '('")
        claim.at_least("count_head.attention(q=0 -> k=1)", float(attention[1]), 0.5, note=subject.binding)
        others = torch.cat([attention[:1], attention[2:]])
        claim.at_least("count_head.attention(k=1) / max attention(other keys)",
                       float(attention[1] / others.max()), 4.0)

    @pytest.mark.about("ov:count_head", alternatives="layer")
    def test_mean_ablating_the_count_head_costs_more_on_elevation_failures_than_its_sibling(self, subject, claim):
        """The count head's output is used for what the hypothesis says it flags: on the strings only
        the count test fails (start with "(", no negative failure), mean-ablating the count head
        raises the loss more than mean-ablating any other head of its layer, intervals separated.
        (The old claim, "ablation costs loss at all", held for 5 of the 6 ARENA heads: L0H0 1.02,
        L0H1 0.0097, L1H0 0.016, L2H0 0.0065, L2H1 0.064 nats; the count head the second weakest.)"""
        _sibling_ablation_claims(claim, subject, "count_head", _only_count_fails(subject.data), "count-only failures")

    @pytest.mark.about("ov:negative_head", alternatives="layer")
    def test_mean_ablating_the_negative_head_costs_more_on_negative_failures_than_its_sibling(self, subject, claim):
        """As above, for the negative head, on the strings only the horizon test fails."""
        _sibling_ablation_claims(claim, subject, "negative_head", _only_horizon_fails(subject.data),
                                 "horizon-only failures")

    @pytest.mark.about("head:count_head", alternatives="layer")
    @pytest.mark.controls("shuffle_labels", "swap_roles")
    def test_resampling_the_count_heads_input_needs_the_count_not_the_horizon(self, subject, claim, control,
                                                                              resampling_draws):
        """Resampling ablation of the count head's key and value at position 1 (strings starting with
        "("), against a random-resample baseline. Which head reads which feature matters: sources that
        agree on the count test must keep more of the loss than sources that agree on the horizon
        test (the negative head's feature), and sources that agree on the horizon test but not on the
        count test must do worse than random ones (by half the gap: the seed's "disagreeing" claim). (With heads 2.0 and 2.1 swapped, the pinned
        head reads the horizon feature and both claims fail; "count-agreeing sources keep >= 80%"
        alone holds there, see the next test.) Pooled over N_RESAMPLE_DRAWS draws of sources (from
        `draws`), decided on bootstrap intervals over strings. A head in layer 0 (brackets seed 1 binds
        its negative head to L0H1, so swap_roles resamples it) reads the same key and value at
        position 1 from every string starting with "(": the random resample loses nothing (baseline
        loss = clean loss), the fractions are undefined and both claims fail as measured."""
        r = resample_count_head(subject, control, resampling_draws, N_RESAMPLE_DRAWS)
        claim.at_least("loss_recovered(agree on count) - loss_recovered(agree on horizon)", r["count - horizon"],
                       MIN_FEATURE_CONTRAST, note=f"{r['note']}; {subject.binding}")
        claim.at_most("loss_recovered(agree on horizon, disagree on count)", r["horizon only"], -0.5,
                      note="worse than a random source (which agrees on the count test ~2/3 of the time): "
                           "the count head's input carries the count")

    @pytest.mark.about("ov:count_head", alternatives="layer")
    @pytest.mark.controls("shuffle_labels")
    def test_resampling_the_count_heads_input_from_count_agreeing_strings_keeps_the_loss(self, subject, claim,
                                                                                         control, resampling_draws):
        """The seed's resampling claim: sources agreeing on the count test keep >= 80% of the loss a
        random source loses. On its own not specific to the head (the negative head's input, resampled
        the same way, keeps it too), hence about the head's output only: with the output ablated the
        input cannot matter (no loss gap); the previous test carries the head-swap power."""
        r = resample_count_head(subject, control, resampling_draws, N_RESAMPLE_DRAWS)
        claim.at_least("loss_recovered(resample agreeing on the count test)", r["count"], 0.8,
                       note=f"{r['note']}; {subject.binding}")


N_RESAMPLE_DRAWS = 5
# count-agreeing sources must keep at least this much more of the loss gap than horizon-agreeing ones:
# "more", with a margin the 5-draw pooled interval resolves (its half-width is ~0.05-0.1 here)
MIN_FEATURE_CONTRAST = 0.05


class TestArenaCheckpoint(ArenaSubject, BracketHypotheses):
    """The hypotheses on the published ARENA checkpoint (heads 2.0 / 2.1 pinned)."""


class TestOurModel(OursSubject, BracketHypotheses):
    """The hypotheses on our brackets zoo model; roles found by search on the search split, scored on
    the held-out strings, named in the report.

    Our reference model reaches the accuracy but does not implement the seed's two-head mechanism:
    its last MLP carries the unbalanced direction (test_last_mlp_carries_the_unbalanced_direction);
    the head-level hypotheses refuted on it are in KNOWN_FAILURES.
    """

    MIN_CORRECT_FIRST_5000 = 4995  # the zoo's training target, 99.9%, on the seed's 5,000
    MIN_ACCURACY_ALL = 0.999

    @pytest.mark.about("mlp:L2")
    @pytest.mark.controls("untrained")
    def test_last_mlp_carries_the_unbalanced_direction(self, subject, claim, control):
        """The MLP is read through control.mlp: its specificity alternatives ask the same of L0.mlp
        and L1.mlp."""
        an = analyse(subject.model, subject.data)
        ranked = A.heads_by_mean_difference(an.contributions, an.labels, ~subject.data.isbal)
        mlp = f"L{control.mlp(2)}.mlp"
        claim.holds("top component along the unbalanced direction is L2.mlp", ranked[0][0] == mlp,
                    detail=f"top components {[(l, round(v, 2)) for l, v in ranked[:3]]}")
        difference = dict(ranked)
        others = max(abs(v) for label, v in ranked if label != mlp)
        claim.at_least("L2.mlp / max |other components| (mean difference)", difference[mlp] / max(others, 1e-9), 3.0)


# Hypotheses measured false on our reference model: strict expected failures there (they must keep
# failing, and only as a failed claim), lenient under --circuits-seeds. The plugin appends what was measured
# now; each reason says what the hypothesis says against what is measured, and what it is decided on.
KNOWN_FAILURES = {
    "TestArenaCheckpoint::test_resampling_the_count_heads_input_from_count_agreeing_strings_keeps_the_loss unspecific":
        "the seed's claim does not tell the count head from its sibling: resampling the negative head's (L2H1) "
        "position-1 input from count-agreeing strings keeps 0.999 of the loss (needs >= 0.8); the "
        "head-specific claim is test_resampling_the_count_heads_input_needs_the_count_not_the_horizon",
    "TestOurModel::test_unbalanced_direction_carried_by_the_two_role_heads":
        "the hypothesis says the two role heads carry the unbalanced direction; on our model L2.mlp "
        "carries most of the mean unbalanced-minus-balanced difference (deterministic: no draws)",
    "TestOurModel::test_count_head_separates_elevation_failures":
        "the hypothesis says the bound count head separates elevation failures with AUROC >= 0.95; "
        "decided on the Bonferroni-corrected bootstrap lower bound on the held-out strings",
    "TestOurModel::test_count_head_tracks_open_proportion":
        "the hypothesis says the count head's contribution tracks |p - 1/2| (Spearman >= 0.65); "
        "decided on the bootstrap lower bound",
    "TestOurModel::test_negative_head_separates_negative_failures":
        "the hypothesis says the bound negative head separates negative failures with AUROC >= 0.98; on "
        "our model the head bound as negative (L2H1) reaches ~0.94 while the count-bound head L2H0 "
        "separates them better (0.989): one head does both; decided on the Bonferroni-corrected lower bound",
    "TestOurModel::test_resampling_the_count_heads_input_from_count_agreeing_strings_keeps_the_loss":
        "the hypothesis says resampling the count head's position-1 input from count-agreeing "
        "strings keeps >= 80% of the loss; decided on the bootstrap lower bound over strings, pooled "
        "over 5 draws of sources",
}


# --- helpers -------------------------------------------------------------------------------------------



def _ablation_cost(model, data, head: tuple[int, int]) -> np.ndarray:
    """Per evaluation string: cross-entropy with `head` mean-ablated (its output replaced by the mean
    over all evaluation strings at each position) minus the model's own. Once per model function."""
    def compute():
        clean = A.cross_entropy_per_example(analyse(model, data).logits, data.isbal.long())
        logits = mean_ablated_logits(model, data, head)
        return (A.cross_entropy_per_example(logits, data.isbal.long()) - clean).double().numpy()

    return _ABLATED.get(model, ("mean-ablation cost", head, id(data)), compute)


_ABLATED = A.ModelMemo()



def _only_count_fails(data) -> np.ndarray:
    return (data.starts_open & data.total_elevation_failure & ~data.negative_failure).numpy()


def _only_horizon_fails(data) -> np.ndarray:
    return (data.starts_open & data.negative_failure & ~data.total_elevation_failure).numpy()


def _sibling_ablation_claims(claim, subject, role: str, rows: np.ndarray, what: str) -> None:
    """Mean-ablating `role`'s head costs more loss on `rows` (the strings only its feature flags)
    than mean-ablating any other head of its layer (the hypothesis names the layer): the paired
    per-string difference to the costliest sibling, on the bootstrap lower bound (Bonferroni over
    the siblings), and the two mean costs' intervals separated."""
    layer, head = subject.head(role)
    siblings = [(layer, h) for h in range(subject.model.cfg.n_heads) if h != head]
    own = _ablation_cost(subject.model, subject.data, (layer, head))[rows]
    others = {A.head_label(*hd): _ablation_cost(subject.model, subject.data, hd)[rows] for hd in siblings}
    # ablating nothing is an alternative too: a dead head "costs more than a sibling whose ablation helps"
    others["nothing"] = np.zeros_like(own)
    best = max(others, key=lambda k: others[k].mean())
    level = 1 - 0.05 / (len(others))
    seed = claim.draws_seed
    diff = claim.sample((own, others[best]), mean_difference, paired=True, method="percentile",
                        n_resamples=1000, level=level, seed=seed)
    claim.at_least(f"{role} mean-ablated minus costliest of its siblings and nothing, loss on {what} (nats)", diff,
                   MIN_COST,
                   note=f"{role}={A.head_label(layer, head)} {own.mean():.4g} nats vs "
                        + ", ".join(f"{k} {v.mean():.4g}" for k, v in others.items())
                        + f" on {int(rows.sum())} held-out {what}; {subject.binding}")
    own_ci = bootstrap_ci(own, np.mean, method="percentile", n_resamples=1000, level=level, seed=seed)
    other_ci = bootstrap_ci(others[best], np.mean, method="percentile", n_resamples=1000, level=level, seed=seed)
    claim.at_least(f"{role}: lower bound of its ablation cost minus upper bound of {best}'s ({what})",
                   own_ci.lo - other_ci.hi, MIN_COST,
                   note=f"{own_ci.lo:.4g}..{own_ci.hi:.4g} vs {other_ci.lo:.4g}..{other_ci.hi:.4g} at level {level:.3f}")


# "costs more" means strictly more: above float32 rounding of a cross-entropy difference (~1e-7 nats), so a
# dead head (cost exactly 0) cannot tie its way past "ablating nothing"
MIN_COST = 1e-6


def _component_histograms(an, subject):
    fig, axes = plt.subplots(4, 3, figsize=(10, 9), sharex=True)
    bal = subject.data.isbal
    for ax, label in zip(axes.flat, an.labels):
        v = an.contributions[an.labels.index(label)].numpy()
        bins = np.linspace(-10, 20, 61)
        overlaid_histograms(ax, {"balanced": (v[bal.numpy()], "tab:blue"),
                                 "unbalanced": (v[~bal.numpy()], "tab:red")}, bins)
        ax.set_title(label, fontsize=9)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{subject.name}: component contributions along the unbalanced direction")
    fig.tight_layout()
    return fig


def _failure_scatter(count, negh, elev, neg, subject):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    kinds = {"balanced": ~elev & ~neg, "just negative": neg & ~elev, "just elevation": elev & ~neg,
             "both failures": elev & neg}
    for (name, mask), colour in zip(kinds.items(), ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        ax.scatter(count[mask], negh[mask], s=5, alpha=0.5, label=name, color=colour)
    ax.set_xlabel(f"count head {subject.role_label('count_head')}")
    ax.set_ylabel(f"negative head {subject.role_label('negative_head')}")
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    return fig


def _open_proportion_scatter(contribution, subject):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(subject.data.open_proportion.numpy(), contribution.numpy(), s=4, alpha=0.4,
               c=subject.data.isbal.numpy(), cmap="coolwarm_r")
    ax.set_xlabel("proportion of '('")
    ax.set_ylabel(f"count head {subject.role_label('count_head')} contribution")
    fig.tight_layout()
    return fig


def _attention_bar(attention, subject):
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(attention)), attention.numpy(), color="tab:purple")
    ax.set_xlabel("key position")
    ax.set_ylabel("attention probability")
    ax.set_title(f"{subject.role_label('count_head')} from query 0")
    fig.tight_layout()
    return fig


def _separation_claims(claim, subject, draws, role, own, other, failed, own_short, other_short, failure,
                       min_auroc, min_gap):
    """`role`'s contribution separates `failure` strings (AUROC on a Bonferroni-widened interval over
    the heads its search scanned), and by Cohen's d better than the other role head's does."""
    level = subject.level(role)
    estimate = auroc_ci(own[failed], own[~failed], level=level, n_resamples=400,
                        seed=draws.child("auroc").int())
    claim.at_least(f"{role}.auroc({failure} failure)", estimate, min_auroc,
                   note=f"{subject.binding}; decided on the {level:.2%} interval (Bonferroni over "
                        f"{subject.candidates[role]} candidate heads)")
    claim.at_least(f"d({own_short}, {failure}) - d({other_short}, {failure})",
                   cohens_d(own[failed], own[~failed]) - cohens_d(other[failed], other[~failed]), min_gap)
