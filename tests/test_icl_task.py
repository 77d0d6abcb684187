"""Tests for circuits.tasks.icl (seed 003): the batched ridge against sklearn, the generator, the
baselines, and the analysis tools (context masking, probes, attention clustering), each against a
slow obvious version or a case with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from circuits.errors import InputError
from circuits.model.transformer import HookedTransformer
from circuits.tasks import icl


@pytest.fixture(scope="module")
def data() -> icl.ICLData:
    return icl.generate(3000, seed=5)


# --- ridge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("intercept", [True, False], ids=["intercept", "no_intercept"])
def test_batched_ridge_matches_sklearn(intercept):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 21, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(12, 5, 1, generator=g, dtype=torch.float64) + 0.7 + 0.5 * torch.randn(12, 21, 1, generator=g, dtype=torch.float64)
    y = y[..., 0]
    lambdas = (0.1, 0.8, 7.0)
    coef, b = icl.ridge_fit(x, y, lambdas, intercept=intercept)
    x_new = torch.randn(12, 4, 5, generator=g, dtype=torch.float64)
    preds = icl.ridge_predict(coef, b, x_new)
    assert coef.shape == (12, 3, 5) and b.shape == (12, 3) and preds.shape == (12, 4, 3)
    for i in range(12):
        for j, lam in enumerate(lambdas):
            sk = Ridge(alpha=lam, fit_intercept=intercept).fit(x[i].numpy(), y[i].numpy())
            np.testing.assert_allclose(coef[i, j].numpy(), sk.coef_, atol=1e-10, rtol=1e-10)
            np.testing.assert_allclose(float(b[i, j]), sk.intercept_, atol=1e-10, rtol=0)
            np.testing.assert_allclose(preds[i, :, j].numpy(), sk.predict(x_new[i].numpy()), atol=1e-10, rtol=1e-10)


def test_ridge_rejects_bad_input():
    x, y = torch.randn(2, 21, 5), torch.randn(2, 21)
    with pytest.raises(InputError, match="x \\[n, N, d\\]"):
        icl.ridge_fit(x, y[:, :20], (0.1,))
    for bad in ((), (-1.0,), (float("nan"),)):
        with pytest.raises(InputError, match="ridge strengths"):
            icl.ridge_fit(x, y, bad)


# --- the generator ---------------------------------------------------------------------------------
def test_sequences_have_the_seeds_token_layout(data):
    assert data.inputs.shape == (3000, 21, 3) and data.inputs.dtype == torch.float32
    assert data.targets.shape == (3000,) and data.lambdas == (0.1, 0.8)
    assert (data.inputs[:, -1, 2] == 0).all()  # the last y is hidden
    torch.testing.assert_close(data.targets, data.ys[:, -1].float())
    torch.testing.assert_close(data.inputs[:, :-1, 2], data.ys[:, :-1].float())
    torch.testing.assert_close(data.inputs[..., :2], data.preds.float())
    assert set(data.alphas.tolist()) == {0.1, 0.8}
    assert abs(float((data.alphas == 0.1).double().mean()) - 0.5) < 0.05
    split = data.to_split()
    assert split.inputs is data.inputs and split.targets is data.targets and split.lengths is None


def test_generation_is_deterministic_and_prefix_stable(monkeypatch):
    monkeypatch.setattr(icl, "CHUNK", 7)  # several chunks in a small call
    a, b, c = icl.generate(20, 3), icl.generate(20, 3), icl.generate(11, 3)
    for f in ("inputs", "targets", "alphas", "preds", "ys"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), atol=0, rtol=0)
        torch.testing.assert_close(getattr(c, f), getattr(a, f)[:11], atol=0, rtol=0)
    assert not torch.equal(icl.generate(20, 4).inputs, a.inputs)
    assert len(icl.generate(0, 1)) == 0


def test_noise_is_what_the_recipe_says():
    """With lambda = 0 and no intercept the ridge is least squares: the target's residual variance
    matches sigma^2 (1 + d / (N - d - 1)) for sigma = 0.8 a (least-squares prediction error)."""
    d = icl.generate(40_000, seed=2, alphas=(0.0,))
    assert d.noise_floor() == 0.0
    d = icl.generate(40_000, seed=2, alphas=(0.5,))
    sigma2 = (0.8 * 0.5) ** 2
    assert d.noise_floor() == pytest.approx(sigma2)
    # ridge with lambda 0.5 and an intercept: close to least squares with one more parameter
    expected = sigma2 * (1 + 6 / (21 - 6 - 1))
    assert float(d.ridge_sq_errors().mean()) == pytest.approx(expected, rel=0.05)


def test_reconstruction_reproduces_the_published_baselines():
    """The module docstring's reconstruction: with alphas (0.1, 0.5) the ridge and oracle MSEs land
    within 4% of the seed project's published 0.1196, 0.1262 and 0.1095."""
    d = icl.generate(100_000, seed=1, alphas=icl.PUBLISHED["alphas"])
    ridge = d.ridge_sq_errors().mean(0).tolist()
    for got, want in zip(ridge, icl.PUBLISHED["ridge"]):
        assert got == pytest.approx(want, rel=0.04)
    assert float(d.oracle_sq_errors().mean()) == pytest.approx(icl.PUBLISHED["oracle"], rel=0.04)
    assert d.noise_floor() == pytest.approx(0.5 * (0.08**2 + 0.4**2), rel=0.02)


