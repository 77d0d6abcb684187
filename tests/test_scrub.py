"""Identities of circuits.analysis.scrub on a perturbed random bracket-architecture model (no checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.analysis import scrub as S
from circuits.claims.core import Claims
from circuits.errors import ScrubError
from circuits.tasks.brackets import data as B
from model_configs import perturbed_model


@pytest.fixture(scope="module")
def data():
    return B.generate(600, seed=3)


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["f32", "f64"])
def setup(request, data):
    model = perturbed_model("brackets", dtype=request.param)
    return model, S.ScrubData(model, data.toks, data.isbal.long())


def _every_position(width):
    return {**{p: S.Path(S.EXACT) for p in range(width)}, "mask": S.Path(S.EXACT)}


def test_recomposed_clean_logits_equal_the_model(setup, data):
    model, sd = setup
    with torch.no_grad():
        direct = model(data.toks)
    tol = 1e-5 if sd.final_resid.dtype == torch.float32 else 1e-10
    assert float((sd.clean_logits - direct).abs().max()) <= tol * max(1.0, float(direct.abs().max()))


def test_identity_hypothesis_recovers_exactly_all(setup):
    model, sd = setup
    r = S.scrub(model, sd, hypotheses=[S.Hypothesis.identity(model)], n_draws=3)[0]
    assert abs(r.scrubbed.point - r.clean) <= 1e-6
    assert abs(r.normalised.point - 1) <= 1e-5 and abs(r.recovered.point - (1 - r.clean / r.baseline.point)) <= 1e-6


def test_identity_through_recursive_head_inputs(setup):
    """Every head's input rebuilt position by position (and component by component) from the input
    itself gives the clean run: the head recomputation equals the model's."""
    model, sd = setup
    width = sd.width
    comp = {p: S.Path(S.EXACT, {c: S.Path(S.EXACT) for c in S.final_labels(model, 2)}) for p in range(width)}
    paths = {label: S.Path(S.EXACT) for label in S.final_labels(model)}
    paths["L2H0"] = S.Path(S.EXACT, _every_position(width))
    paths["L2H1"] = S.Path(S.EXACT, {**comp, "mask": S.Path(S.EXACT)})
    paths["L1H0"] = S.Path(S.EXACT, {**_every_position(width),
                                     1: S.Path(S.EXACT, {"L0H0": S.Path(S.EXACT, _every_position(width)),
                                                         "embed": S.Path(S.EXACT), "pos_embed": S.Path(S.EXACT),
                                                         "L0H1": S.Path(S.EXACT), "L0.mlp": S.Path(S.EXACT),
                                                         "biases": S.Path(S.EXACT)})})
    r = S.scrub(model, sd, hypotheses=[S.Hypothesis("deep identity", paths)], n_draws=2)[0]
    tol = 1e-6 if sd.final_resid.dtype == torch.float32 else 1e-12
    assert abs(r.scrubbed.point - r.clean) <= tol


def test_resampling_everything_recovers_exactly_nothing(setup):
    """Naming no path: every path reads the root's one random input, which is the input the
    random-logit baseline scores, so scrubbed loss == baseline loss in every draw: recovered 0."""
    model, sd = setup
    r = S.scrub(model, sd, hypotheses=[S.Hypothesis("nothing", {})], n_draws=4)[0]
    np.testing.assert_allclose(r.scrubbed_draws, r.baseline_draws, rtol=1e-5, atol=1e-6)
    assert abs(r.recovered.point) <= 1e-5 and abs(r.normalised.point) <= 1e-5
    assert r.baseline.point > r.clean  # a random input's logits are worse than the input's own


def test_unconditional_paths_match_the_baseline_in_expectation(setup):
    """Every component from its own random input: not the same draw as the baseline, but the same
    distribution only if nothing were shared; here it must be far from the clean loss."""
    model, sd = setup
    hyp = S.Hypothesis("all random", {label: S.Path(S.RANDOM) for label in S.final_labels(model)})
    r = S.scrub(model, sd, hypotheses=[hyp], n_draws=3)[0]
    assert r.normalised.point < 0.5


