"""Ground truth: claims about Tracr-compiled models, whose mechanism is known by construction.

Tracr compiles a RASP program into weights whose residual stream is a direct sum of labelled
subspaces, one per RASP variable (its card lists them: `circuits.tasks.tracr.compiled`), so which head or MLP
computes which variable, and where it writes it, is a fact, not a hypothesis. Every claim type the
other modules use is stated here TRUE (what the compiled program computes where) and FALSE in
several ways (wrong head, wrong layer, wrong feature, a path the program does not use, a plausible
but wrong story). A TRUE claim must pass (and its `about` mutations must break it); a FALSE claim is
stated on a fresh `circuits.claims.core.Claims` recorder and must FAIL: the test records
"FALSE ...: <claim> is refuted" with the false claim's own measurement in its detail, and itself
fails (a wrong verdict) if the false claim holds. Claim names start with TRUE/FALSE and the claim
type, which the report's ground-truth matrix (`circuits.report.views.ground_truth_matrix`) counts.

The compiled models (cards: fixtures/models/tracr_*.card.json):
* `tracr_shuffle_dyck` (make_shuffle_dyck(["()"]), 6 tokens, not causal, 6 layers x 2 heads): L0H0 +
  MLP0 compute the length and the is-open / is-close flags; L1H0 averages is-open over the prefix
  (`opens`, the open proportion: the compiled twin of "head 2.0 tracks the open proportion"), L1H1
  is-close (`closes`); MLP1 length - 1; MLP2 balance = opens - closes; MLP3 balance < 0 and
  balance == 0; L4H0 reads the last position (`last_zero`: the final balance is zero); L4H1 averages
  "negative somewhere" over all positions (`has_neg`); MLP4 negates it; MLP5 writes the verdict.
  The other heads (L0H1, L2, L3, L5) and no MLP are empty.
* `tracr_frac_prevs` (make_frac_prevs(tokens == "a"), causal, 2 layers x 1 head): MLP0 writes
  is-"a"; L1H0 averages it over the causal prefix; the output is that one residual dimension.
* `tracr_hist` (make_hist(), 5 tokens, 1 layer x 1 head): L0H0 attends to BOS and every position
  holding the query's token, so it writes 1/(count + 1) to one dimension; MLP0 decodes the count
  into the categorical output.

Data: every string of the longest length (64 bracket strings, 243 strings of a/b/c each): inputs
are exhaustive, so the measured values are exact (no sampling interval) and the thresholds come
from the program's semantics: attention a selector makes exact (>= 0.99 where it is 1 up to
Tracr's softmax leakage, ~1e-7 here), numerical variables equal up to 1e-3 (distinct values differ
by >= 1/30), effect sizes at half of what the program implies. The search split of the role claims
and the patching sources are the module's draws (`--circuits-draws-seed` changes them).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from functools import lru_cache

import numpy as np
import pytest
import torch

from circuits.analysis import roles
from circuits.claims.core import Claims
from circuits.analysis.interventions import patch_activations, zero_ablate_head, zero_ablate_mlp
from circuits.analysis.scrub import Hypothesis, Path, scrub
from circuits.claims.stats import auroc
from circuits.tasks.tracr import compiled as T

EXACT = 1e-3  # numerical RASP variables: float32 products of one-hot weights, ~1e-7 off; values differ by >= 1/30
ATTENDS = 0.99  # a selector's attention: 1 up to the softmax's leakage (~1e-7 on these models)
KNOWN_FAILURES: dict = {}
# a FALSE claim's test is about no part: a mutation would have to make the false claim true to fail it
FALSE_CLAIM = pytest.mark.about(none="a FALSE claim, refuted on the compiled model: it states a mechanism the program "
                                     "does not have, so no mutation of a part can be required to make it come true")


# --- data and helpers ------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def card(program: str) -> dict:
    return T.read_card(program)["tracr"]


def sop_dim(program: str, sop: str) -> int:
    """The dimension of the numerical SOp `sop`: its label without the RASP id Tracr appends ("opens_12")."""
    found = [i for i, l in enumerate(card(program)["residual_labels"]) if re.sub(r"_\d+(?=_|$)", "", l) == sop]
    assert len(found) == 1, f"{program}: no single residual dimension for {sop!r}"
    return found[0]


@lru_cache(maxsize=None)
def strings(program: str) -> tuple[list, torch.Tensor]:
    """Every string of the program's longest length, and its tokens with BOS: [n, 1 + len]."""
    prog = T.PROGRAMS[program]
    seqs = list(itertools.product(prog.vocab, repeat=prog.max_seq_len))
    return seqs, T.encode(card(program), seqs)


def run(model, toks: torch.Tensor, names=None):
    with torch.no_grad():
        return model.run_with_cache(toks, names=names)


def outputs(model, program: str, toks: torch.Tensor) -> torch.Tensor:
    """The program's output read from the model at every token position: [n, len] (class index or value)."""
    with torch.no_grad():
        logits = model(toks)[:, 1:]  # [n, len, d_vocab_out]
    return logits.argmax(-1) if card(program)["output"]["kind"] == "categorical" else logits[..., 0]


def prefix_fraction(seqs, token) -> torch.Tensor:
    """[n, len]: the fraction of positions 0..i holding `token`."""
    hits = torch.tensor([[t == token for t in s] for s in seqs], dtype=torch.float64)
    return hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)


def counts(seqs) -> torch.Tensor:
    """[n, len]: how many tokens of the string equal token i (make_hist)."""
    return torch.tensor([[s.count(t) for t in s] for s in seqs], dtype=torch.float64)


def verdict(seqs) -> torch.Tensor:
    """[n] bool: the bracket string is balanced (the program's output, at every position)."""
    out = []
    for s in seqs:
        depth, ok = 0, True
        for t in s:
            depth += 1 if t == "(" else -1
            ok &= depth >= 0
        out.append(ok and depth == 0)
    return torch.tensor(out)


def pairs(draws, n: int) -> torch.Tensor:
    """A source row for each target row: one random permutation of the module's draws."""
    return torch.randperm(n, generator=draws.child("sources").torch())


