"""Library tests for seed 004: the model family, the laws, exact quantities, baselines, trainer, store."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from circuits.tasks.assoc.model import AssocConfig, all_contexts, build_model, table_logits
from circuits.errors import ConfigError, InputError
from circuits.model.transformer import HookedTransformer
from circuits.zoo.store import MissingCheckpointError, ModelStore, StaleCheckpointError, save_reference, spec_key
from circuits.zoo import registry as zoo
from circuits.tasks import assoc as A

SWITCHES = [
    {},
    {"residual": False},
    {"qk_input": "position"},
    {"qk_input": "token"},
    {"ov_input": "position"},
    {"ov_input": "token"},
    {"qk_input": "position", "ov_input": "position"},
    {"qk_input": "token", "ov_input": "position"},
    {"pos_in_residual": False},
    {"pos_in_residual": False, "qk_input": "token", "residual": False},
    {"d_mlp": 12, "mlp_depth": 3},
    {"d_mlp": 8, "normalization": "LN", "biases": True},
]


def small(**kw) -> AssocConfig:
    # d != d_h: the switches are ours, on our per-head form (the authors' shared maps are tested below)
    base = dict(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=1, head_maps="per_head")
    base.update(kw)
    return AssocConfig(**base)


def _randomise_biases(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or ".b_" in name or name.startswith("unembed.b"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))


# --- the model family ----------------------------------------------------------------------------


def test_default_member_is_exactly_our_hooked_transformer():
    model = build_model(small())
    plain = HookedTransformer(model.acfg.transformer_config())
    plain.load_state_dict(model.state_dict())
    x = all_contexts(7, 2)
    assert torch.equal(model(x), plain(x))
    assert set(model.state_dict()) == set(plain.state_dict())  # TL keys: W_E, W_pos, W_Q, ..., W_U
    for name in ("hook_embed", "hook_pos_embed", "blocks.0.attn.hook_q", "blocks.0.attn.hook_pattern",
                 "blocks.0.attn.hook_z", "blocks.0.attn.hook_result", "blocks.0.hook_attn_out",
                 "blocks.0.hook_resid_post"):
        assert name in model.hook_dict


@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_table_logits_equal_the_forward(S, switches):
    model = build_model(small(n_ctx=S, **switches)).double()
    if model.acfg.biases:
        _randomise_biases(model)
    x = all_contexts(7, S)
    assert torch.allclose(table_logits(model), model(x), atol=1e-10, rtol=0)
    # and the explicit (hooked) path computes the same
    _, cache = model.run_with_cache(x, names=["blocks.0.attn.hook_pattern"])
    assert cache["blocks.0.attn.hook_pattern"].shape == (7 ** S, 3, S, S)


@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("switches", SWITCHES + [dict(head_maps="shared", d_head=2, pos_in_residual=False)],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_table_logits_on_rows_equal_the_forward_on_those_contexts(S, switches):
    """The sampled-batch path (`rows`, repeats allowed): the forward's logits of those contexts."""
    model = build_model(small(n_ctx=S, **switches)).double()
    if model.acfg.biases:
        _randomise_biases(model)
    x = all_contexts(7, S)
    rows = torch.randint(0, 7 ** S, (40,), generator=torch.Generator().manual_seed(S))
    rows[1] = rows[0]
    assert torch.allclose(table_logits(model, rows), model(x[rows]), atol=1e-10, rtol=0)


def test_table_logits_on_rows_gradients_match_the_forward():
    model = build_model(small(d_mlp=12)).double()
    rows = torch.tensor([3, 3, 48, 0, 17])
    y = torch.tensor([1, 2, 3, 4, 5])
    torch.nn.functional.cross_entropy(model(all_contexts(7, 2)[rows]), y).backward()
    g1 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch.nn.functional.cross_entropy(table_logits(model, rows), y).backward()
    g2 = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2))


@pytest.mark.parametrize("rows, message", [(torch.tensor([0, 49]), "0..48"), (torch.tensor([-1]), "0..48"),
                                           (torch.zeros(2, 2, dtype=torch.long), "1-D integer"),
                                           (torch.tensor([0.0]), "1-D integer"), ([0, 1], "1-D integer")])
def test_table_logits_rejects_bad_rows(rows, message):
    with pytest.raises(InputError, match=message):
        table_logits(build_model(small()), rows)
    law = A.associations(7, 2)  # and so does context_logits on every path (the forward's, the low-rank one)
    for model in (build_model(small()), build_model(small(n_layers=2)), A.LowRank(7, 2, 3, seed=0)):
        with pytest.raises(InputError, match=message):
            A.context_logits(model, law, rows)


def test_table_logits_gradients_match_the_forward():
    model = build_model(small(qk_input="token")).double()
    x, y = all_contexts(7, 2), torch.arange(49) % 7
    torch.nn.functional.cross_entropy(model(x), y).backward()
    g1 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch.nn.functional.cross_entropy(table_logits(model), y).backward()
    g2 = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2))


