"""Hypothesis (seed 000): the balanced-bracket classifier decides "unbalanced" through two heads in
its last attention layer that read the two failure conditions.

* It classifies (almost) perfectly, and its final LayerNorm is close to linear at position 0, so the
  "unbalanced" logit direction can be pulled back through a linear fit of that LN and read off the
  residual stream as a sum of component contributions (embeddings, heads, MLPs, W_O biases).
* Along that direction a "count head" and a "negative head" carry most of the difference between
  unbalanced and balanced strings. On strings starting with "(", the count head flags total-
  elevation failures (#"(" != #")") and the negative head flags negative failures (a suffix with more
  "(" than ")", the seed's right-to-left scan); the count head's contribution grows with the distance
  of the open-proportion from 1/2; from position 0 it attends mostly to position 1.
* Causally: resampling the count head's input at position 1 from strings that agree on the count
  test keeps the loss; resampling from strings that disagree destroys it.

On the published ARENA checkpoint the roles are pinned to the seed's heads 2.0 (count) and 2.1
(negative); on our own models they are bound by search (`find_roles`) and named in the report.
Thresholds are the seed's where it gives numbers (r^2 >= 0.98, attention ~0.5 or more), otherwise
set below what the ARENA checkpoint shows with room for retrained models, and above what every
negative control reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from brackets_subjects import ArenaSubject, OursSubject, analyse, head_contribution, predictions_on_all
from circuits import analysis as A
from circuits.controls import register_control
from circuits.figures import overlaid_histograms
from circuits.interventions import resample_activations
from circuits.stats import auroc, cohens_d, spearman

COMPONENTS = ["embed", "pos_embed", "L0H0", "L0H1", "L0.mlp", "L1H0", "L1H1", "L1.mlp", "L2H0", "L2H1",
              "L2.mlp", "biases"]


@dataclass
class LNPairs:
    """Inputs and outputs of the final LayerNorm at position 0 (targets are what the fit predicts)."""

    features: torch.Tensor
    targets: torch.Tensor


@dataclass
class Labelled:
    labels: torch.Tensor  # permuted by the shuffle_labels control


@dataclass
class Decomposition:
    stack: torch.Tensor  # [component, batch, d_model]
    labels: list


@dataclass
class FeaturePairs:
    values: torch.Tensor  # a head's contribution per string
    labels: torch.Tensor  # the feature it should track (shuffled by the shuffle_labels control)


@dataclass
class ResampleGroups:
    """Which strings count as 'agreeing' for resampling: `labels` = the count test's outcome."""

    labels: torch.Tensor


def _drop_component(d: Decomposition, label: str, seed: int = 0) -> Decomposition:
    keep = [i for i, l in enumerate(d.labels) if l != label]
    if len(keep) == len(d.labels):
        raise ValueError(f"no component {label!r} in {d.labels}")
    return Decomposition(d.stack[keep], [d.labels[i] for i in keep])


register_control("drop_component", kind="data", fn=_drop_component, replace=True,
                 accepts=lambda obj: isinstance(obj, Decomposition),
                 description="leave one component out of a residual decomposition")