def refute(claim, kind: str, how: str, body) -> None:
    """A FALSE claim: `body(c)` states it on a fresh Claims recorder (nothing raised, nothing in the
    report); it must fail. The test's own claim records the refutation with the false claim's
    measured value, requirement and gap, and fails the test if the false claim held."""
    __tracebackhide__ = True
    shadow = Claims(raise_on_failure=False, draws_seed=claim.draws_seed)
    body(shadow)
    assert shadow.records, "the false claim recorded nothing"
    for rec in shadow.records:
        claim.holds(f"FALSE {kind} ({how}): {rec.name} is refuted", not rec.passed, detail=rec.message)


def max_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ===== attention from / to positions ==========================================================================


def attention(model, program: str, layer: int):
    _, cache = run(model, strings(program)[1], [f"blocks.{layer}.attn.hook_pattern"])
    return cache["pattern", layer].double()  # [n, head, query, key]


def to_last(model, layer: int, head: int) -> float:
    """Least attention any token position of any string puts on the last position."""
    return float(attention(model, "shuffle_dyck", layer)[:, head, 1:, -1].min())


def prefix_deviation(pattern: torch.Tensor) -> float:
    """Largest gap between a head's attention [n, query, key] and the uniform average over the
    query's prefix (token positions 1..q, BOS excluded): what Select(indices, indices, LEQ) means."""
    P = pattern.shape[-1]
    q = torch.arange(P)[:, None]
    k = torch.arange(P)[None, :]
    target = ((k >= 1) & (k <= q)).double() / q.clamp(min=1)
    return float((pattern[:, 1:] - target[1:]).abs().max())


@pytest.mark.about("qk:L4H0")
def test_sd_l4h0_attends_to_the_last_position(tracr_shuffle_dyck_model, claim):
    claim.at_least("TRUE attention: L4H0 min attention from a token to the last position (select_last)",
                   to_last(tracr_shuffle_dyck_model, 4, 0), ATTENDS)


@FALSE_CLAIM
@pytest.mark.controls("swap_head:L4H1")
def test_sd_l4h1_attends_to_the_last_position_is_false(tracr_shuffle_dyck_model, claim):
    """With L4H0 swapped into L4H1's place the false claim comes true, so its refutation must fail
    there: the refutation is about L4H1, not about any head."""
    refute(claim, "attention", "wrong head", lambda c: c.at_least(
        "L4H1 min attention to the last position", to_last(tracr_shuffle_dyck_model, 4, 1), ATTENDS))


@FALSE_CLAIM
def test_sd_l4h0_attends_to_the_first_token_is_false(tracr_shuffle_dyck_model, claim):
    first = float(attention(tracr_shuffle_dyck_model, "shuffle_dyck", 4)[:, 0, 1:, 1].min())
    refute(claim, "attention", "wrong position", lambda c: c.at_least(
        "L4H0 min attention to the first token", first, ATTENDS))


@pytest.mark.about("model")
@pytest.mark.controls("uniform_attention:L1H0")
def test_sd_l1h0_averages_over_the_prefix(tracr_shuffle_dyck_model, claim):
    """L1H1 has the same selector (it averages is-close), so a head swap keeps this true: the
    targeted break is L1H0's uniform attention, a control."""
    dev = prefix_deviation(attention(tracr_shuffle_dyck_model, "shuffle_dyck", 1)[:, 0])
    claim.at_most("TRUE attention: L1H0 max gap to uniform attention over the prefix", dev, 1 - ATTENDS)


@FALSE_CLAIM
def test_sd_l2h0_averages_over_the_prefix_is_false(tracr_shuffle_dyck_model, claim):
    dev = prefix_deviation(attention(tracr_shuffle_dyck_model, "shuffle_dyck", 2)[:, 0])
    refute(claim, "attention", "wrong layer", lambda c: c.at_most(
        "L2H0 max gap to uniform attention over the prefix", dev, 1 - ATTENDS))


@FALSE_CLAIM
def test_sd_l1h0_attends_to_open_brackets_is_false(tracr_shuffle_dyck_model, claim):
    """The plausible story 'the open counter looks at the open brackets': it looks at every prefix
    position and its values carry is-open."""
    seqs, _ = strings("shuffle_dyck")
    pattern = attention(tracr_shuffle_dyck_model, "shuffle_dyck", 1)[:, 0, 1:, 1:]  # [n, query, key tokens]
    is_open = torch.tensor([[t == "(" for t in s] for s in seqs], dtype=torch.float64)  # [n, key]
    has_open = torch.tensor([[any(t == "(" for t in s[:q + 1]) for q in range(len(s))] for s in seqs])
    mass = (pattern * is_open[:, None, :]).sum(-1)[has_open]  # queries with an open bracket in their prefix
    refute(claim, "attention", "wrong story", lambda c: c.at_least(
        "L1H0 min attention mass on open brackets", float(mass.min()), ATTENDS))


@pytest.mark.about("model")
@pytest.mark.controls("uniform_attention:L1H0")
def test_fp_l1h0_averages_over_the_causal_prefix(tracr_frac_prevs_model, claim):
    dev = prefix_deviation(attention(tracr_frac_prevs_model, "frac_prevs", 1)[:, 0])
    claim.at_most("TRUE attention: L1H0 max gap to uniform attention over the causal prefix", dev, 1 - ATTENDS)


@FALSE_CLAIM
def test_fp_l1h0_attends_to_a_tokens_is_false(tracr_frac_prevs_model, claim):
    seqs, _ = strings("frac_prevs")
    pattern = attention(tracr_frac_prevs_model, "frac_prevs", 1)[:, 0, 1:, 1:]
    is_a = torch.tensor([[t == "a" for t in s] for s in seqs], dtype=torch.float64)
    has_a = is_a.cumsum(1) > 0
    mass = (pattern * is_a[:, None, :]).sum(-1)[has_a]
    refute(claim, "attention", "wrong story", lambda c: c.at_least(
        "L1H0 min attention mass on 'a' tokens", float(mass.min()), ATTENDS))