def _attend_reference(model, layer, head, x, qpos, pad):
    """One head run on an assembled input residual x [n, pos, d]: LayerNorm and projections at
    every position (what scrub computed before it gathered the clean rows' keys and values)."""
    block, attn = model.blocks[layer], model.blocks[layer].attn
    h = block.ln1(x)
    q = h[torch.arange(len(x)), qpos] @ attn.W_Q[head] + attn.b_Q[head]
    k = h @ attn.W_K[head] + attn.b_K[head]
    v = h @ attn.W_V[head] + attn.b_V[head]
    scores = torch.einsum("nd,npd->np", q, k) / attn.d_head ** 0.5
    blocked = pad.clone()
    blocked &= ~blocked.all(-1, keepdim=True)
    pattern = scores.masked_fill(blocked, float("-inf")).softmax(-1)
    return torch.einsum("np,npd->nd", pattern, v) @ attn.W_O[head]


@pytest.mark.parametrize("moved", [[3], [0, 5], "all"])
def test_head_from_gathered_clean_rows_equals_the_head_on_the_assembled_residual(setup, moved):
    """A scrubbed head's keys and values are gathered from the clean rows' (ScrubData.head_inputs)
    and recomputed only at composed positions: the same as running the head on the residual
    assembled from those rows, at every query position, with few or all positions moved."""
    model, sd = setup
    n, width = sd.n, sd.width
    g = torch.Generator().manual_seed(4)
    rest = torch.randint(n, (n,), generator=g)
    moved = list(range(width)) if moved == "all" else moved
    source = rest[:, None].repeat(1, width)
    for p in moved:
        source[:, p] = torch.randint(n, (n,), generator=g)
    resid = sd.resid_in(2)
    x_1 = resid[torch.randint(n, (n,), generator=g), 1] + 0.3 * torch.randn(n, resid.shape[-1], generator=g,
                                                                               dtype=resid.dtype)
    qpos = torch.randint(width, (n,), generator=g)
    qpos[:50] = 1  # some queries at the composed position
    pad = sd.pad[torch.randint(n, (n,), generator=g)]
    x = resid[source, torch.arange(width)[None, :]]
    x[:, 1] = x_1
    tol = dict(atol=1e-6, rtol=1e-5) if resid.dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    draw = S._Draw(sd, g)
    with torch.no_grad():
        for head in (0, 1):
            want = _attend_reference(model, 2, head, x, qpos, pad)
            got = draw._attend(2, head, source, {1: x_1}, qpos, pad, (rest, set(moved)))
            torch.testing.assert_close(got, want, **tol)
            torch.testing.assert_close(draw._attend(2, head, source, {1: x_1}, qpos, pad), want, **tol)


def test_samplers_return_agreeing_examples(data):
    gen = torch.Generator().manual_seed(0)
    for feature in (data.isbal, data.lengths, B.horizon_features(data.toks)[:, 5], torch.stack(
            [data.isbal, data.starts_open], 1)):
        src = S.sample_agreeing(feature, gen)
        assert torch.equal(feature[src], feature)
        like = torch.randint(len(data), (len(data),), generator=gen)
        assert torch.equal(feature[S.sample_agreeing(feature, gen, like)], feature[like])
    # not just the example itself: classes with many members are sampled across
    src = S.sample_agreeing(data.isbal, gen)
    assert float((src != torch.arange(len(data))).float().mean()) > 0.9