class BracketHypotheses:
    """The claims, written once; `subject` is provided by the ARENA and our-model subclasses.

    Figures are added before the claims: a refuted claim raises, and the report should still show
    what was measured on that model."""

    # thresholds that differ between a published checkpoint and our retrained models
    MIN_CORRECT_FIRST_5000 = 5000
    MIN_ACCURACY_ALL = 0.9999

    @pytest.mark.controls("untrained")
    def test_accuracy_on_the_seeds_5000(self, subject, claim):
        an = analyse(subject.model, subject.data)
        correct = int((an.logits.argmax(-1) == subject.data.isbal.long()).sum())
        claim.at_least("correct_of_first_5000", correct, self.MIN_CORRECT_FIRST_5000)

    @pytest.mark.controls("shuffle_labels")
    def test_accuracy_on_all_100k(self, subject, claim, control):
        predicted, labels, counts = predictions_on_all(subject.model)
        labelled = control.apply_data(Labelled(labels))
        accuracy = float(((predicted == labelled.labels).double() * counts).sum() / counts.sum())
        claim.at_least("accuracy_all_100k", accuracy, self.MIN_ACCURACY_ALL)

    @pytest.mark.controls("shuffle_labels")
    def test_final_layernorm_is_linear_at_position_0(self, subject, claim, control):
        an = analyse(subject.model, subject.data)
        x, y = A.ln_final_io(an.cache, pos=0)
        pairs = control.apply_data(LNPairs(x, y))
        _, r2 = A.linear_fit(pairs.features, pairs.targets)
        claim.at_least("ln_final_pos0_r2", r2, 0.98)

    @pytest.mark.controls(*(f"drop_component:{c}" for c in COMPONENTS))
    def test_components_sum_to_pre_final_ln_residual(self, subject, claim, control):
        an = analyse(subject.model, subject.data)
        stack, labels = an.cache.decompose_resid(None, pos=0)
        assert labels == COMPONENTS, labels
        d = control.apply_data(Decomposition(stack[:, :, 0].double(), labels))
        resid = an.cache.residual(None, pos=0)[:, 0].double()
        error = float((d.stack.sum(0) - resid).abs().max())
        claim.at_most("max_abs_error(sum(components) - resid)", error, 1e-4)

    @pytest.mark.controls("zero_ablate:count_head", "zero_ablate:negative_head", "untrained")
    def test_unbalanced_direction_carried_by_the_two_role_heads(self, subject, claim, figures):
        an = analyse(subject.model, subject.data)
        ranked = A.heads_by_mean_difference(an.contributions, an.labels, ~subject.data.isbal)
        top2 = {ranked[0][0], ranked[1][0]}
        roles = {A.head_label(*subject.head("count_head")), A.head_label(*subject.head("negative_head"))}
        figures.add("component histograms", lambda: _component_histograms(an, subject),
                    caption=f"{subject.name}: contribution along the unbalanced direction, balanced mean subtracted")
        claim.holds("top2_components_are_the_role_heads", top2 == roles,
                    detail=f"top components {ranked[:3]}; roles {sorted(roles)}")
        difference = dict(ranked)
        others = max(abs(v) for label, v in ranked if label not in roles)
        claim.at_least("min(role heads) / max |other components| (mean difference)",
                       min(difference[r] for r in roles) / max(others, 1e-9), 2.0)

    @pytest.mark.controls("swap_roles")
    def test_failure_types_are_read_by_separate_heads(self, subject, claim, figures):
        an = analyse(subject.model, subject.data)
        so = subject.data.starts_open
        count = head_contribution(an, subject.head("count_head"))[so].numpy()
        negh = head_contribution(an, subject.head("negative_head"))[so].numpy()
        elev = subject.data.total_elevation_failure[so].numpy()
        neg = subject.data.negative_failure[so].numpy()
        figures.add("count vs negative head", lambda: _failure_scatter(count, negh, elev, neg, subject),
                    caption=f"{subject.name}: strings starting with '(' coloured by failure type")
        claim.at_least("count_head.auroc(elevation failure)", auroc(count[elev], count[~elev]), 0.95)
        claim.at_least("negative_head.auroc(negative failure)", auroc(negh[neg], negh[~neg]), 0.98)
        # both ways round: each head separates its own failure type better than the other head does
        claim.at_least("d(count, elevation) - d(negative, elevation)",
                       cohens_d(count[elev], count[~elev]) - cohens_d(negh[elev], negh[~elev]), 1.0)
        claim.at_least("d(negative, negative) - d(count, negative)",
                       cohens_d(negh[neg], negh[~neg]) - cohens_d(count[neg], count[~neg]), 2.0)

    @pytest.mark.controls("swap_roles", "shuffle_labels")
    def test_count_head_tracks_open_proportion(self, subject, claim, control, figures):
        an = analyse(subject.model, subject.data)
        contribution = head_contribution(an, subject.head("count_head"))
        distance = (subject.data.open_proportion - 0.5).abs()
        pairs = control.apply_data(FeaturePairs(contribution, distance))
        figures.add("count head vs open proportion", lambda: _open_proportion_scatter(contribution, subject),
                    caption=f"{subject.name}: count-head contribution against the proportion of '('")
        estimate = claim.sample((pairs.values.numpy(), pairs.labels.numpy()), statistic=spearman,
                                paired=True, method="percentile", n_resamples=400)
        claim.at_least("count_head.spearman(contribution, |p - 1/2|)", estimate, 0.65)

    @pytest.mark.controls("swap_roles", "untrained")
    def test_count_head_attends_to_position_1_from_position_0(self, subject, claim, figures):
        an = analyse(subject.model, subject.data)
        layer, head = subject.head("count_head")
        attention = A.attention_from(an.cache, layer, head, query=0)[subject.data.starts_open].mean(0)
        figures.add("count head attention from position 0", lambda: _attention_bar(attention, subject),
                    caption=f"{subject.name}: mean over strings starting with '('")
        claim.at_least("count_head.attention(q=0 -> k=1)", float(attention[1]), 0.5)
        others = torch.cat([attention[:1], attention[2:]])
        claim.at_least("count_head.attention(k=1) / max attention(other keys)",
                       float(attention[1] / others.max()), 4.0)

    @pytest.mark.controls("shuffle_labels")
    def test_resampling_the_count_heads_input_keeps_the_loss_only_when_counts_agree(self, subject, claim, control):
        data = subject.data
        rows = torch.nonzero(data.starts_open).squeeze(1)
        toks, labels = data.toks[rows], data.isbal[rows].long()
        groups = control.apply_data(ResampleGroups(data.total_elevation_failure[rows]))
        layer, head = subject.head("count_head")
        patches = [(f"blocks.{layer}.attn.hook_k", (1, head)), (f"blocks.{layer}.attn.hook_v", (1, head))]
        gen = torch.Generator().manual_seed(0)
        sources = [torch.arange(len(rows)),  # every row from itself: the clean run
                   torch.randint(len(rows), (len(rows),), generator=gen),
                   _resample(groups.labels, agree=True, gen=gen),
                   _resample(groups.labels, agree=False, gen=gen)]
        clean, baseline, agree, disagree = (
            float(A.cross_entropy_per_example(logits, labels).mean())
            for logits in resample_activations(subject.model, toks, patches, sources, lengths=data.lengths[rows] + 2))
        claim.at_least("loss_recovered(resample agreeing on the count test)",
                       A.loss_recovered(agree, clean, baseline), 0.8,
                       note=f"clean {clean:.4g}, random resample {baseline:.4g}, agreeing {agree:.4g}")
        claim.at_most("loss_recovered(resample disagreeing on the count test)",
                      A.loss_recovered(disagree, clean, baseline), -0.5,
                      note=f"disagreeing {disagree:.4g} (worse than a random resample)")