@pytest.mark.about("model")
@pytest.mark.controls("uniform_attention:L0H0")
def test_hist_l0h0_attends_to_bos_by_count(tracr_hist_model, claim):
    seqs, _ = strings("hist")
    bos = attention(tracr_hist_model, "hist", 0)[:, 0, 1:, 0]  # [n, query]
    claim.at_most("TRUE attention: L0H0 max gap of attention to BOS from 1/(count + 1)",
                  max_dev(bos, 1 / (counts(seqs) + 1)), 1 - ATTENDS)


@FALSE_CLAIM
def test_hist_l0h0_counts_only_earlier_tokens_is_false(tracr_hist_model, claim):
    """The plausible story 'a running count': attention to later same-token positions would be 0."""
    seqs, _ = strings("hist")
    pattern = attention(tracr_hist_model, "hist", 0)[:, 0, 1:, 1:]  # [n, query, key]
    same = torch.tensor([[[a == b for b in s] for a in s] for s in seqs])
    later = same & torch.ones(len(seqs[0]), len(seqs[0]), dtype=torch.bool).triu(1)
    refute(claim, "attention", "wrong story", lambda c: c.at_most(
        "L0H0 max attention to a later same-token position", float((pattern * later).amax()), 1 - ATTENDS))


# ===== a direction tracking a quantity ========================================================================


def resid_dim(model, program: str, name: str, d: int) -> torch.Tensor:
    _, cache = run(model, strings(program)[1], [name])
    return cache[name][:, 1:, d].double()  # [n, len]


def head_output_on(model, program: str, layer: int, head: int, d: int) -> torch.Tensor:
    """The head's own output (hook_z @ W_O) along residual dimension d at the token positions: [n, len]."""
    _, cache = run(model, strings(program)[1], [f"blocks.{layer}.attn.hook_z"])
    return cache.head_results(layer)[:, 1:, head, d].double()


@pytest.mark.about("ov:L1H0", "feature:open_proportion")
@pytest.mark.controls("swap_head:L1H0")  # L1H1 in its place: specific to L1H0
def test_sd_l1h0_tracks_the_open_proportion(tracr_shuffle_dyck_model, claim, control):
    """The compiled twin of "head 2.0 tracks the open proportion": read from L1H0's own output, so a
    head written in L1H0's place (L1H1: closes = 1 - opens) does not pass for it."""
    seqs, _ = strings("shuffle_dyck")
    got = head_output_on(tracr_shuffle_dyck_model, "shuffle_dyck", 1, 0, sop_dim("shuffle_dyck", "opens"))
    claim.at_most("TRUE probe: max gap of L1H0's output along 'opens' from the open proportion",
                  max_dev(got, control.feature("open_proportion", prefix_fraction(seqs, "("))), EXACT)


@FALSE_CLAIM
@pytest.mark.controls("swap_head:L1H1")
def test_sd_l1h1_tracks_the_open_proportion_is_false(tracr_shuffle_dyck_model, claim):
    """The true claim pointed at L1H1 (it writes `closes`, nothing along `opens`); with L1H0 swapped
    into its place it comes true, and the refutation must fail there."""
    seqs, _ = strings("shuffle_dyck")
    out = head_output_on(tracr_shuffle_dyck_model, "shuffle_dyck", 1, 1, sop_dim("shuffle_dyck", "opens"))
    refute(claim, "probe", "wrong head", lambda c: c.at_most(
        "max gap of L1H1's output along 'opens' from the open proportion", max_dev(out, prefix_fraction(seqs, "(")), EXACT))


@FALSE_CLAIM
def test_sd_opens_before_layer_1_is_false(tracr_shuffle_dyck_model, claim):
    seqs, _ = strings("shuffle_dyck")
    got = resid_dim(tracr_shuffle_dyck_model, "shuffle_dyck", "blocks.1.hook_resid_pre", sop_dim("shuffle_dyck", "opens"))
    refute(claim, "probe", "wrong layer", lambda c: c.at_most(
        "max gap of the 'opens' direction entering layer 1 from the open proportion",
        max_dev(got, prefix_fraction(seqs, "(")), EXACT))


@FALSE_CLAIM
def test_sd_opens_tracks_the_balance_is_false(tracr_shuffle_dyck_model, claim):
    seqs, _ = strings("shuffle_dyck")
    got = resid_dim(tracr_shuffle_dyck_model, "shuffle_dyck", "blocks.1.hook_resid_post", sop_dim("shuffle_dyck", "opens"))
    balance = prefix_fraction(seqs, "(") - prefix_fraction(seqs, ")")
    refute(claim, "probe", "wrong feature", lambda c: c.at_most(
        "max gap of the 'opens' direction from the balance", max_dev(got, balance), EXACT))


@pytest.mark.about("ov:L1H0", "feature:fraction_of_a")
def test_fp_output_direction_tracks_the_fraction_of_a(tracr_frac_prevs_model, claim, control):
    seqs, _ = strings("frac_prevs")
    got = resid_dim(tracr_frac_prevs_model, "frac_prevs", "blocks.1.hook_resid_post", sop_dim("frac_prevs", "frac_prevs"))
    claim.at_most("TRUE probe: max gap of the 'frac_prevs' direction from the fraction of 'a' so far",
                  max_dev(got, control.feature("fraction_of_a", prefix_fraction(seqs, "a"))), EXACT)


@FALSE_CLAIM
def test_fp_output_direction_tracks_the_fraction_of_b_is_false(tracr_frac_prevs_model, claim):
    seqs, _ = strings("frac_prevs")
    got = resid_dim(tracr_frac_prevs_model, "frac_prevs", "blocks.1.hook_resid_post", sop_dim("frac_prevs", "frac_prevs"))
    refute(claim, "probe", "wrong feature", lambda c: c.at_most(
        "max gap of the 'frac_prevs' direction from the fraction of 'b'", max_dev(got, prefix_fraction(seqs, "b")), EXACT))