def test_residual_switch_drops_the_direct_path():
    model = build_model(small(residual=False))
    x = all_contexts(7, 2)
    _, cache = model.run_with_cache(x, names=["blocks.0.hook_attn_out", "blocks.0.hook_resid_post"])
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.0.hook_attn_out"])
    with_res = build_model(small())
    _, c2 = with_res.run_with_cache(x, names=["hook_embed", "hook_pos_embed", "blocks.0.hook_attn_out",
                                              "blocks.0.hook_resid_post"])
    assert torch.allclose(c2["blocks.0.hook_resid_post"],
                          c2["hook_embed"] + c2["hook_pos_embed"] + c2["blocks.0.hook_attn_out"], atol=1e-6)


def test_position_only_queries_and_keys_give_a_token_independent_pattern():
    model = build_model(small(qk_input="position"))
    _, cache = model.run_with_cache(all_contexts(7, 2), names=["blocks.0.attn.hook_pattern"])
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern, pattern[:1].expand_as(pattern))
    plain = build_model(small())
    _, c2 = plain.run_with_cache(all_contexts(7, 2), names=["blocks.0.attn.hook_pattern"])
    assert not torch.allclose(c2["blocks.0.attn.hook_pattern"], c2["blocks.0.attn.hook_pattern"][:1])


def test_position_only_everything_without_residual_ignores_the_tokens():
    model = build_model(small(qk_input="position", ov_input="position", residual=False))
    logits = model(all_contexts(7, 2))
    assert torch.allclose(logits, logits[:1].expand_as(logits))


def test_token_only_values_do_not_read_positions():
    model = build_model(small(ov_input="token"))
    x = all_contexts(7, 2)
    _, cache = model.run_with_cache(x, names=["blocks.0.attn.hook_v"])
    W_V = model.blocks[0].attn.W_V  # [head, d_model, d_head]
    expected = torch.einsum("bpm,hme->bphe", model.embed.W_E[x], W_V)
    assert torch.allclose(cache["blocks.0.attn.hook_v"], expected, atol=1e-6)


def test_positions_outside_the_residual():
    model = build_model(small(pos_in_residual=False))
    x = all_contexts(7, 2)
    _, cache = model.run_with_cache(x, names=["hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_resid_post"])
    assert torch.allclose(cache["blocks.0.hook_resid_post"], cache["hook_embed"] + cache["blocks.0.hook_attn_out"],
                          atol=1e-6)


def test_no_biases_by_default_and_they_stay_zero_through_training():
    model = build_model(small())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"blocks.0.attn.b_QKV", "blocks.0.attn.b_O", "unembed.b_U"}
    law = A.power_unif_law([1, 1, 0.7], [7, 7, 7], 7, seed=0)
    A.train_assoc(model, law, A.AssocRecipe(steps=20, lr=1e-2, eval_every=10), seed=0)
    assert all(float(p.abs().max()) == 0 for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("freeze", [("E",), ("QKV",), ("O",), ("U",), ("E", "pos", "QKV", "U")])
def test_freezing_keeps_the_named_groups_fixed(freeze):
    model = build_model(small(freeze=freeze))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = model.parameter_groups()
    frozen_ids = {id(p) for g in freeze for p in groups[g]}
    law = A.associations(7, 2, seed=0)
    A.train_assoc(model, law, A.AssocRecipe(steps=30, lr=1e-2, eval_every=10), seed=0)
    for name, p in model.named_parameters():
        if id(p) in frozen_ids:
            assert torch.equal(p, before[name]), name
        elif p.requires_grad:
            assert not torch.equal(p, before[name]), name


def test_everything_frozen_trains_nothing():
    model = build_model(small(freeze=A.FREEZERS["all"]))
    result = A.train_assoc(model, A.associations(7, 2), A.AssocRecipe(steps=10), seed=0)
    assert result.steps == 0 and "accuracy" in result.final


def test_torch_init_scales_and_seeds():
    cfg = small(n_heads=4, d_head=5, d_model=6)
    model = build_model(cfg)
    assert float(model.embed.W_E.detach().abs().max()) <= 1 / math.sqrt(6)
    assert float(model.blocks[0].attn.W_QKV.detach().abs().max()) <= math.sqrt(6 / (6 + 3 * 5))
    assert float(model.blocks[0].attn.W_O.detach().abs().max()) <= 1 / math.sqrt(5)
    same = build_model(cfg)
    other = build_model(replace(cfg, seed=2))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert not torch.equal(model.embed.W_E, other.embed.W_E)
    normal = build_model(replace(cfg, init="normal"))
    assert float(normal.embed.W_E.detach().std()) < 0.05


def test_deep_mlp_has_hidden_layers():
    model = build_model(small(d_mlp=8, mlp_depth=3))
    assert len(model.blocks[0].mlp.W_hidden) == 2
    assert "blocks.0.mlp.hook_post" in model.hook_dict


@pytest.mark.parametrize("bad, word", [
    (dict(n_heads=0), "n_heads"), (dict(qk_input="tokens"), "qk_input"), (dict(freeze=("W_E",)), "freeze"),
    (dict(mlp_depth=2), "mlp_depth"), (dict(init="xavier"), "init"), (dict(d_mlp=-1), "d_mlp"),
    (dict(freeze="E"), "freeze"),
])
def test_bad_configs_say_what_is_wrong(bad, word):
    with pytest.raises(ConfigError, match=word):
        small(**bad)


def test_bad_inputs():
    model = build_model(small(residual=False))
    with pytest.raises(InputError, match="n_ctx"):
        model(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(InputError, match="out of the vocabulary"):
        model(torch.full((2, 2), 9))
    with pytest.raises(InputError, match="one-layer"):
        table_logits(build_model(small(n_layers=2)))
    with pytest.raises(InputError, match="contexts of 2 tokens of 5"):
        A.train_assoc(model, A.associations(5, 2), A.AssocRecipe(steps=1), seed=0)


def test_config_round_trip_and_parameter_count():
    cfg = small(freeze=("U", "E"))
    assert cfg.freeze == ("E", "U")
    assert AssocConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        AssocConfig.from_dict({**cfg.to_dict(), "width": 3})
    paper = AssocConfig(d_vocab=50, n_ctx=2, d_model=10, n_heads=6, d_head=10)
    # E, pos, U and 4 d x d_h matrices per head; no biases
    assert paper.n_params(trainable_only=True) == 50 * 10 + 2 * 10 + 50 * 10 + 6 * 4 * 10 * 10


# --- laws and exact quantities -------------------------------------------------------------------


def test_power_unif_law_matches_its_definition():
    law = A.power_unif_law([1.0, 0.5, 0.8], [4, 3, 2], 5, seed=3)
    assert law.N == 5 and law.S == 2
    c0, c1, c2 = law.conditionals
    assert torch.allclose(c0.sort(descending=True).values, torch.tensor([0.25] * 4 + [0.0], dtype=A.DTYPE))
    base = torch.tensor([1, 0.5, 0.25, 0, 0], dtype=A.DTYPE)
    assert torch.allclose(c1.sort(-1, descending=True).values, (base / base.sum()).expand(5, 5))
    assert ((c2 > 0).sum(-1) == 2).all()
    assert not torch.equal(c1[0], c1[1])  # each row its own permutation
    again = A.power_unif_law([1.0, 0.5, 0.8], [4, 3, 2], 5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(law.conditionals, again.conditionals))
    assert A.make_law(law.spec).conditionals[2].equal(c2)


def test_last_position_law():
    law = A.last_position_law([10, 10], 10, k=0, p=0.95, seed=0)
    pi = law.next_token_probs()
    assert torch.allclose(pi.max(-1).values, torch.full((100,), 0.95, dtype=A.DTYPE))
    assert torch.allclose(pi.sum(-1), torch.ones(100, dtype=A.DTYPE))
    h_row = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05 / 9))
    assert law.entropy() == pytest.approx(h_row, abs=1e-12)
    skewed = A.last_position_law([10, 10], 10, k=8, p=0.95, seed=0)
    assert float(skewed.targets().float().mean()) < float(law.targets().float().mean())  # meta-law favours low ids