def test_generate_rejects_bad_arguments():
    for kwargs in (dict(n=-1, seed=0), dict(n=3, seed=-2), dict(n=3, seed=True), dict(n=2.0, seed=0),
                   dict(n=3, seed=0, n_points=1), dict(n=3, seed=0, alphas=())):
        with pytest.raises(InputError):
            icl.generate(**kwargs)


# --- baselines -------------------------------------------------------------------------------------
def test_baselines_against_loops(data):
    sub = data.subset(slice(0, 40))
    ridge, oracle = sub.ridge_sq_errors(), sub.oracle_sq_errors()
    for i in range(40):
        errs = [(float(sub.preds[i, -1, j]) - float(sub.ys[i, -1])) ** 2 for j in range(2)]
        assert ridge[i].tolist() == pytest.approx(errs)
        assert float(oracle[i]) == pytest.approx(min(errs))
        for c in (0, 1, 5, 20):
            ctx = [sum((float(sub.preds[i, p, j]) - float(sub.ys[i, p])) ** 2 for p in range(20 - c, 20))
                   for j in range(2)]
            assert float(sub.running_error_difference(c)[i]) == pytest.approx(ctx[0] - ctx[1], abs=1e-9)
            pick = 0 if c == 0 or ctx[0] <= ctx[1] else 1
            assert float(sub.selector_sq_errors(c)[i]) == pytest.approx(errs[pick])
    assert sub.context_sq_errors(0).shape == (40, 0, 2)
    with pytest.raises(InputError, match="n_context"):
        sub.context_sq_errors(21)


def test_baselines_are_ordered(data):
    ridge = data.ridge_sq_errors().mean(0)
    oracle = float(data.oracle_sq_errors().mean())
    selector = float(data.selector_sq_errors().mean())
    assert data.noise_floor() < oracle < selector < float(ridge.min())
    # more context, better selection (on average)
    assert float(data.selector_sq_errors(20).mean()) < float(data.selector_sq_errors(2).mean())


# --- the zoo entry ---------------------------------------------------------------------------------
def test_zoo_entry_is_the_issues_architecture():
    from circuits.zoo.registry import get_entry

    entry = get_entry("icl")
    c = entry.config
    assert (c.n_layers, c.d_model, c.n_ctx, c.n_heads, c.d_head, c.d_mlp, c.d_input, c.d_vocab_out) == \
        (3, 64, 21, 2, 32, 256, 3, 1)
    assert (c.act_fn, c.normalization, c.attention, c.positional, c.readout, c.ln_eps) == \
        ("gelu_new", "LN", "causal", "learned", "last", 1e-5)
    assert entry.recipe.loss == "mse" and entry.recipe.threads == 1
    split = entry.make_split(10, 0)
    out = HookedTransformer(c)(split.inputs)
    assert out.shape == (10, 1)


# --- analysis tools --------------------------------------------------------------------------------
def small_model(seed: int = 0) -> HookedTransformer:
    from circuits.zoo.registry import get_entry
    from dataclasses import replace

    cfg = replace(get_entry("icl").config, seed=seed, init_range=0.3)
    return HookedTransformer(cfg).eval()


def slow_predict_with_context(model, x, n_context):
    """The obvious version: every position from the first visible one on gets -inf scores on the
    hidden keys, in every layer (earlier positions are never read by the query)."""
    lo = 20 - n_context

    def hide(scores, hook):
        scores = scores.clone()
        scores[:, :, lo:, :lo] = float("-inf")
        return scores

    hooks = [(f"blocks.{l}.attn.hook_attn_scores", hide) for l in range(3)] if lo else []
    with torch.no_grad():
        return model.run_with_hooks(x, fwd_hooks=hooks)[:, 0]