@FALSE_CLAIM
def test_fp_fraction_before_layer_1_is_false(tracr_frac_prevs_model, claim):
    seqs, _ = strings("frac_prevs")
    got = resid_dim(tracr_frac_prevs_model, "frac_prevs", "blocks.1.hook_resid_pre", sop_dim("frac_prevs", "frac_prevs"))
    refute(claim, "probe", "wrong layer", lambda c: c.at_most(
        "max gap of the 'frac_prevs' direction entering layer 1 from the fraction of 'a'",
        max_dev(got, prefix_fraction(seqs, "a")), EXACT))


@pytest.mark.about("ov:L0H0", "feature:count")
def test_hist_selector_width_direction_is_one_over_count(tracr_hist_model, claim, control):
    seqs, _ = strings("hist")
    got = resid_dim(tracr_hist_model, "hist", "blocks.0.hook_resid_mid", sop_dim("hist", "hist_selector_width_attn_output"))
    claim.at_most("TRUE probe: max gap of the selector-width direction from 1/(count + 1)",
                  max_dev(got, 1 / (control.feature("count", counts(seqs)) + 1)), EXACT)


@FALSE_CLAIM
def test_hist_selector_width_is_one_over_position_is_false(tracr_hist_model, claim):
    seqs, _ = strings("hist")
    got = resid_dim(tracr_hist_model, "hist", "blocks.0.hook_resid_mid", sop_dim("hist", "hist_selector_width_attn_output"))
    position = torch.arange(1, len(seqs[0]) + 1, dtype=torch.float64).expand(len(seqs), -1)
    refute(claim, "probe", "wrong feature", lambda c: c.at_most(
        "max gap of the selector-width direction from 1/(position + 1) (a running count)", max_dev(got, 1 / (position + 1)), EXACT))


# ===== ablation: necessity and effect size ====================================================================


def balance(model) -> torch.Tensor:
    return resid_dim(model, "shuffle_dyck", "blocks.2.hook_resid_post", sop_dim("shuffle_dyck", "balance_()"))


def balanced_accuracy(model) -> float:
    """Mean over the two verdicts of the accuracy at the last position (5 of 64 strings are balanced)."""
    seqs, toks = strings("shuffle_dyck")
    truth = verdict(seqs)
    values = card("shuffle_dyck")["output"]["values"]
    said = outputs(model, "shuffle_dyck", toks)[:, -1] == values.index(True)
    return 0.5 * float((said[truth]).double().mean() + (~said[~truth]).double().mean())


@pytest.mark.about("ov:L1H0")
@pytest.mark.controls("swap_head:L1H0")  # L1H1 in its place: specific to L1H0
def test_sd_ablating_l1h0_removes_the_opens_from_the_balance(tracr_shuffle_dyck_model, claim):
    seqs, _ = strings("shuffle_dyck")
    shift = balance(zero_ablate_head(tracr_shuffle_dyck_model, 1, 0)) - balance(tracr_shuffle_dyck_model)
    claim.at_most("TRUE ablation: max gap of the balance shift when zero-ablating L1H0 from -(open proportion)",
                  max_dev(shift, -prefix_fraction(seqs, "(")), EXACT)


@FALSE_CLAIM
def test_sd_ablating_l0h0_moves_the_balance_is_false(tracr_shuffle_dyck_model, claim):
    """L0H0 feeds the length, which the balance does not use (half the true effect: E[opens] / 2)."""
    shift = balance(zero_ablate_head(tracr_shuffle_dyck_model, 0, 0)) - balance(tracr_shuffle_dyck_model)
    refute(claim, "ablation", "unused path", lambda c: c.at_least(
        "mean |balance shift| when zero-ablating L0H0", float(shift.abs().mean()), 0.25))


@FALSE_CLAIM
def test_sd_ablating_l2h0_moves_the_balance_is_false(tracr_shuffle_dyck_model, claim):
    shift = balance(zero_ablate_head(tracr_shuffle_dyck_model, 2, 0)) - balance(tracr_shuffle_dyck_model)
    refute(claim, "ablation", "wrong layer", lambda c: c.at_least(
        "mean |balance shift| when zero-ablating L2H0", float(shift.abs().mean()), 0.25))


@pytest.mark.about("mlp:L2")
def test_sd_ablating_mlp2_removes_the_balance_and_keeps_the_counts(tracr_shuffle_dyck_model, claim, control):
    """MLP2 computes the balance (opens - closes) from the counts: zero-ablated, the balance shifts by
    exactly -(opens - closes) while the counts it reads stay as they were. ("MLP2 is needed" alone
    was unspecific: zero-ablating MLP0, 2, 3, 4 or 5 each drops the balanced accuracy to chance, 0.5,
    MLP1 to 0.87; and ablating MLP0 also removes the balance, by removing the counts.)"""
    model = tracr_shuffle_dyck_model
    seqs, _ = strings("shuffle_dyck")
    ablated = zero_ablate_mlp(model, control.mlp(2))
    # one claim, both halves: each half alone holds for some wrong MLP (MLP0 also removes the balance;
    # MLP1, 3, 4, 5 also keep the counts), and a claim's power and specificity are judged claim by claim
    balance_gap = max_dev(balance(ablated) - balance(model), prefix_fraction(seqs, ")") - prefix_fraction(seqs, "("))
    counts_shift = max(max_dev(resid_dim(ablated, "shuffle_dyck", "blocks.2.hook_resid_post", sop_dim("shuffle_dyck", c)),
                               resid_dim(model, "shuffle_dyck", "blocks.2.hook_resid_post", sop_dim("shuffle_dyck", c)))
                       for c in ("opens", "closes"))
    claim.at_most("TRUE ablation: zero-ablating MLP2, max of (gap of the balance shift from -(opens - closes), "
                  "shift of 'opens' and 'closes' entering layer 3)", max(balance_gap, counts_shift), EXACT,
                  note=f"balance gap {balance_gap:.2g}, counts shift {counts_shift:.2g}")