def test_rank_d_law_has_rank_d_log_probs():
    law = A.rank_d_law([6, 6], 6, 2, seed=1)
    L = law.next_token_probs().log()
    L = L - L.mean(-1, keepdim=True)
    s = torch.linalg.svdvals(L)
    assert s[1] > 1e-3 and s[2] < 1e-9
    almost = A.rank_d_law([6, 6], 6, 2, seed=1, tail=0.1)
    L2 = almost.next_token_probs().log()
    s2 = torch.linalg.svdvals(L2 - L2.mean(-1, keepdim=True))
    assert s2[2] > 1e-3


def test_associations_are_deterministic_uniform_bigrams():
    law = A.associations(50, 2, seed=0)
    assert law.is_deterministic and law.entropy() == 0.0
    assert torch.allclose(law.context_probs(), torch.full((2500,), 1 / 2500, dtype=A.DTYPE))
    counts = torch.bincount(law.targets(), minlength=50)
    assert counts.min() > 20 and counts.max() < 80  # 50 per token on average
    assert law.random_baseline() == pytest.approx(math.log(50))


def _brute_force(law: A.Law):
    """H, and the expected loss of given logits, by looping over every sequence."""
    N, S = law.N, law.S
    H = 0.0
    for seq in itertools.product(range(N), repeat=S + 1):
        p = 1.0
        for i in range(S + 1):
            p *= float(law.conditionals[i][seq[: i + 1]])
        if p > 0:
            q = float(law.conditionals[S][seq])
            H -= p * math.log(q)
    return H


@pytest.mark.parametrize("make", [
    lambda: A.power_unif_law([0.7, 0.9, 0.6], [3, 3, 3], 3, seed=0),
    lambda: A.last_position_law([2, 3], 3, k=1, p=0.8, seed=1),
    lambda: A.rank_d_law([3, 3], 3, 1, seed=2, scale=2.0),
    lambda: A.associations(3, 2, seed=4),
])
def test_entropy_and_baselines_against_brute_force(make):
    law = make()
    assert law.entropy() == pytest.approx(_brute_force(law), abs=1e-12)
    zeros = torch.zeros(law.N ** law.S, law.N)
    assert law.divergence(zeros) == pytest.approx(law.random_baseline(), abs=1e-12)
    oracle = law.next_token_probs().clamp_min(1e-300).log()
    assert law.divergence(oracle) == pytest.approx(0.0, abs=1e-9)
    expected_acc = float((law.context_probs() * law.next_token_probs().max(-1).values).sum())
    assert law.accuracy(oracle) == pytest.approx(expected_acc)