def test_samplers_are_seeded():
    f = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    a = S.sample_agreeing(f, torch.Generator().manual_seed(5))
    b = S.sample_agreeing(f, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_approx_equal_to_the_component_leaves_no_remainder(setup):
    """phi + (output - phi): with phi = the component's own output the unnamed remainder (read from
    a random input) is exactly zero, so the result is the component read on phi's source."""
    model, sd = setup
    phi = sd.output("L0H0")[:, 1].clone()  # [n, d_model]
    paths = {label: S.Path(S.EXACT) for label in S.final_labels(model)}
    at_1 = {c: S.Path(S.EXACT) for c in S.final_labels(model, 2)}  # a position's unnamed parts are random
    at_1["L0H0"] = S.Path(S.EXACT, approx=S.Approx(phi, S.EXACT))
    paths["L2H0"] = S.Path(S.EXACT, {**_every_position(sd.width), 1: S.Path(S.EXACT, at_1)})
    r = S.scrub(model, sd, hypotheses=[S.Hypothesis("phi = output", paths)], n_draws=2)[0]
    tol = 1e-6 if sd.final_resid.dtype == torch.float32 else 1e-12
    assert abs(r.scrubbed.point - r.clean) <= tol
    wrong = S.Approx(torch.zeros_like(phi), S.EXACT)  # phi = 0: the whole output is the random remainder
    at_1["L0H0"] = S.Path(S.EXACT, approx=wrong)
    paths["L2H0"] = S.Path(S.EXACT, {**_every_position(sd.width), 1: S.Path(S.EXACT, at_1)})
    r = S.scrub(model, sd, hypotheses=[S.Hypothesis("phi = 0", paths)], n_draws=2)[0]
    assert abs(r.scrubbed.point - r.clean) > tol


@pytest.mark.parametrize("bad, message", [
    ({"L9H0": S.Path(S.EXACT)}, "unknown component 'L9H0'"),
    ({"2.O": S.Path(S.EXACT)}, "unknown component"),
    ({"L2H0": S.Path(torch.zeros(5))}, "one value per example"),
    ({"L2H0": S.Path("sometimes")}, "neither an array nor EXACT"),
    ({"L2H0": S.Path(S.EXACT, {99: S.Path(S.EXACT)})}, "keyed by position"),
    ({"L2.mlp": S.Path(S.EXACT, {1: S.Path(S.EXACT)})}, "only attention heads' inputs"),
    ({"L2H0": S.Path(S.EXACT, {1: S.Path(S.EXACT, {"L2H1": S.Path(S.EXACT)})})}, "unknown component 'L2H1'"),
    ({"L2H0": S.Path(torch.full((600,), float("nan")))}, "NaN"),
])
def test_bad_hypotheses_raise_clear_errors(setup, bad, message):
    model, sd = setup
    with pytest.raises(ScrubError, match=message):
        S.scrub(model, sd, hypotheses=[S.Hypothesis("bad", bad)], n_draws=1)


def test_bad_data_raise_clear_errors(data):
    model = perturbed_model("brackets")
    with pytest.raises(ScrubError, match="labels must be"):
        S.ScrubData(model, data.toks, data.isbal[:-1].long())
    with pytest.raises(ScrubError, match="n_draws"):
        S.scrub(model, data.toks, data.isbal.long(), [S.Hypothesis("x", {})], n_draws=0)
    last = perturbed_model("causal_padded")
    ragged = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0], [1, 2, 3, 0]])  # pad 0: rows read out at 3, 1, 2
    with pytest.raises(ScrubError, match="same position in every row"):
        S.ScrubData(last, ragged, torch.zeros(3))
    S.ScrubData(last, torch.ones(3, 4, dtype=torch.long), torch.zeros(3))  # one length: the last position lines up


def test_component_names():
    labels = S.final_labels(perturbed_model("brackets"))
    assert S.component_label("2.1", labels) == "L2H1"
    assert S.component_label("a1.h0", labels) == "L1H0"
    assert S.component_label("m2", labels) == "L2.mlp"
    with pytest.raises(ScrubError, match="did you mean"):
        S.component_label("L2.mpl", labels)


def test_scrub_claim_records_losses_and_fails_below_threshold(setup):
    model, sd = setup
    r = S.scrub(model, sd, hypotheses=[S.Hypothesis("nothing", {})], n_draws=3)[0]
    claims = Claims(raise_on_failure=False)
    rec = S.scrub_claim(claims, "nothing", r, 0.5)
    assert not rec.passed and "random-logit baseline" in rec.note and rec.ci is not None
    rec = S.scrub_control_claim(claims, "nothing as control", r, 0.5)
    assert rec.passed


def test_originators_style_distribution():
    d = B.generate_originators_style(20_000, seed=0)
    assert abs(float(d.isbal.float().mean()) - 0.26) < 0.01
    unbalanced = ~d.isbal
    assert abs(float((~d.starts_open[unbalanced]).float().mean()) - 0.5) < 0.03
    assert bool((d.lengths % 2 == 0).all()) and int(d.lengths.min()) == 2 and int(d.lengths.max()) == 40
    assert torch.equal(d.toks, B.generate_originators_style(20_000, seed=0).toks)