@FALSE_CLAIM
def test_sd_l0h1_is_needed_is_false(tracr_shuffle_dyck_model, claim):
    drop = balanced_accuracy(tracr_shuffle_dyck_model) - balanced_accuracy(zero_ablate_head(tracr_shuffle_dyck_model, 0, 1))
    refute(claim, "ablation", "wrong head", lambda c: c.at_least(
        "balanced-accuracy drop when zero-ablating L0H1", drop, 0.25))


def fp_output(model) -> torch.Tensor:
    return outputs(model, "frac_prevs", strings("frac_prevs")[1]).double()


@pytest.mark.about("ov:L1H0")
def test_fp_ablating_l1h0_zeroes_the_output(tracr_frac_prevs_model, claim):
    seqs, _ = strings("frac_prevs")
    shift = fp_output(zero_ablate_head(tracr_frac_prevs_model, 1, 0)) - fp_output(tracr_frac_prevs_model)
    claim.at_most("TRUE ablation: max gap of the output shift when zero-ablating L1H0 from -(fraction of 'a')",
                  max_dev(shift, -prefix_fraction(seqs, "a")), EXACT)


@pytest.mark.about("mlp:L0")
def test_fp_ablating_mlp0_zeroes_the_output(tracr_frac_prevs_model, claim, control):
    seqs, _ = strings("frac_prevs")
    shift = fp_output(zero_ablate_mlp(tracr_frac_prevs_model, control.mlp(0))) - fp_output(tracr_frac_prevs_model)
    claim.at_most("TRUE ablation: max gap of the output shift when zero-ablating MLP0 from -(fraction of 'a')",
                  max_dev(shift, -prefix_fraction(seqs, "a")), EXACT)


@FALSE_CLAIM
def test_fp_mlp1_is_needed_is_false(tracr_frac_prevs_model, claim):
    shift = fp_output(zero_ablate_mlp(tracr_frac_prevs_model, 1)) - fp_output(tracr_frac_prevs_model)
    refute(claim, "ablation", "wrong layer", lambda c: c.at_least(
        "mean |output shift| when zero-ablating MLP1 (half of E[fraction of 'a'] = 1/3)", float(shift.abs().mean()), 1 / 6))


@FALSE_CLAIM
def test_fp_l0h0_is_needed_is_false(tracr_frac_prevs_model, claim):
    shift = fp_output(zero_ablate_head(tracr_frac_prevs_model, 0, 0)) - fp_output(tracr_frac_prevs_model)
    refute(claim, "ablation", "unused path", lambda c: c.at_least(
        "mean |output shift| when zero-ablating L0H0", float(shift.abs().mean()), 1 / 6))


def hist_accuracy(model) -> float:
    seqs, toks = strings("hist")
    return float((outputs(model, "hist", toks).double() == counts(seqs)).double().mean())


@pytest.mark.about("ov:L0H0")
def test_hist_l0h0_is_needed(tracr_hist_model, claim):
    drop = hist_accuracy(tracr_hist_model) - hist_accuracy(zero_ablate_head(tracr_hist_model, 0, 0))
    claim.at_least("TRUE ablation: accuracy drop when zero-ablating L0H0 (half of perfect)", drop, 0.5)


@pytest.mark.about("mlp:L0")
def test_hist_mlp0_is_needed(tracr_hist_model, claim, control):
    drop = hist_accuracy(tracr_hist_model) - hist_accuracy(zero_ablate_mlp(tracr_hist_model, control.mlp(0)))
    claim.at_least("TRUE ablation: accuracy drop when zero-ablating MLP0 (half of perfect)", drop, 0.5)


@FALSE_CLAIM
def test_hist_counts_without_attention_is_false(tracr_hist_model, claim):
    """The story 'the MLP counts from the tokens alone': accuracy would survive L0H0's ablation."""
    refute(claim, "ablation", "wrong story", lambda c: c.at_least(
        "accuracy with L0H0 zero-ablated", hist_accuracy(zero_ablate_head(tracr_hist_model, 0, 0)), ATTENDS))


# ===== patching / resampling ==================================================================================


def patched(model, program: str, draws, patches):
    seqs, toks = strings(program)
    src = pairs(draws, len(seqs))
    with torch.no_grad():
        logits = patch_activations(model, toks, toks[src], patches)[:, 1:]
    return seqs, src, logits


@pytest.mark.about("ov:L1H0")
@pytest.mark.controls("swap_head:L1H0")  # L1H1 in its place: specific to L1H0
def test_sd_patching_l1h0_carries_the_source_opens(tracr_shuffle_dyck_model, claim, draws):
    """Patching L1H0 from a source string puts the source's open proportion into `opens` and so makes
    the balance source opens - own closes. (The balance alone would not tell L1H0 from L1H1: in every
    prefix closes = 1 - opens, so patching L1H1 moves it the same way; `opens` does.)"""
    seqs, toks = strings("shuffle_dyck")
    src = pairs(draws, len(seqs))
    got = {}
    keep = lambda act, hook: got.__setitem__(hook.name, act[:, 1:].double())
    with torch.no_grad():
        _, cache = tracr_shuffle_dyck_model.run_with_cache(toks[src], names=["blocks.1.attn.hook_z"])
        z_src = cache["blocks.1.attn.hook_z"][:, :, 0]

        def put(z, hook):
            z = z.clone()
            z[:, :, 0] = z_src
            return z
        tracr_shuffle_dyck_model.run_with_hooks(toks, fwd_hooks=[("blocks.1.attn.hook_z", put),
                                                                 ("blocks.1.hook_resid_post", keep),
                                                                 ("blocks.2.hook_resid_post", keep)])
    source_opens = prefix_fraction([seqs[i] for i in src], "(")
    gap = max(max_dev(got["blocks.1.hook_resid_post"][..., sop_dim("shuffle_dyck", "opens")], source_opens),
              max_dev(got["blocks.2.hook_resid_post"][..., sop_dim("shuffle_dyck", "balance_()")],
                      source_opens - prefix_fraction(seqs, ")")))
    claim.at_most("TRUE patching: max gap of 'opens' from the source's and of the balance from (source opens - "
                  "own closes), L1H0 patched from a source", gap, EXACT)