def test_sampling_matches_the_law():
    law = A.power_unif_law([1.0, 0.5, 0.5], [3, 3, 3], 3, seed=0)
    toks = law.sample(60_000, seed=0)
    joint = law.context_probs().reshape(3, 3)[..., None] * law.conditionals[2]
    freq = torch.zeros(3, 3, 3, dtype=A.DTYPE).index_put_(tuple(toks.t()), torch.ones(len(toks), dtype=A.DTYPE),
                                                          accumulate=True) / len(toks)
    assert float((freq - joint).abs().max()) < 0.01
    assert torch.equal(law.sample(50, seed=1), law.sample(50, seed=1))


def test_law_errors():
    with pytest.raises(InputError, match="normalised"):
        A.Law((torch.tensor([0.5, 0.6]), torch.full((2, 2), 0.5)))
    with pytest.raises(InputError, match="shape"):
        A.Law((torch.tensor([0.5, 0.5]), torch.full((3, 3), 1 / 3)))
    with pytest.raises(InputError, match="p must be"):
        A.last_position_law([3, 3], 3, 0, 1.5)
    with pytest.raises(InputError, match="logits must be"):
        A.associations(3).divergence(torch.zeros(4, 3))
    with pytest.raises(InputError, match="kind"):
        A.make_law({"kind": "zipf"})


def test_empirical_law_is_the_sample_frequencies():
    base = {"kind": "power_unif", "alphas": [1.0, 0.5, 0.5], "nb_tokens": [3, 3, 3], "N": 3, "seed": 0,
            "version": A.DATA_VERSION}
    law = A.empirical_law(base, 500, seed=7)
    toks = A.make_law(base).sample(500, seed=7)
    counts = torch.zeros(3, 3, 3, dtype=A.DTYPE).index_put_(tuple(toks.t()), torch.ones(500, dtype=A.DTYPE),
                                                            accumulate=True)
    joint = law.context_probs().reshape(3, 3)[..., None] * law.conditionals[2]
    assert torch.allclose(joint, counts / 500, atol=1e-12)
    assert A.make_law(law.spec).conditionals[2].equal(law.conditionals[2])  # rebuilt from its spec


def test_empirical_law_of_associations_keeps_the_table_and_weights_pairs_by_count():
    table = {"kind": "associations", "N": 6, "S": 2, "seed": 0, "version": A.DATA_VERSION}
    law = A.empirical_law(table, 50, seed=1)
    full = A.make_law(table)
    seen = law.support()
    assert law.is_deterministic and 0 < len(seen) < 36
    assert torch.equal(law.targets()[seen], full.targets()[seen])
    # a predictor right on exactly the most frequent pair scores that pair's frequency, not 1/|seen|
    w = law.context_probs()
    best = int(w.argmax())
    logits = torch.zeros(36, 6, dtype=A.DTYPE)
    logits[:, :] = torch.nn.functional.one_hot((full.targets() + 1) % 6, 6)  # wrong everywhere
    logits[best] = torch.nn.functional.one_hot(full.targets()[best], 6)
    assert law.accuracy(logits) == pytest.approx(float(w[best]))
    with pytest.raises(InputError, match="n must be"):
        A.empirical_law(table, 0)


def test_capacity_bound():
    assert A.capacity_bound(50, 1, 10, 10) == pytest.approx(0.02 + 0.98 * 20 / 2500)
    assert A.capacity_bound(50, 26, 10, 10) == pytest.approx(0.02 + 0.98 * 270 / 2500)
    assert A.capacity_bound(10, 20, 5, 5) == 1.0  # H d_h + d >= N^2: everything memorisable


# --- the low-rank baseline -----------------------------------------------------------------------


def test_low_rank_forward_indexes_contexts_row_major():
    lr = A.LowRank(4, 2, 3, seed=0)
    x = all_contexts(4, 2)
    assert torch.equal(lr(x), lr.all_logits())


def test_closed_form_is_exact_for_a_rank_d_law():
    law = A.rank_d_law([6, 6], 6, 3, seed=0)
    model = A.low_rank_closed_form(law, 3)
    with torch.no_grad():
        assert law.divergence(model.all_logits()) == pytest.approx(0.0, abs=1e-10)
        assert law.divergence(A.low_rank_closed_form(law, 2).all_logits()) > 1e-3


def test_closed_form_needs_positive_probabilities():
    with pytest.raises(InputError, match="no closed form"):
        A.low_rank_closed_form(A.associations(5), 2)


def test_fitting_improves_on_the_closed_form_and_the_optimum_decreases_with_rank():
    law = A.last_position_law([6, 6], 6, k=0, p=0.9, seed=0)
    cf = A.low_rank_closed_form(law, 2)
    with torch.no_grad():
        cf_div = law.divergence(cf.all_logits())
    _, fitted = A.fit_low_rank(law, 2, init=cf, steps=300, lbfgs_steps=100)
    assert fitted < cf_div
    optima = [A.low_rank_optimum(law, d, seeds=(0, 1), steps=300, lbfgs_steps=100).divergence for d in (1, 2, 3, 5)]
    assert all(b <= a + 1e-9 for a, b in zip(optima, optima[1:]))
    assert optima[-1] < 1e-4  # rank N - 1 = 5 represents any conditional
    assert optima[0] <= law.random_baseline()