def test_context_masking_hides_exactly_the_early_tokens(data):
    model = small_model()
    x = data.inputs[:16]
    full = icl.predict_with_context(model, x, 20)
    with torch.no_grad():
        torch.testing.assert_close(full, model(x)[:, 0])
    for c in (0, 3, 12, 20):
        masked = icl.predict_with_context(model, x, c, batch_size=5)
        torch.testing.assert_close(masked, slow_predict_with_context(model, x, c), atol=1e-5, rtol=1e-5)
        changed = x.clone()
        changed[:, : 20 - c] = torch.randn_like(changed[:, : 20 - c]) * 5  # hidden tokens: no effect
        torch.testing.assert_close(icl.predict_with_context(model, changed, c), masked, atol=1e-5, rtol=1e-5)
        if c:  # the visible ones do matter
            seen = x.clone()
            seen[:, 20 - c] += 3.0
            assert not torch.allclose(icl.predict_with_context(model, seen, c), masked)
    assert icl.context_padding_mask(2, 21, 3).sum(1).tolist() == [17, 17]
    with pytest.raises(InputError, match="n_context"):
        icl.predict_with_context(model, x, 21)


def test_last_position_residuals_shape_and_values(data):
    model = small_model()
    R = icl.last_position_residuals(model, data.inputs[:10], batch_size=4)
    assert R.shape == (4, 10, 64)
    _, cache = model.run_with_cache(data.inputs[:10])
    torch.testing.assert_close(R[1], cache["blocks.1.hook_resid_pre"][:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(R[3], cache["blocks.2.hook_resid_post"][:, -1], atol=1e-4, rtol=1e-4)  # other hooks: explicit path


def test_probe_r2_on_known_answers():
    g = np.random.default_rng(0)
    X = g.normal(size=(2000, 10))
    y = X @ g.normal(size=10) + 0.1 * g.normal(size=2000)
    assert icl.probe_r2(X, y) > 0.99
    assert icl.probe_r2(X, g.normal(size=2000)) < 0.02
    # held out: a probe that memorises cannot score on fresh rows
    X_wide = g.normal(size=(60, 50))
    assert icl.probe_r2(X_wide, g.normal(size=60), alpha=1e-6) < 0.2
    with pytest.raises(InputError):
        icl.probe_r2(X, y[:10])


def test_cluster_rows_finds_planted_clusters():
    g = np.random.default_rng(1)
    centres = np.eye(3, 8) * 5
    truth = np.repeat(np.arange(3), 50)
    rows = centres[truth] + 0.3 * g.normal(size=(150, 8))
    labels, k, scores = icl.cluster_rows(rows, k_values=range(2, 6))
    assert k == 3 and set(scores) == {2, 3, 4, 5} and scores[3] == max(scores.values())
    # same partition up to renaming
    assert len({(a, b) for a, b in zip(truth, labels)}) == 3
    with pytest.raises(InputError, match="k values"):
        icl.cluster_rows(rows[:4], k_values=range(2, 6))


def test_cluster_probe_accuracy_against_known_answers():
    g = np.random.default_rng(2)
    X = g.normal(size=(600, 4))
    labels = (X[:, 0] + X[:, 1] > 0).astype(int)
    correct, majority = icl.cluster_probe(X, labels)
    assert correct.shape == (600,) and float(correct.mean()) > 0.95 and 0.4 < majority < 0.6
    correct, _ = icl.cluster_probe(X, g.permutation(labels))
    assert abs(float(correct.mean()) - 0.5) < 0.08
    with pytest.raises(InputError, match="classes"):
        icl.cluster_probe(X, np.zeros(600))


def test_foreign_context_moves_only_the_context(data):
    sub = data.subset(slice(0, 50))
    foreign = sub.with_foreign_context(1)
    assert torch.equal(foreign.inputs[:, -1], sub.inputs[:, -1])  # the query token is each sequence's own
    assert torch.equal(foreign.inputs[:, :-1], torch.cat([sub.inputs[1:, :-1], sub.inputs[:1, :-1]]))
    assert all(not torch.equal(foreign.inputs[i, :-1], sub.inputs[i, :-1]) for i in range(len(sub)))
    for name in ("targets", "alphas", "preds", "ys"):
        assert torch.equal(getattr(foreign, name), getattr(sub, name))
    assert torch.equal(sub.with_foreign_context(-1).inputs[1:, :-1], sub.inputs[:-1, :-1])
    for bad in (0, 50, True, 1.0):
        with pytest.raises(InputError, match="foreign context"):
            sub.with_foreign_context(bad)
    with pytest.raises(InputError, match="foreign context"):
        sub.subset(slice(0, 1)).with_foreign_context(1)