@FALSE_CLAIM
def test_sd_patching_l0h0_carries_the_source_opens_is_false(tracr_shuffle_dyck_model, claim, draws):
    """Patching L1H1 instead would be no wrong head: in every prefix closes = 1 - opens, so its patch
    gives the same balance (the ground truth says so; that claim was dropped as not false). L0H0
    feeds only the length, the same for every string here."""
    seqs, toks = strings("shuffle_dyck")
    src = pairs(draws, len(seqs))
    got = {}
    keep = lambda act, hook: got.__setitem__("bal", act[:, 1:, sop_dim("shuffle_dyck", "balance_()")].double())
    with torch.no_grad():
        _, cache = tracr_shuffle_dyck_model.run_with_cache(toks[src], names=["blocks.0.attn.hook_z"])
        z_src = cache["blocks.0.attn.hook_z"][:, :, 0]

        def put(z, hook):
            z = z.clone()
            z[:, :, 0] = z_src
            return z
        tracr_shuffle_dyck_model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_z", put),
                                                                 ("blocks.2.hook_resid_post", keep)])
    want = prefix_fraction([seqs[i] for i in src], "(") - prefix_fraction(seqs, ")")
    refute(claim, "patching", "wrong head", lambda c: c.at_most(
        "max gap of the balance with L0H0 patched from (source opens - own closes)", max_dev(got["bal"], want), EXACT))


@FALSE_CLAIM
def test_sd_patching_the_last_position_carries_the_verdict_is_false(tracr_shuffle_dyck_model, claim, draws):
    """The story 'the verdict is decided at the last position from its open count'."""
    seqs, src, logits = patched(tracr_shuffle_dyck_model, "shuffle_dyck", draws,
                                [("blocks.1.attn.hook_z", (-1, 0))])
    values = card("shuffle_dyck")["output"]["values"]
    follows = (logits[:, -1].argmax(-1) == values.index(True)) == verdict(seqs)[src]
    refute(claim, "patching", "wrong story", lambda c: c.at_least(
        "fraction of strings whose verdict follows the source when L1H0 is patched at the last position",
        float(follows.double().mean()), ATTENDS))


@pytest.mark.about("mlp:L0")
def test_fp_patching_mlp0_carries_the_source_fraction(tracr_frac_prevs_model, claim, draws, control):
    seqs, src, logits = patched(tracr_frac_prevs_model, "frac_prevs", draws,
                                [(f"blocks.{control.mlp(0)}.hook_mlp_out", ())])
    claim.at_most("TRUE patching: max gap of the output with MLP0 patched from a source from the source's fraction of 'a'",
                  max_dev(logits[..., 0], prefix_fraction([seqs[i] for i in src], "a")), EXACT)


@FALSE_CLAIM
def test_fp_patching_mlp0_at_the_last_position_is_false(tracr_frac_prevs_model, claim, draws):
    seqs, src, logits = patched(tracr_frac_prevs_model, "frac_prevs", draws, [("blocks.0.hook_mlp_out", (-1,))])
    refute(claim, "patching", "wrong position", lambda c: c.at_most(
        "max gap of the last output with MLP0 patched at the last position only from the source's fraction",
        max_dev(logits[:, -1, 0], prefix_fraction([seqs[i] for i in src], "a")[:, -1]), EXACT))


@pytest.mark.about("ov:L0H0")
def test_hist_patching_l0h0_carries_the_source_counts(tracr_hist_model, claim, draws):
    seqs, src, logits = patched(tracr_hist_model, "hist", draws, [("blocks.0.attn.hook_z", ())])
    follows = logits.argmax(-1).double() == counts([seqs[i] for i in src])
    claim.at_least("TRUE patching: fraction of positions whose output is the source's count when L0H0 is patched",
                   float(follows.double().mean()), ATTENDS)


@FALSE_CLAIM
def test_hist_mlp_recounts_after_patching_is_false(tracr_hist_model, claim, draws):
    seqs, src, logits = patched(tracr_hist_model, "hist", draws, [("blocks.0.attn.hook_z", ())])
    own = logits.argmax(-1).double() == counts(seqs)
    refute(claim, "patching", "wrong story", lambda c: c.at_least(
        "fraction of positions keeping their own count when L0H0 is patched from a source", float(own.double().mean()), ATTENDS))


# ===== causal scrubbing =======================================================================================


def reading_last(model):
    """The model reading its output at the last position (scrubbing needs one read-out position;
    every string here has one length), hooks and weights as given."""
    new = copy.deepcopy(model)
    new.cfg = dataclasses.replace(new.cfg, readout="last")
    return new


def scrubbed(model, program: str, labels: torch.Tensor, hyp: Hypothesis, draws):
    """Normalised loss recovered, (baseline - scrubbed) / (baseline - clean): 1 for a hypothesis that
    keeps every output (the compiled model is deterministic), 0 for one that keeps nothing. The point
    value (the compiled model's draws differ only in which equal-feature source is drawn); where the
    loss gap is zero the fraction is undefined and the Estimate itself is returned, so the claim fails
    as measured with the losses in its message (loss_recovered_ci), never on a bare NaN."""
    _, toks = strings(program)
    result = scrub(reading_last(model), toks, labels, [hyp], n_draws=4, seed=draws.child("scrub").int())[0]
    est = result.normalised
    return est if est.undefined or not np.isfinite(est.point) else est.point


def hist_last() -> torch.Tensor:
    return counts(strings("hist")[0])[:, -1].long()  # class index = count (values 0..5)


@pytest.mark.about("mlp:L0", "feature:count")
def test_hist_scrub_mlp0_reads_the_count(tracr_hist_model, claim, draws, control):
    """The path's feature is read through control.feature: its alternative scrubs MLP0 with an
    independent feature of the count's distribution."""
    labels = hist_last()
    hyp = Hypothesis("MLP0 reads the count of the last token",
                     {f"L{control.mlp(0)}.mlp": Path(control.feature("count", labels))})
    claim.at_least("TRUE scrubbing: normalised loss recovered, MLP0 given any input with the same count",
                   scrubbed(tracr_hist_model, "hist", labels, hyp, draws), ATTENDS)