def test_bracket_scrubbing_features():
    d = B.BracketData.from_strings(["()", ")(", "(()", "(())()"])
    assert B.count_test(d.toks).tolist() == [True, True, False, True]
    assert B.horizon_test(d.toks).tolist() == (~d.negative_failure).tolist()
    feats = B.horizon_features(d.toks)
    # "(()": position 1 suffix "(()" has 2/3 open -> -2; position 2 "()" -> 2; end after ")" -> 1
    assert feats[2, :5].tolist() == [-2, -2, 2, 2, 1]
    assert feats[0, 4:].tolist() == [0] * (d.toks.shape[1] - 4)  # padding
    assert feats[1, 3].item() == -1  # the end token after "("


def test_wrong_variants_replace_each_feature_and_each_head(setup, data):
    model, sd = setup
    count, horizon = B.count_test(data.toks), B.horizon_test(data.toks)
    hyp = S.Hypothesis("1b", {"1.0": S.Path(count, {1: S.Path(count, {"0.0": S.Path(data.starts_open)})}),
                              "2.1": S.Path(horizon)})
    variants = S.wrong_variants(hyp, model, seed=1)
    names = [v.hypothesis.name for v in variants]
    assert names[:3] == ["1b | L1H0 reads an independent feature",
                         "1b | L1H0's input 1: L0H0 reads an independent feature",
                         "1b | L2H1 reads an independent feature"]
    # 1.0 reads a layer-0 component: only heads of layer >= 1 may replace it; 2.1 reads nothing named
    assert [n for n in names if "L1H0 replaced" in n] == ["1b | L1H0 replaced by L1H1", "1b | L1H0 replaced by L2H0"]
    nearest = [v.hypothesis.name for v in S.wrong_variants(hyp, model, replace_heads="nearest") if "replaced" in v.hypothesis.name]
    assert nearest == ["1b | L1H0 replaced by L1H1", "1b | L2H1 replaced by L2H0"]
    assert sum("L2H1 replaced" in n for n in names) == 4
    assert "1b | L1H0 and L2H1 exchange features" in names
    shuffled = variants[0].hypothesis.paths["1.0"].feature
    assert sorted(shuffled.tolist()) == sorted(count.tolist()) and not torch.equal(shuffled, count)
    assert variants[1].touches == frozenset({"L1H0", "L0H0"})


def test_margin_over_variants_is_paired_over_draws(setup, data):
    model, sd = setup
    ident = S.Hypothesis.identity(model)
    results = S.scrub(model, sd, hypotheses=[ident, S.Hypothesis("nothing", {})], n_draws=4, seed=2)
    est, best = S.margin_over(results[0], results[1:])
    # naming nothing recovers exactly 0, so the margin over it is the identity's own recovery
    assert best.name == "nothing" and best.recovered.point == pytest.approx(0.0, abs=1e-12)
    assert est.point == pytest.approx(results[0].recovered.point, abs=1e-12)
    claims = Claims(raise_on_failure=False)
    rec = S.scrub_beats_variants_claim(claims, "identity", results[0], results[1:], 0.05)
    assert rec.passed and all(r.passed for r in claims.records)
    other_seed = S.scrub(model, sd, hypotheses=[S.Hypothesis("nothing", {})], n_draws=4, seed=3)
    with pytest.raises(ScrubError, match="same draws"):
        S.margin_over(results[0], other_seed)


def test_a_hypothesis_holds_only_above_its_bar_and_its_wrong_variants(setup):
    model, sd = setup
    ident, nothing = S.scrub(model, sd, hypotheses=[S.Hypothesis.identity(model), S.Hypothesis("nothing", {})],
                             n_draws=4, seed=2)
    claims = Claims(raise_on_failure=False)
    S.scrub_holds_claim(claims, "identity", ident, 0.0, [nothing], 0.05)
    assert all(r.passed for r in claims.records) and "best wrong variant nothing" in claims.records[0].note
    claims = Claims(raise_on_failure=False)
    S.scrub_holds_claim(claims, "identity", ident, ident.recovered.point + 0.01, [nothing], 0.05)  # bar too high
    assert not claims.records[0].passed
    claims = Claims(raise_on_failure=False)
    S.scrub_holds_claim(claims, "nothing", nothing, 0.0, [ident], 0.0)  # a wrong variant does better
    assert not any(r.passed for r in claims.records)
    claims = Claims(raise_on_failure=False)
    never = lambda: pytest.fail("variants scrubbed although the recovery is below the bar")  # noqa: E731
    rec = S.scrub_holds_claim(claims, "identity", ident, ident.recovered.hi + 0.01, never, 0.05)
    assert not rec.passed and "not scrubbed" in rec.note