def test_deterministic_laws_have_a_zero_low_rank_optimum():
    """With d >= 2 the unembeddings can sit on a circle, so every target can win by any margin."""
    law = A.associations(6, 2, seed=0)
    assert A.low_rank_optimum(law, 2, seeds=(0,), steps=500, lbfgs_steps=200).divergence < 1e-3


# --- training, experiments and the store ---------------------------------------------------------


def test_training_is_deterministic_and_reduces_the_exact_divergence():
    law = A.power_unif_law([1, 1, 0.6], [5, 5, 5], 5, seed=0)
    recipe = A.AssocRecipe(steps=60, lr=1e-2, eval_every=20)
    m1, m2 = build_model(small(d_vocab=5)), build_model(small(d_vocab=5))
    before = A.evaluate(m1, law)["divergence"]
    r1 = A.train_assoc(m1, law, recipe, seed=0)
    A.train_assoc(m2, law, recipe, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert r1.final["divergence"] < before
    assert r1.final["divergence"] == pytest.approx(A.evaluate(m1, law)["divergence"])
    assert [h["step"] for h in r1.history] == [20, 40, 60]
    sampled = build_model(small(d_vocab=5))
    A.train_assoc(sampled, law, replace(recipe, batch_size=64, loss="divergence"), seed=0)
    assert A.evaluate(sampled, law)["divergence"] < before


def test_evaluate_uses_the_forward_for_deep_models():
    law = A.associations(5, 2, seed=0)
    model = build_model(small(d_vocab=5, n_layers=2))
    metrics = A.evaluate(model, law)
    with torch.no_grad():
        assert metrics["accuracy"] == pytest.approx(law.accuracy(model(law.contexts())))


def test_recipe_errors():
    with pytest.raises(InputError, match="loss"):
        A.AssocRecipe(loss="mse")
    with pytest.raises(InputError, match="steps"):
        A.AssocRecipe(steps=0)
    with pytest.raises(InputError, match="schedule"):
        A.AssocRecipe(schedule="step")
    with pytest.raises(InputError, match="final_lr_frac"):
        A.AssocRecipe(schedule="linear", final_lr_frac=0.0)
    with pytest.raises(InputError, match="rows must be"):
        A.AssocRecipe(batch_size=8, rows="some")
    with pytest.raises(InputError, match="batch_size > 0"):
        A.AssocRecipe(rows="batch")


def test_batch_rows_train_the_same_loss_on_fewer_rows():
    """rows="batch" computes only the sampled contexts' logits: the same samples and loss as rows="all"
    (same seed, same draws), so the first step's loss agrees to float precision and training reaches a
    similar model; the recipe key changes only for recipes that ask for it."""
    law = A.associations(7, 2, seed=0)
    recipe = A.AssocRecipe(steps=80, lr=1e-2, batch_size=32, eval_every=1)
    assert "rows" not in recipe.to_dict() and replace(recipe, rows="batch").to_dict()["rows"] == "batch"
    m_all, m_batch = build_model(small(d_mlp=8)), build_model(small(d_mlp=8))
    r_all = A.train_assoc(m_all, law, recipe, seed=3)
    r_batch = A.train_assoc(m_batch, law, replace(recipe, rows="batch"), seed=3)
    assert r_batch.history[0]["loss"] == pytest.approx(r_all.history[0]["loss"], rel=1e-5)
    assert r_batch.final["accuracy"] == pytest.approx(r_all.final["accuracy"], abs=0.1)
    assert r_batch.final["divergence"] < r_batch.history[0]["divergence"]


def test_schedules_start_at_lr_and_end_at_the_final_fraction():
    for schedule in ("linear", "cosine"):
        r = A.AssocRecipe(steps=100, lr=1e-2, schedule=schedule, final_lr_frac=0.05)
        lrs = [A.scheduled_lr(r, s) for s in range(101)]
        assert lrs[0] == pytest.approx(1e-2) and lrs[100] == pytest.approx(5e-4)
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert A.scheduled_lr(A.AssocRecipe(steps=100, lr=1e-2, schedule="linear"), 50) == pytest.approx(1e-2 * 0.525)
    assert A.scheduled_lr(A.AssocRecipe(steps=100, lr=3e-3), 70) == 3e-3
    # a constant schedule has no end point, so its store key does not carry one
    assert "final_lr_frac" not in A.AssocRecipe().to_dict()
    assert A.AssocRecipe(schedule="linear").to_dict()["final_lr_frac"] == 0.05


def _tiny_entry(steps: int = 30, name: str = "assoc_test_tiny"):
    cfg = AssocConfig(d_vocab=5, n_ctx=2, d_model=4, n_heads=2, d_head=3, pos_in_residual=False)
    law = {"kind": "associations", "N": 5, "S": 2, "seed": 0, "version": A.DATA_VERSION}
    return A.assoc_entry(name, cfg, law, A.AssocRecipe(steps=steps, lr=1e-2, eval_every=10), reference_seeds=(0,))


@pytest.fixture
def tiny_assoc():
    entry = zoo.register(_tiny_entry())
    yield entry
    zoo.ZOO.pop(entry.name, None)


def test_assoc_entry_store_and_reference_round_trip_through_the_one_zoo(tiny_assoc, tmp_path):
    entry = tiny_assoc
    spec_key(entry.spec(0))  # JSON-able
    store, refs = ModelStore(tmp_path / "store"), tmp_path / "refs"
    with pytest.raises(MissingCheckpointError, match="no reference"):
        zoo.load(entry.name, 0, store=store, reference_dir=refs)  # a declared reference seed must have its file
    first = zoo.load(entry.name, 0, store=store, reference_dir=refs, retrain=True)
    again = zoo.load(entry.name, 0, store=store, reference_dir=refs, retrain=True)
    assert (first.source, again.source) == ("trained", "cache")
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    zoo.save_reference(first, refs)
    ref = zoo.load(entry.name, 0, store=store, reference_dir=refs)
    assert ref.source == "reference" and ref.card["metrics"]["accuracy"] == first.card["metrics"]["accuracy"]
    assert ref.info()["name"] == "assoc_test_tiny"
    assert zoo.find_card(entry.name, 0, store=store, reference_dir=refs)["key"] == spec_key(entry.spec(0))
    other = zoo.load(entry.name, 1, store=store, reference_dir=refs)  # not a reference seed: the store
    assert other.source == "trained"
    zoo.ZOO[entry.name] = _tiny_entry(steps=40)
    with pytest.raises(StaleCheckpointError, match="train.steps"):
        zoo.load(entry.name, 0, store=store, reference_dir=refs)


def test_the_experiments_are_well_formed_zoo_entries():
    entries = A.zoo_entries()
    names = [e.name for e in entries]
    assert len(names) == len(set(names)) and all(n.startswith("assoc_") for n in names)
    assert set(names) <= set(zoo.names())  # found by the zoo's discovery, not registered on import
    for entry in entries:
        if entry.family != "assoc":
            continue
        law = A.build_law(entry)
        assert (law.N, law.S) == (entry.config.d_vocab, entry.config.n_ctx)
    expected = ([f"assoc_exp2_dh{i:02d}" for i in range(1, 11)] + [f"assoc_exp3_d{i:02d}" for i in range(5, 16)]
                + [f"assoc_exp5_{k}_H{h:02d}" for k in ("attn", "mlp") for h in range(1, 32, 5)]
                + [f"assoc_exp6_H{h:02d}" for h in range(1, 22, 4)])
    assert set(expected) <= set(names)
    e2 = zoo.get_entry("assoc_exp2_dh03").config
    assert (e2.d_vocab, e2.d_model, e2.n_heads, e2.d_head, e2.compressed) == (50, 10, 20, 3, True)
    e3 = zoo.get_entry("assoc_exp3_d07").config
    assert (e3.d_model, e3.n_heads, e3.d_head) == (7, 20, 10)
    e6 = zoo.get_entry("assoc_exp6_H13").config
    assert (e6.d_vocab, e6.d_model, e6.d_head, e6.n_heads) == (10, 2, 2, 13)


def test_exp5_pairs_attention_and_mlp_at_equal_parameter_count():
    """The notebook's pairing (width 2 d (H - 1) for H heads) matches parameter counts within 10%."""
    for H in A.EXP5_HEADS:
        attn, mlp = A.n_params(A.exp5("attn", H)), A.n_params(A.exp5("mlp", H))
        assert abs(mlp - attn) / attn < 0.10, (H, attn, mlp)
        assert A.exp5("mlp", H).config.n_heads == 1 and A.exp5("mlp", H).config.d_mlp == 20 * (H - 1)


def test_the_authors_shared_maps_for_d_ne_d_head():
    """models.py: one d -> d_h compression, H heads of width d_h, one d_h -> d decompression; positions
    of width d_h added after compression; so the attention's contribution has rank <= d_h."""
    cfg = AssocConfig(d_vocab=12, n_ctx=2, d_model=10, n_heads=6, d_head=2, pos_in_residual=False, seed=0)
    model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["W_compress"] == (10, 2) and shapes["W_decompress"] == (2, 10)
    assert shapes["blocks.0.attn.W_Q"] == (6, 2, 2) and shapes["blocks.0.attn.W_O"] == (6, 2, 2)
    assert shapes["pos_embed.W_pos"] == (2, 2)
    x = all_contexts(12, 2)
    torch.testing.assert_close(table_logits(model), model(x), rtol=1e-5, atol=1e-5)
    _, cache = model.run_with_cache(x, names=["blocks.0.hook_attn_out"])
    attn_out = cache["blocks.0.hook_attn_out"][:, -1].double()
    assert torch.linalg.matrix_rank(attn_out, atol=1e-5) <= 2
    # the same forward by hand, the authors' way
    with torch.no_grad():
        E, P = model.embed.W_E, model.pos_embed.W_pos
        comp = E[x] @ model.W_compress + P  # [n, 2, d_h]
        a = model.blocks[0].attn
        out = 0
        for h in range(6):
            q, k, v = comp @ a.W_Q[h], comp @ a.W_K[h], comp @ a.W_V[h]
            pat = torch.softmax(q[:, -1:] @ k.transpose(1, 2) / math.sqrt(2), -1)  # last position reads both
            out = out + (pat @ v)[:, 0] @ a.W_O[h]
        resid = E[x[:, -1]] + out @ model.W_decompress
        torch.testing.assert_close(model(x), resid @ model.unembed.W_U, rtol=1e-5, atol=1e-5)
    # our earlier form stays available under its own name, and d = d_h is one model either way
    per_head = build_model(replace(cfg, head_maps="per_head"))
    assert tuple(per_head.blocks[0].attn.W_O.shape) == (6, 2, 10) and not hasattr(per_head, "W_compress")
    assert "head_maps" not in replace(cfg, d_head=10).to_dict()  # d = d_h keys unchanged
    assert replace(cfg, head_maps="per_head").to_dict() != cfg.to_dict()
    with pytest.raises(ConfigError, match="pos_in_residual"):
        AssocConfig(d_vocab=12, n_ctx=2, d_model=10, n_heads=6, d_head=2)
    with pytest.raises(ConfigError, match="head_maps"):
        AssocConfig(d_vocab=12, n_ctx=2, d_model=10, n_heads=6, d_head=2, head_maps="both")


def test_experiment_one_points_keep_their_reference_keys():
    """d = d_h: the authors' form is our plain layout, so the committed experiment-1 references load."""
    loaded = zoo.load("assoc_exp1_d10_H06")
    assert loaded.source == "reference" and not loaded.entry.config.compressed


    assert A.exp1(26).config.n_heads == 26 and A.EXP1_HEADS == (1, 6, 11, 16, 21, 26, 31)


# --- the claims' controls (circuits.tasks.assoc.breaks) ----------------------------------------------------

from circuits.analysis.interventions import batch_mean_ablate_head  # noqa: E402
from circuits.tasks.assoc import breaks as B  # noqa: E402

BREAK_CONFIGS = [
    pytest.param(dict(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=6, seed=2, pos_in_residual=False), id="d=d_h"),
    pytest.param(dict(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=2, pos_in_residual=False), id="shared"),
    pytest.param(dict(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=2, head_maps="per_head"), id="per_head"),
    pytest.param(dict(d_vocab=7, n_ctx=2, d_model=6, n_heads=1, d_head=6, seed=2, d_mlp=8, pos_in_residual=False),
                 id="mlp"),
]


def _logits(model):
    x = all_contexts(model.acfg.d_vocab, model.acfg.n_ctx)
    with torch.no_grad():
        return table_logits(model).double(), model(x).double()


@pytest.mark.parametrize("kw", BREAK_CONFIGS)
def test_mean_ablated_heads_in_the_weights_equal_the_hook_mean_ablation(kw):
    """b_O carries the head's mean output: the table (no hooks) and the forward agree with the plugin's
    hook mutation run on every context at once."""
    model = build_model(AssocConfig(**kw))
    hooks_only = build_model(AssocConfig(**kw))
    hooks_only.weight_mutation = lambda *args: None  # the plugin's generic path: a hook on hook_z
    for h in range(model.acfg.n_heads):
        ours = B.ablate_heads(model, [h], "mean")
        table, forward = _logits(ours)
        torch.testing.assert_close(table, forward, atol=1e-5, rtol=1e-5)
        hooked = batch_mean_ablate_head(hooks_only, 0, h)
        assert hooked.hook_dict["blocks.0.attn.hook_z"].fns  # the reference really is the hook version
        with torch.no_grad():
            ref = hooked(all_contexts(model.acfg.d_vocab, model.acfg.n_ctx)).double()
        torch.testing.assert_close(forward, ref, atol=1e-5, rtol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    B.ablate_heads(model, [0], "mean"), B.randomise_ov(model), B.truncate_width(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # inputs untouched


@pytest.mark.parametrize("kw", BREAK_CONFIGS)
def test_zero_ablating_every_head_leaves_the_residual_alone(kw):
    model = build_model(AssocConfig(**kw))
    gone = B.ablate_heads(model, range(model.acfg.n_heads))
    table, forward = _logits(gone)
    torch.testing.assert_close(table, forward, atol=1e-5, rtol=1e-5)
    if not model.acfg.d_mlp:  # logits = W_U e(t_S): the first token no longer matters
        grid = table.reshape(model.acfg.d_vocab, model.acfg.d_vocab, -1)
        torch.testing.assert_close(grid, grid[:1].expand_as(grid))


@pytest.mark.parametrize("kw", BREAK_CONFIGS)
def test_randomised_ov_keeps_shapes_and_norms_and_changes_the_weights(kw):
    model = build_model(AssocConfig(**kw))
    new = B.randomise_ov(model, seed=3)
    for W, V in ((model.blocks[0].attn.W_O, new.blocks[0].attn.W_O),
                 (model.blocks[0].attn.W_QKV[2], new.blocks[0].attn.W_QKV[2])):
        assert W.shape == V.shape and not torch.allclose(W, V)
        torch.testing.assert_close(W.flatten(1).norm(dim=1), V.flatten(1).norm(dim=1))
    torch.testing.assert_close(model.blocks[0].attn.W_QKV[:2], new.blocks[0].attn.W_QKV[:2])
    torch.testing.assert_close(_logits(new)[0], _logits(new)[1], atol=1e-5, rtol=1e-5)


def test_truncated_width_gives_logits_of_rank_d_minus_one():
    model = build_model(AssocConfig(d_vocab=9, n_ctx=2, d_model=5, n_heads=4, d_head=5, seed=0))
    rank = lambda m: int((torch.linalg.svdvals(_logits(m)[0]) > 1e-4 * torch.linalg.svdvals(_logits(m)[0])[0]).sum())  # noqa: E731
    assert rank(model) == 5 and rank(B.truncate_width(model)) == 4  # float32 logits: a relative tolerance


def test_reassigned_table_replaces_every_pair_and_keeps_the_statistics():
    law = A.make_law(A.EXP6_LAW)
    new = B.reassign_table(law, torch.Generator().manual_seed(0))
    torch.testing.assert_close(new.context_probs(), law.context_probs())
    supp = law.support()
    assert (new.targets()[supp] != law.targets()[supp]).all()  # every memorised pair replaced
    assert new.entropy() == pytest.approx(law.entropy())
    counts = lambda l: sorted(torch.bincount(l.targets()[supp], minlength=l.N).tolist())  # noqa: E731
    assert counts(new) == counts(law)
    with pytest.raises(InputError, match="needs a Law"):
        B.reassign_table("law", torch.Generator())


@pytest.mark.parametrize("kw", BREAK_CONFIGS)
def test_the_plugins_mutations_reach_the_table(kw):
    """Every mutation `about` derives for a head, the layer's heads or an MLP changes what table_logits
    computes (the claims' exact evaluation runs no hooks: the model makes the hook-based ones in its
    weights), and the table still equals the forward."""
    import circuits.claims.mutations  # noqa: F401  (registers the mutation controls)
    from circuits.claims.controls import make_control

    model = build_model(AssocConfig(**kw))
    specs = ["zero_ablate:L0H0", "mean_ablate:L0H0", "zero_ablate_attn:L0", "mean_ablate_attn:L0",
             "randomise_read_in", "permute_positions"] + (["swap_head:L0H0"] if model.acfg.n_heads > 1 else [])
    specs += ["zero_ablate_mlp:L0", "mean_ablate_mlp:L0"] if model.acfg.d_mlp else []
    before = _logits(model)[0]
    for spec in specs:
        mutant = make_control(spec).apply_model(model)
        assert not any(hp.fns for hp in mutant.hook_dict.values()), spec
        table, forward = _logits(mutant)
        torch.testing.assert_close(table, forward, atol=1e-5, rtol=1e-5)
        if spec.startswith("swap_head"):  # the same function, the index naming the other head
            torch.testing.assert_close(table, before, atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(table, before, atol=1e-6), spec
    mean_all = make_control("mean_ablate_attn:L0").apply_model(model)
    torch.testing.assert_close(_logits(mean_all)[0], _logits(B.ablate_heads(model, range(model.acfg.n_heads),
                                                                                "mean"))[0])


def test_the_kept_head_means_follow_the_weights():
    model = build_model(small())
    first = model.head_output_means()
    assert torch.equal(model.head_output_means(), first)
    with torch.no_grad():
        model.blocks[0].attn.W_O.mul_(2)  # an in-place edit: the kept means are stale
    torch.testing.assert_close(model.head_output_means(), 2 * first)


def test_table_logits_refuses_a_model_with_hooks():
    """A hook would be skipped by the table: a claim scored there would hold on the unmutated model."""
    model = build_model(small())
    model.hook_dict["blocks.0.attn.hook_z"].fns.append(lambda z, hook: z * 0)
    with pytest.raises(InputError, match="runs no hooks.*blocks.0.attn.hook_z"):
        table_logits(model)


def test_ablate_mlp_zero_and_mean():
    model = build_model(AssocConfig(d_vocab=7, n_ctx=2, d_model=6, n_heads=1, d_head=6, seed=2, d_mlp=8,
                                    pos_in_residual=False))
    zero, mean = B.ablate_mlp(model, "zero"), B.ablate_mlp(model, "mean")
    for m in (zero, mean):
        torch.testing.assert_close(_logits(m)[0], _logits(m)[1], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(mean.blocks[0].mlp.b_out) > 0
    with pytest.raises(InputError, match="no MLP"):
        B.ablate_mlp(build_model(small()), "zero")
    with pytest.raises(InputError, match="mode"):
        B.ablate_heads(model, [0], "half")
    with pytest.raises(InputError, match="heads"):
        B.ablate_heads(model, [5])


def test_empirical_laws_are_counted_once_and_handed_out_as_copies():
    spec = {"kind": "empirical", "base": {"kind": "associations", "N": 6, "S": 2, "seed": 1}, "n": 500, "seed": 2}
    a, b = A.make_law(spec), A.make_law(dict(spec))
    assert all(torch.equal(x, y) for x, y in zip(a.conditionals, b.conditionals))
    a.conditionals[1].zero_()  # a caller's in-place edit must not reach the next caller
    c = A.make_law(spec)
    assert all(torch.equal(x, y) for x, y in zip(b.conditionals, c.conditionals))
    assert A.make_law({**spec, "seed": 3}).conditionals[1].ne(c.conditionals[1]).any()  # other samples