@FALSE_CLAIM
def test_hist_scrub_mlp0_reads_the_token_is_false(tracr_hist_model, claim, draws):
    token = torch.tensor([ord(s[-1]) for s in strings("hist")[0]])
    hyp = Hypothesis("MLP0 reads the last token", {"L0.mlp": Path(token)})
    value = scrubbed(tracr_hist_model, "hist", hist_last(), hyp, draws)
    refute(claim, "scrubbing", "wrong feature", lambda c: c.at_least(
        "normalised loss recovered, MLP0 given any input with the same last token", value, ATTENDS))


@FALSE_CLAIM
def test_hist_scrub_head_writes_the_output_is_false(tracr_hist_model, claim, draws):
    labels = hist_last()
    hyp = Hypothesis("L0H0 writes the count", {"L0H0": Path(labels)})
    value = scrubbed(tracr_hist_model, "hist", labels, hyp, draws)
    refute(claim, "scrubbing", "wrong head", lambda c: c.at_least(
        "normalised loss recovered, L0H0's direct path given the same count (MLP0 random)", value, ATTENDS))


def sd_labels() -> torch.Tensor:
    values = card("shuffle_dyck")["output"]["values"]
    return torch.where(verdict(strings("shuffle_dyck")[0]), values.index(True), values.index(False))


@pytest.mark.about("mlp:L5")
def test_sd_scrub_mlp5_writes_the_verdict(tracr_shuffle_dyck_model, claim, draws, control):
    labels = sd_labels()
    hyp = Hypothesis("MLP5 reads the verdict", {f"L{control.mlp(5)}.mlp": Path(labels)})
    claim.at_least("TRUE scrubbing: normalised loss recovered, MLP5 given any input with the same verdict",
                   scrubbed(tracr_shuffle_dyck_model, "shuffle_dyck", labels, hyp, draws), ATTENDS)


@FALSE_CLAIM
def test_sd_scrub_final_balance_decides_is_false(tracr_shuffle_dyck_model, claim, draws):
    """The plausible story 'balanced = the counts match': ')(' has balance 0 and is not balanced."""
    seqs, _ = strings("shuffle_dyck")
    zero = torch.tensor([s.count("(") == s.count(")") for s in seqs]).long()
    hyp = Hypothesis("MLP5 reads 'final balance is zero'", {"L5.mlp": Path(zero)})
    value = scrubbed(tracr_shuffle_dyck_model, "shuffle_dyck", sd_labels(), hyp, draws)
    refute(claim, "scrubbing", "wrong story", lambda c: c.at_least(
        "normalised loss recovered, MLP5 given any input whose final balance agrees", value, ATTENDS))


@FALSE_CLAIM
def test_sd_scrub_layer4_heads_write_the_verdict_is_false(tracr_shuffle_dyck_model, claim, draws):
    labels = sd_labels()
    hyp = Hypothesis("L4 heads write the verdict", {"L4H0": Path(labels), "L4H1": Path(labels)})
    value = scrubbed(tracr_shuffle_dyck_model, "shuffle_dyck", labels, hyp, draws)
    refute(claim, "scrubbing", "wrong layer", lambda c: c.at_least(
        "normalised loss recovered, L4H0 and L4H1's direct paths given the verdict (MLP5 random)", value, ATTENDS))


# ===== residual decomposition =================================================================================


def components(model, program: str):
    """The final residual's decomposition (embed, pos_embed, each layer's attention and MLP) read
    through the unembedding at the token positions: ([comp, n, len, d_vocab_out], labels)."""
    _, cache = run(model, strings(program)[1])
    stack, labels = cache.decompose_resid(None, return_labels=True)  # [comp, n, pos, d_model]
    return stack[:, :, 1:].double() @ model.unembed.W_U.detach().double(), labels


def hist_direct_margin(model, component: str) -> float:
    """Least margin (correct count's logit minus the best other) that `component` writes directly:
    1 where it writes the one-hot output, 0 where it writes nothing to the output dimensions."""
    seqs, _ = strings("hist")
    logits, labels = components(model, "hist")
    mine = logits[labels.index(component)]  # [n, len, 6]
    right = counts(seqs).long()[..., None]
    correct = mine.gather(-1, right)[..., 0]
    other = mine.scatter(-1, right, float("-inf")).amax(-1)
    return float((correct - other).min())


@pytest.mark.about("mlp:L0")
def test_hist_mlp0_writes_the_whole_correct_logit(tracr_hist_model, claim, control):
    claim.at_least("TRUE decomposition: least correct-count logit margin written directly by MLP0 (one-hot: 1)",
                   hist_direct_margin(tracr_hist_model, f"{control.mlp(0)}_mlp_out"), ATTENDS)


@FALSE_CLAIM
def test_hist_l0h0_writes_the_correct_logit_is_false(tracr_hist_model, claim):
    refute(claim, "decomposition", "wrong component", lambda c: c.at_least(
        "least correct-count logit margin written directly by L0's attention",
        hist_direct_margin(tracr_hist_model, "0_attn_out"), 0.5))


def fp_term_gap(model, component: str) -> float:
    """Largest gap of `component`'s direct term in the output from the fraction of 'a' so far."""
    seqs, _ = strings("frac_prevs")
    logits, labels = components(model, "frac_prevs")
    return max_dev(logits[labels.index(component)][..., 0], prefix_fraction(seqs, "a"))


@pytest.mark.about("ov:L1H0")
def test_fp_l1h0_writes_the_output(tracr_frac_prevs_model, claim):
    claim.at_most("TRUE decomposition: max gap of L1 attention's direct output term from the fraction of 'a'",
                  fp_term_gap(tracr_frac_prevs_model, "1_attn_out"), EXACT)