def test_a_scrub_shares_head_outputs_between_hypotheses_with_the_same_numbers(setup, data, monkeypatch):
    """Within one scrub call, a recomputed head output is handed out again (``_HeadMemo``) where another
    hypothesis asks for the same head, query position, Path object, input rows and generator state:
    a hypothesis and its wrong variants, scrubbed together, get exactly what each scrubbed alone with
    nothing shared gets (and the short cut is taken)."""
    model, sd = setup
    count, horizon = B.count_test(data.toks), B.horizon_test(data.toks)
    at_1 = {1: S.Path(count, {"0.0": S.Path(data.starts_open), "embed": S.Path(data.starts_open)})}
    phi = sd.output("L0H0")[:, 1].clone()
    at_1b = {1: S.Path(count, {"0.0": S.Path(data.starts_open, approx=S.Approx(phi, data.open_proportion)),
                               "embed": S.Path(data.starts_open)})}
    feats = B.horizon_features(data.toks)
    per_pos = {**{p: S.Path(feats[:, p]) for p in range(sd.width)}, "mask": S.Path(data.lengths)}
    hyps = []
    for name, paths in (("2a", {"1.0": S.Path(count, at_1), "2.0": S.Path(count, at_1), "2.1": S.Path(horizon)}),
                        ("2b", {"1.0": S.Path(count, at_1b), "2.0": S.Path(count, at_1b), "2.1": S.Path(horizon)}),
                        ("3a", {"1.0": S.Path(count), "2.1": S.Path((feats >= 0).all(-1), per_pos)})):
        hyp = S.Hypothesis(name, paths)
        hyps += [hyp] + [v.hypothesis for v in S.wrong_variants(hyp, model, seed=3, replace_heads="nearest")]
    memos = []
    real = S._HeadMemo

    class Counted(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            memos.append(self)

    monkeypatch.setattr(S, "_HeadMemo", Counted)
    together = S.scrub(model, sd, hypotheses=hyps, n_draws=2, seed=5)
    assert memos[-1].hits > 0 and memos[-1].misses > 0
    monkeypatch.setattr(S, "_HeadMemo", lambda: real(size=0))  # nothing kept: every head recomputed
    for hyp, want in zip(hyps, together):
        alone = S.scrub(model, sd, hypotheses=[hyp], n_draws=2, seed=5)[0]
        assert alone.name == want.name
        np.testing.assert_array_equal(alone.scrubbed_examples, want.scrubbed_examples)
        np.testing.assert_array_equal(alone.baseline_examples, want.baseline_examples)
        assert (alone.recovered.point, alone.recovered.lo, alone.recovered.hi) == \
            (want.recovered.point, want.recovered.lo, want.recovered.hi)
    # and the draw without any memo (the head recomputed in place) gives the same residual
    hyp = hyps[0]
    with torch.no_grad():
        outs = []
        for memo in (None, real()):
            draw = S._Draw(sd, torch.Generator().manual_seed(9), memo)
            rest = draw.random()
            outs.append(draw.final_resid(hyp, rest))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_components_are_kept_at_the_positions_scrubs_read(setup):
    """``component_at_position`` is ``component(label, layer)[:, p]`` exactly, and a head's output at
    every position is not kept (computed again, to the same numbers, when asked for)."""
    model, sd = setup
    for label, layer in (("L0H0", None), ("L1H1", 2), ("embed", None), ("pos_embed", 1), ("biases", 1),
                         ("biases", None), ("L0.mlp", 2)):
        for p in (0, 1, sd.width - 1):
            got = sd.component_at_position(label, layer, p)
            assert got.is_contiguous() and got is sd.component_at_position(label, layer, p)
            torch.testing.assert_close(got, sd.component(label, layer)[:, p], rtol=0, atol=0)
    assert "L0H0" not in sd._outputs
    torch.testing.assert_close(sd.output("L0H0"), sd.output("L0H0"), rtol=0, atol=0)


def test_the_bracket_hypotheses_built_in_part_are_those_of_the_whole_set():
    """scrub_hypotheses(names=...) builds only those hypotheses (3b's adjusted proportion runs the
    model), each with the same features, the shuffled control's included, as the whole set has."""
    from circuits.tasks.brackets.scrubbing import scrub_hypotheses
    from model_configs import perturbed_model

    model = perturbed_model("brackets")
    d = B.generate(300, seed=4)
    whole = scrub_hypotheses(model, d, ["L1H0", "L2H0"], "L2H1", seed=6)

    def leaves(node):
        out = [node.feature] + ([node.approx.values, node.approx.feature] if node.approx else [])
        for child in node.inputs.values():
            out += leaves(child)
        return out

    for names in (["1b"], ["3a", "2b"], ["3b"]):
        part = scrub_hypotheses(model, d, ["L1H0", "L2H0"], "L2H1", seed=6, names=names)
        assert list(part) == [k for k in whole if k.split()[0] in names]
        for k, hyp in part.items():
            assert list(hyp.paths) == list(whole[k].paths)
            for head, node in hyp.paths.items():
                for a, b in zip(leaves(node), leaves(whole[k].paths[head]), strict=True):
                    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    with pytest.raises(ValueError, match="unknown hypotheses"):
        scrub_hypotheses(model, d, ["L1H0"], "L2H1", names=["4a"])


def test_a_mutants_run_from_its_first_changed_block_equals_its_full_run(setup, data):
    """ScrubData(like=the unmutated model's) takes the blocks before the mutated one from it and runs
    the rest (start_at_layer): every kept activation, the read-out residual and the clean logits
    equal the mutant's full run bit for bit; a hooked model, other tokens or other batches run it all."""
    from circuits.analysis.interventions import mean_ablate_head, swap_heads, zero_ablate_head

    model, _ = setup
    toks, labels = data.toks, data.isbal.long()
    small = S.ScrubData(model, toks, labels, batch_size=256)
    for mutant, start in ((zero_ablate_head(model, 0, 1), 0), (zero_ablate_head(model, 1, 0), 1),
                          (swap_heads(model, 2, 0), 2), (model, 0)):
        assert S._shared_layers(mutant, toks, 256, small) == start
        fast = S.ScrubData(mutant, toks, labels, batch_size=256, like=small)
        full = S.ScrubData(mutant, toks, labels, batch_size=256)
        assert fast._cache.keys() == full._cache.keys()
        for k in full._cache:
            assert torch.equal(fast._cache[k], full._cache[k]), k
        assert torch.equal(fast.final_resid, full.final_resid) and torch.equal(fast.clean_logits, full.clean_logits)
        r_fast, r_full = (S.scrub(mutant, sd, hypotheses=[S.Hypothesis("1.0", {"1.0": S.Path(data.isbal)})],
                                  n_draws=2, seed=1)[0] for sd in (fast, full))
        np.testing.assert_array_equal(r_fast.scrubbed_examples, r_full.scrubbed_examples)
    hooked = mean_ablate_head(model, 2, 0, toks[:50])
    assert S._shared_layers(hooked, toks, 256, small) == 0
    assert S._shared_layers(zero_ablate_head(model, 2, 0), toks, 1000, small) == 0  # other batches
    assert S._shared_layers(zero_ablate_head(model, 2, 0), toks.flip(0), 256, small) == 0  # other tokens
    assert S._shared_layers(zero_ablate_head(model, 2, 0), toks, 256, small) == 2


def test_the_run_copied_batch_by_batch_is_run_in_batches(setup, data):
    """ScrubData copies each batch's activations into the whole tensors (no list and concatenation):
    the same numbers as measures.run_in_batches, and the final residual its rows at the read-out."""
    from circuits.analysis.measures import run_in_batches

    model, _ = setup
    sd = S.ScrubData(model, data.toks, data.isbal.long(), batch_size=256)
    names = list(sd._cache) + [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    cache = run_in_batches(model, data.toks, names=names, batch_size=256)
    for k in sd._cache:
        assert torch.equal(sd._cache[k], cache[k]), k
    assert torch.equal(sd.final_resid, cache[names[-1]][sd.rows, sd.readout])