class TestArenaCheckpoint(ArenaSubject, BracketHypotheses):
    """The hypotheses on the published ARENA checkpoint (heads 2.0 / 2.1 pinned)."""


class TestOurModel(OursSubject, BracketHypotheses):
    """The hypotheses on our brackets zoo model; roles found by search, named in the report.

    Our reference model reaches the accuracy but does not implement the seed's two-head mechanism:
    its last MLP carries the unbalanced direction (test_last_mlp_carries_the_unbalanced_direction),
    and the head-level hypotheses are refuted on it, each with the measurement as its reason.
    """

    MIN_CORRECT_FIRST_5000 = 4995  # the zoo's training target, 99.9%, on the seed's 5,000
    MIN_ACCURACY_ALL = 0.999
    REFUTED_ON_REFERENCE = {
        # roles bound by search on the reference: count head L2H0 (the seed's count head), negative
        # head L2H1; its accuracy claims pass (99.955% on the published 100k, 99.965% on 100k fresh)
        "test_unbalanced_direction_carried_by_the_two_role_heads":
            "L2.mlp carries 21.4 of the mean unbalanced-minus-balanced difference; the role heads 4.0 "
            "(L2H0) and 1.6 (L2H1)",
        "test_failure_types_are_read_by_separate_heads":
            "the bound count head (L2H0) separates elevation failures with AUROC 0.940 < 0.95",
        "test_count_head_tracks_open_proportion":
            "Spearman(L2H0 contribution, |p - 1/2|) = 0.631, CI [0.614, 0.647] < 0.65",
        "test_resampling_the_count_heads_input_keeps_the_loss_only_when_counts_agree":
            "resampling the count head's (L2H0) input from strings agreeing on the count test recovers "
            "0.796 of the loss (clean 0.0034, random resample 2.344, agreeing 0.481) < 0.80",
    }

    @pytest.mark.controls("zero_ablate_mlp:L2", "untrained")
    def test_last_mlp_carries_the_unbalanced_direction(self, subject, claim):
        an = analyse(subject.model, subject.data)
        ranked = A.heads_by_mean_difference(an.contributions, an.labels, ~subject.data.isbal)
        claim.holds("top component along the unbalanced direction is L2.mlp", ranked[0][0] == "L2.mlp",
                    detail=f"top components {[(l, round(v, 2)) for l, v in ranked[:3]]}")
        difference = dict(ranked)
        others = max(abs(v) for label, v in ranked if label != "L2.mlp")
        claim.at_least("L2.mlp / max |other components| (mean difference)", difference["L2.mlp"] / max(others, 1e-9), 3.0)


# --- helpers -------------------------------------------------------------------------------------------


def _resample(groups: torch.Tensor, agree: bool, gen: torch.Generator) -> torch.Tensor:
    """For each row, a random source row whose group equals (agree) or differs from (not agree) its own."""
    source = torch.empty(len(groups), dtype=torch.long)
    for value in groups.unique():
        targets = torch.nonzero(groups == value).squeeze(1)
        pool = torch.nonzero((groups == value) if agree else (groups != value)).squeeze(1)
        source[targets] = pool[torch.randint(len(pool), (len(targets),), generator=gen)]
    return source


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