@FALSE_CLAIM
def test_fp_mlp0_writes_the_output_is_false(tracr_frac_prevs_model, claim):
    refute(claim, "decomposition", "wrong component", lambda c: c.at_most(
        "max gap of MLP0's direct output term from the fraction of 'a'", fp_term_gap(tracr_frac_prevs_model, "0_mlp_out"), EXACT))


def verdict_margin(model, component: str) -> float:
    """Least verdict margin (logit of the right verdict minus the wrong one) at the last position that
    `component` writes directly (one-hot output: 1)."""
    seqs, _ = strings("shuffle_dyck")
    logits, labels = components(model, "shuffle_dyck")
    values = card("shuffle_dyck")["output"]["values"]
    mine = logits[labels.index(component)][:, -1]  # [n, 2]
    margin = mine[:, values.index(True)] - mine[:, values.index(False)]
    return float((margin * torch.where(verdict(seqs), 1.0, -1.0).double()).min())


@pytest.mark.about("mlp:L5")
def test_sd_mlp5_writes_the_verdict_margin(tracr_shuffle_dyck_model, claim, control):
    claim.at_least("TRUE decomposition: least verdict margin MLP5 writes directly (one-hot: 1)",
                   verdict_margin(tracr_shuffle_dyck_model, f"{control.mlp(5)}_mlp_out"), ATTENDS)


@FALSE_CLAIM
def test_sd_layer4_attention_writes_the_verdict_margin_is_false(tracr_shuffle_dyck_model, claim):
    refute(claim, "decomposition", "wrong layer", lambda c: c.at_least(
        "least verdict margin L4's attention writes directly", verdict_margin(tracr_shuffle_dyck_model, "4_attn_out"), 0.5))


@FALSE_CLAIM
def test_sd_mlp4_writes_the_verdict_margin_is_false(tracr_shuffle_dyck_model, claim):
    refute(claim, "decomposition", "wrong component", lambda c: c.at_least(
        "least verdict margin MLP4 writes directly", verdict_margin(tracr_shuffle_dyck_model, "4_mlp_out"), 0.5))


# ===== role binding on a search split =========================================================================


def split(draws, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=draws.child("roles").torch())
    return order[: n // 2], order[n // 2:]


def last_reader_scores(model, rows: torch.Tensor) -> dict:
    """role -> head -> mean attention from token positions to the last position on `rows`."""
    _, toks = strings("shuffle_dyck")
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    _, cache = run(model, toks[rows], names)
    return {"last_reader": {(l, h): float(cache["pattern", l][:, h, 1:, -1].mean()) for l, h in roles.heads(model)}}


def bound_last_reader(model, draws):
    search, held = split(draws, len(strings("shuffle_dyck")[0]))
    binding = roles.search(model, search, lambda m, rows: last_reader_scores(m, rows), key=("search", tuple(search.tolist())))
    return binding["last_reader"], held


def head_output_at_last(model, layer: int, head: int) -> torch.Tensor:
    _, cache = run(model, strings("shuffle_dyck")[1], [f"blocks.{layer}.attn.hook_z"])
    return cache.head_results(layer)[:, -1, head].double()  # [n, d_model]


def held_out_auroc(values: torch.Tensor, target: torch.Tensor, search: torch.Tensor, held: torch.Tensor) -> float:
    """AUROC on the held-out rows of the values projected on the search rows' mean difference."""
    direction = values[search][target[search]].mean(0) - values[search][~target[search]].mean(0)
    score = (values @ direction)[held].numpy()
    t = target[held].numpy()
    return auroc(score[t], score[~t])


@pytest.mark.about("model")
@pytest.mark.controls("uniform_attention:L4H0")
def test_sd_role_last_reader_attends_to_the_last_position(tracr_shuffle_dyck_model, claim, draws):
    head, held = bound_last_reader(tracr_shuffle_dyck_model, draws)
    _, cache = run(tracr_shuffle_dyck_model, strings("shuffle_dyck")[1][held], [f"blocks.{head[0]}.attn.hook_pattern"])
    claim.at_least("TRUE roles: held-out min attention to the last position of the head bound as last reader",
                   float(cache["pattern", head[0]][:, head[1], 1:, -1].min()), ATTENDS,
                   note=f"bound on the search split: {roles.describe({'last_reader': head})}")


@pytest.mark.about("model")
@pytest.mark.controls("uniform_attention:L4H0")
def test_sd_role_last_reader_carries_the_final_balance_flag(tracr_shuffle_dyck_model, claim, draws):
    seqs, _ = strings("shuffle_dyck")
    head, held = bound_last_reader(tracr_shuffle_dyck_model, draws)
    search, _ = split(draws, len(seqs))
    zero = torch.tensor([s.count("(") == s.count(")") for s in seqs])
    value = held_out_auroc(head_output_at_last(tracr_shuffle_dyck_model, *head), zero, search, held)
    claim.at_least("TRUE roles: held-out AUROC of the last reader's output for 'final balance is zero'", value, ATTENDS,
                   note=f"{roles.describe({'last_reader': head})}; direction from the search split")


@FALSE_CLAIM
def test_sd_role_last_reader_decides_balance_is_false(tracr_shuffle_dyck_model, claim, draws):
    """The story 'the head reading the last position decides balance': it carries 'final balance
    zero', which ')(' shares with '()'."""
    seqs, _ = strings("shuffle_dyck")
    head, held = bound_last_reader(tracr_shuffle_dyck_model, draws)
    search, _ = split(draws, len(seqs))
    value = held_out_auroc(head_output_at_last(tracr_shuffle_dyck_model, *head), verdict(seqs), search, held)
    refute(claim, "roles", "wrong story", lambda c: c.at_least(
        "held-out AUROC of the last reader's output for balanced strings", value, ATTENDS))


@FALSE_CLAIM
def test_sd_role_last_reader_is_in_layer_1_is_false(tracr_shuffle_dyck_model, claim, draws):
    head, _ = bound_last_reader(tracr_shuffle_dyck_model, draws)
    refute(claim, "roles", "wrong layer", lambda c: c.holds(
        "the last reader bound on the search split is a layer-1 head", head[0] == 1,
        detail=roles.describe({"last_reader": head})))
