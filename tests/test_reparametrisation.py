"""A claim about function must not depend on how the weights are written (issue 30, item 6).

Exact function-preserving reparametrisations of a transformer: permuting the heads of a layer (Q, K,
V with their W_O rows), permuting an MLP's hidden units (W_in columns, b_in, W_out rows), scaling
W_Q (and b_Q) of a head by c and W_K (and b_K) by 1/c, rotating a head's value space (W_V, b_V by an
orthogonal d_head x d_head R, W_O by R^T) or its query-key space (W_Q, b_Q, W_K, b_K by the same R),
and, for a ReLU MLP, a positive scale per hidden unit folded into W_in, b_in and out of W_out. Each
must leave the logits unchanged (float64, 1e-10), and every bracket claim of hypotheses/test_brackets.py
(run on the committed ARENA checkpoint and our `brackets` model, on the first 400 evaluation
strings) must give the same verdict and the same value and interval (1e-8) on the reparametrised
model. A role bound to a head index follows the head permutation: pinned (ARENA) bindings are
mapped through it, searched ones (ours) must be found again at the permuted index.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hypotheses"))

N_EVAL = 400  # evaluation strings (the claims' verdicts are compared, not their thresholds' margins)
N_SEARCH = 400  # search split for our model's role binding
TOL = 1e-8  # claims' values and intervals, float64 models


# --- the reparametrisations (each returns a new model; `perm`: new index i holds old index perm[i]) ----


def _copy(model):
    """A new model with the same weights (a deepcopy would also copy whatever the model references)."""
    from circuits.model.transformer import HookedTransformer

    m = HookedTransformer(model.cfg).to(next(model.parameters()).dtype)
    m.load_state_dict(model.state_dict())
    return m.eval()


def permute_heads(model, layer: int, perm):
    m = _copy(model)
    attn = m.blocks[layer].attn
    perm = torch.as_tensor(perm)
    with torch.no_grad():
        attn.W_QKV.copy_(attn.W_QKV[:, perm])  # [q|k|v, head, d_head, d_model]
        attn.b_QKV.copy_(attn.b_QKV[:, perm])
        attn.W_O.copy_(attn.W_O[perm])  # [head, d_head, d_model]
    return m


def permute_mlp(model, layer: int, perm):
    m = _copy(model)
    mlp = m.blocks[layer].mlp
    perm = torch.as_tensor(perm)
    with torch.no_grad():
        mlp.W_in.copy_(mlp.W_in[:, perm])  # [d_model, d_mlp]
        mlp.b_in.copy_(mlp.b_in[perm])
        mlp.W_out.copy_(mlp.W_out[perm])  # [d_mlp, d_model]
    return m


def scale_qk(model, layer: int, head: int, c: float):
    """q -> c q, k -> k / c: every score q.k unchanged."""
    m = _copy(model)
    attn = m.blocks[layer].attn
    with torch.no_grad():
        attn.W_QKV[0, head] *= c
        attn.b_QKV[0, head] *= c
        attn.W_QKV[1, head] /= c
        attn.b_QKV[1, head] /= c
    return m


def rotate_ov(model, layer: int, head: int, R: torch.Tensor):
    """v -> v R (W_V R, b_V R), W_O -> R^T W_O: z changes, z W_O does not."""
    m = _copy(model)
    attn = m.blocks[layer].attn
    R = R.to(attn.W_O.dtype)
    with torch.no_grad():
        attn.W_QKV[2, head] = R.T @ attn.W_QKV[2, head]  # rows = d_head (nn.Linear layout)
        attn.b_QKV[2, head] = attn.b_QKV[2, head] @ R
        attn.W_O[head] = R.T @ attn.W_O[head]
    return m


def rotate_qk(model, layer: int, head: int, R: torch.Tensor):
    """q -> q R, k -> k R: q k^T unchanged."""
    m = _copy(model)
    attn = m.blocks[layer].attn
    R = R.to(attn.W_O.dtype)
    with torch.no_grad():
        for i in (0, 1):
            attn.W_QKV[i, head] = R.T @ attn.W_QKV[i, head]
            attn.b_QKV[i, head] = attn.b_QKV[i, head] @ R
    return m


def scale_relu(model, layer: int, scale: torch.Tensor):
    """relu(s x) = s relu(x) for s > 0: W_in, b_in times s, W_out divided by it (per hidden unit)."""
    assert model.cfg.act_fn == "relu" and bool((scale > 0).all())
    m = _copy(model)
    mlp = m.blocks[layer].mlp
    scale = scale.to(mlp.W_in.dtype)
    with torch.no_grad():
        mlp.W_in *= scale[None, :]
        mlp.b_in *= scale
        mlp.W_out /= scale[:, None]
    return m


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # a Haar-random orthogonal matrix


SWAP = [1, 0]  # the two heads of a layer, exchanged


def _every_head(model, fn):
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            model = fn(model, layer, head)
    return model


def _mlp_perm(model, layer):
    return torch.randperm(model.cfg.d_mlp, generator=torch.Generator().manual_seed(10 + layer))


def _relu_scale(model, layer):
    g = torch.Generator().manual_seed(20 + layer)
    return torch.exp(torch.empty(model.cfg.d_mlp, dtype=torch.float64).uniform_(-2, 2, generator=g))


# name -> (model -> model, head map {(layer, old head): (layer, new head)} for the heads it moves)
REPARAMETRISATIONS = {
    "heads of layer 2 swapped": (lambda m: permute_heads(m, 2, SWAP), {(2, 0): (2, 1), (2, 1): (2, 0)}),
    "heads of layers 0 and 1 swapped": (lambda m: permute_heads(permute_heads(m, 0, SWAP), 1, SWAP), {}),
    "MLP units permuted (every layer)": (
        lambda m: [m := permute_mlp(m, l, _mlp_perm(m, l)) for l in range(m.cfg.n_layers)][-1], {}),
    "W_Q x c, W_K / c (every head)": (
        lambda m: _every_head(m, lambda m, l, h: scale_qk(m, l, h, [3.7, 0.21][h] * (l + 1))), {}),
    "W_V, W_O rotated (every head)": (
        lambda m: _every_head(m, lambda m, l, h: rotate_ov(m, l, h, orthogonal(m.cfg.d_head, 2 * l + h))), {}),
    "W_Q, W_K rotated (every head)": (
        lambda m: _every_head(m, lambda m, l, h: rotate_qk(m, l, h, orthogonal(m.cfg.d_head, 50 + 2 * l + h))), {}),
    "ReLU scale folded into W_in / W_out (every layer)": (
        lambda m: [m := scale_relu(m, l, _relu_scale(m, l)) for l in range(m.cfg.n_layers)][-1], {}),
}


_SINGLE = [fn for fn, _ in REPARAMETRISATIONS.values()]


def all_at_once(model):
    for fn in _SINGLE:
        model = fn(model)
    return model


REPARAMETRISATIONS["all of the above, composed"] = (all_at_once, {(2, 0): (2, 1), (2, 1): (2, 0)})


# --- models and data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    from circuits.tasks.brackets import reference
    from circuits.zoo import registry as zoo

    return {"arena": reference.arena_model().double().eval(), "ours": zoo.load("brackets").model.double().eval()}


@pytest.fixture(scope="module")
def data():
    from circuits.tasks.brackets.reference import arena_data
    from circuits.tasks.brackets import data as B

    evaluation = arena_data(N_EVAL)
    search = B.distinct_rows(arena_data(None), exclude=arena_data().strs, n=N_SEARCH)
    return evaluation, search


@pytest.mark.parametrize("name", list(REPARAMETRISATIONS))
@pytest.mark.parametrize("which", ["arena", "ours"])
def test_reparametrisation_preserves_the_function(models, data, which, name):
    """Logits and every head's output (z W_O) and attention pattern equal to float64 rounding; the
    moved heads' at their new index."""
    model = models[which]
    fn, moved = REPARAMETRISATIONS[name]
    other = fn(model)
    toks = data[0].toks[:200]
    names = [f"blocks.{l}.attn.{h}" for l in range(model.cfg.n_layers) for h in ("hook_pattern", "hook_z")]
    with torch.no_grad():
        la, a = model.run_with_cache(toks, names=names)
        lb, b = other.run_with_cache(toks, names=names)
    scale = float(la.abs().max())
    assert float((la - lb).abs().max()) <= 1e-10 * max(1.0, scale), f"{name}: logits moved by {float((la - lb).abs().max()):.3g}"
    changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    assert changed, f"{name}: the weights did not change (the reparametrisation tests nothing)"
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            new_layer, new_head = moved.get((layer, head), (layer, head))
            if name in ("heads of layers 0 and 1 swapped", "all of the above, composed") and layer < 2:
                new_head = 1 - head
            pa = a[f"blocks.{layer}.attn.hook_pattern"][:, head]
            pb = b[f"blocks.{new_layer}.attn.hook_pattern"][:, new_head]
            assert float((pa - pb).abs().max()) <= 1e-10, f"{name}: L{layer}H{head}'s attention moved"
            oa = a[f"blocks.{layer}.attn.hook_z"][:, :, head] @ model.blocks[layer].attn.W_O[head].detach()
            ob = b[f"blocks.{new_layer}.attn.hook_z"][:, :, new_head] @ other.blocks[new_layer].attn.W_O[new_head].detach()
            assert float((oa - ob).abs().max()) <= 1e-10 * max(1.0, float(oa.abs().max())), \
                f"{name}: L{layer}H{head}'s output moved"


# --- the claims -----------------------------------------------------------------------------------------

CLAIM_TESTS = [
    "test_final_layernorm_is_linear_at_position_0",
    "test_components_sum_to_pre_final_ln_residual",
    "test_unbalanced_direction_carried_by_the_two_role_heads",
    "test_count_head_separates_elevation_failures",
    "test_negative_head_separates_negative_failures",
    "test_count_head_tracks_open_proportion",
    "test_count_head_attends_to_position_1_from_position_0",
    "test_mean_ablating_the_count_head_costs_more_on_elevation_failures_than_its_sibling",
    "test_mean_ablating_the_negative_head_costs_more_on_negative_failures_than_its_sibling",
    "test_resampling_the_count_heads_input_needs_the_count_not_the_horizon",
]


class _Figures:
    def add(self, *args, **kwargs):
        pass


def bracket_claims(model, roles: dict, evaluation) -> dict:
    """Every claim of CLAIM_TESTS on `model` with `roles` (records by name, raise_on_failure off)."""
    import test_brackets as H
    from circuits.claims.controls import main_control
    from circuits.claims.core import Claims
    from circuits.claims.draws import Draws
    from circuits.tasks.brackets.subjects import BracketSubject

    subject = BracketSubject("reparametrisation", model, dict(roles), evaluation, "", {r: 1 for r in roles})
    claim = Claims(raise_on_failure=False, draws_seed=7)
    args = {"subject": subject, "claim": claim, "control": main_control(), "figures": _Figures(),
            "draws": Draws(11), "resampling_draws": Draws(13)}
    for test in CLAIM_TESTS:
        method = getattr(H.BracketHypotheses(), test)
        method(**{p: args[p] for p in inspect.signature(method).parameters})
    return {r.name: r for r in claim.records}


def _renamed(claims: dict, moved: dict) -> dict:
    """Claim names that name a head by index (a comparison with a sibling, "L2H0's") follow the
    permutation, as the roles do: the same head under its new index."""
    import re

    index = {f"L{l}H{h}": f"L{l2}H{h2}" for (l, h), (l2, h2) in moved.items()}
    return {re.sub(r"L\d+H\d+", lambda m: index.get(m.group(0), m.group(0)), name): r for name, r in claims.items()}


def _same_claims(before: dict, after: dict, what: str, tol: float = TOL) -> None:
    assert before.keys() == after.keys(), f"{what}: claims {sorted(before.keys() ^ after.keys())} differ"
    moved = []
    for name, a in before.items():
        b = after[name]
        if a.passed != b.passed:
            moved.append(f"{name}: verdict {a.passed} -> {b.passed} (value {a.value} -> {b.value})")
        for field in ("value", "bound"):
            x, y = getattr(a, field), getattr(b, field)
            if (x is None) != (y is None) or (x is not None and abs(x - y) > tol * max(1.0, abs(x))):
                moved.append(f"{name}: {field} {x} -> {y}")
    assert not moved, f"{what}: " + "; ".join(moved)


def _mapped(roles: dict, moved: dict) -> dict:
    return {role: moved.get(tuple(h), tuple(h)) for role, h in roles.items()}


@pytest.fixture(scope="module")
def baseline_claims(models, data):
    from circuits.tasks.brackets.reference import ARENA_ROLES
    from circuits.tasks.brackets.subjects import find_roles

    roles = {"arena": dict(ARENA_ROLES), "ours": find_roles(models["ours"], data[1])}
    return roles, {w: bracket_claims(models[w], roles[w], data[0]) for w in models}


CLAIM_CASES = ["heads of layer 2 swapped", "all of the above, composed"]  # the composition includes every other


@pytest.mark.parametrize("name", CLAIM_CASES)
@pytest.mark.parametrize("which", ["arena", "ours"])
def test_claims_keep_their_verdicts_and_values(models, data, baseline_claims, which, name):
    """The same claims, verdicts and values after the reparametrisation; the roles follow the heads
    (ARENA: pinned, mapped through the permutation; ours: searched again on the reparametrised model
    and found at the permuted index)."""
    from circuits.tasks.brackets.subjects import find_roles

    roles, before = baseline_claims
    fn, moved = REPARAMETRISATIONS[name]
    other = fn(models[which])
    expected = _mapped(roles[which], moved)
    if which == "ours":
        found = find_roles(other, data[1])
        assert found == expected, f"{name}: the role search found {found} on the reparametrised model, " \
                                  f"the permutation maps {roles[which]} to {expected}"
    assert len(before[which]) >= 15, f"only {len(before[which])} claims recorded"
    _same_claims(_renamed(before[which], moved), bracket_claims(other, expected, data[0]), f"{which}, {name}")


def test_a_binding_that_does_not_follow_the_permutation_is_caught(models, data, baseline_claims):
    """The comparison has teeth: heads 2.0 and 2.1 swapped but the pinned roles NOT mapped through the
    swap (a claim bound to an index, not to the head), and the claims' verdicts or values move."""
    roles, before = baseline_claims
    other = permute_heads(models["arena"], 2, SWAP)
    with pytest.raises(AssertionError, match="verdict|value|claims"):  # any of the three moves
        _same_claims(before["arena"], bracket_claims(other, roles["arena"], data[0]), "arena, unmapped roles")


# === the other hypotheses modules (palindromes, skip-trigrams, ICL, Tracr ground truth) ==================
#
# The same rewrites, generalised to any layer shape, plus two more: W_V (b_V) times c with W_O over c,
# and a rotation of the residual basis (every writer times R, every reader by R^T), which is exact only
# without LayerNorm (palindromes, skip-trigrams, Tracr; not ICL). Each module's claims are compared on
# one composed rewrite, with the test functions called as the suite calls them (a representative
# subset per module, OTHER_CLAIMS). What a rewrite may move is limited by how the claims bind parts:
# - claims that name a head or MLP by index (all of the Tracr ones, palindromes' role claims) do not
#   follow a head permutation (as the brackets roles do through their binding), so the modules whose
#   chosen claims name indices get no head permutation (the brackets part above covers binding);
# - the Tracr claims read residual dimensions by their card's labels (which RASP variable lives where),
#   a basis the card fixes: no residual rotation there.


def scale_ov(model, layer: int, head: int, c: float):
    """v -> c v (W_V, b_V), W_O -> W_O / c: z W_O unchanged."""
    m = _copy(model)
    attn = m.blocks[layer].attn
    with torch.no_grad():
        attn.W_QKV[2, head] *= c
        attn.b_QKV[2, head] *= c
        attn.W_O[head] /= c
    return m


def rotate_residual(model, R: torch.Tensor):
    """The residual stream in another orthonormal basis, x -> x R: what writes to it (embeddings, W_O,
    b_O, W_out, b_out) times R, what reads it (W_Q, W_K, W_V, W_in, W_U) by R^T. Exact without
    LayerNorm (a LayerNorm centres and scales per coordinate: not rotation-equivariant)."""
    names = [n for n, _ in model.named_parameters()]
    assert not any(".ln" in n or n.startswith("ln") for n in names), f"LayerNorm in {names}: not exact"
    m = _copy(model)
    R = R.to(next(m.parameters()).dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            last = name.split(".")[-1]
            if name in ("embed.W_E", "pos_embed.W_pos") or last in ("W_O", "b_O", "W_out", "b_out"):
                p.copy_(p @ R)  # writers: [..., d_model]
            elif last == "W_QKV":
                p.copy_(p @ R)  # [3, head, d_head, d_model]: q = x W^T, so W -> W R reads x R
            elif last in ("W_in", "W_U") and not name.startswith("embed"):
                p.copy_(R.T @ p)  # readers: [d_model, ...]
            elif last not in ("b_QKV", "b_in", "b_U"):
                raise AssertionError(f"rotate_residual: no rule for parameter {name} {tuple(p.shape)}")
    return m


def _index_preserving(model, *, residual: bool, heads: bool):
    """Every rewrite above on every head and MLP of the model, composed; heads permuted cyclically
    within each layer if ``heads``; the residual basis rotated if ``residual``."""
    cfg = model.cfg
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            model = scale_qk(model, layer, head, 1.7 + 0.9 * head + 0.3 * layer)
            model = scale_ov(model, layer, head, 0.4 + 0.5 * head + 0.2 * layer)
            model = rotate_ov(model, layer, head, orthogonal(cfg.d_head, 100 + 7 * layer + head))
            model = rotate_qk(model, layer, head, orthogonal(cfg.d_head, 200 + 7 * layer + head))
        if getattr(cfg, "d_mlp", 0) and hasattr(model.blocks[layer], "mlp") and model.blocks[layer].mlp is not None:
            model = permute_mlp(model, layer, _mlp_perm(model, layer))
            if cfg.act_fn == "relu":
                model = scale_relu(model, layer, _relu_scale(model, layer))
        if heads and cfg.n_heads > 1:
            model = permute_heads(model, layer, torch.roll(torch.arange(cfg.n_heads), 1))
    if residual:
        model = rotate_residual(model, orthogonal(cfg.d_model, 300))
    return model


# module -> (zoo model, fixture name, tests, rotate the residual?, permute heads?)
OTHER_CLAIMS = {
    # palindromes: the accuracy claim only (the distance claims evaluate 100k+ strings: minutes in float64)
    "test_palindromes": ("palindromes", "palindromes_model", ["test_accuracy_on_fresh_strings"], True, True),
    "test_skip_trigrams": ("skip_trigrams", "skip_trigrams_model", [
        "test_reaches_the_bayes_optimum", "test_noise_sequences_get_a_near_uniform_output"], True, True),
    "test_icl": ("icl", "icl_model", [
        "test_beats_both_fixed_ridges_and_nears_the_oracle",
        "test_removes_part_of_the_ridges_excess_over_the_noise_floor"], False, True),
    "test_ground_truth:shuffle_dyck": ("tracr_shuffle_dyck", "tracr_shuffle_dyck_model", [
        "test_sd_l4h0_attends_to_the_last_position", "test_sd_l1h0_averages_over_the_prefix",
        "test_sd_l1h0_tracks_the_open_proportion", "test_sd_l1h1_tracks_the_open_proportion_is_false",
        "test_sd_ablating_l1h0_removes_the_opens_from_the_balance", "test_sd_ablating_l0h0_moves_the_balance_is_false",
        "test_sd_ablating_mlp2_removes_the_balance_and_keeps_the_counts", "test_sd_patching_l1h0_carries_the_source_opens",
        "test_sd_patching_l0h0_carries_the_source_opens_is_false", "test_sd_scrub_mlp5_writes_the_verdict",
        "test_sd_scrub_layer4_heads_write_the_verdict_is_false", "test_sd_mlp5_writes_the_verdict_margin",
        "test_sd_mlp4_writes_the_verdict_margin_is_false"], False, False),
    "test_ground_truth:frac_prevs": ("tracr_frac_prevs", "tracr_frac_prevs_model", [
        "test_fp_l1h0_averages_over_the_causal_prefix", "test_fp_output_direction_tracks_the_fraction_of_a",
        "test_fp_ablating_mlp0_zeroes_the_output", "test_fp_mlp1_is_needed_is_false",
        "test_fp_patching_mlp0_carries_the_source_fraction", "test_fp_l1h0_writes_the_output",
        "test_fp_mlp0_writes_the_output_is_false"], False, False),
    "test_ground_truth:hist": ("tracr_hist", "tracr_hist_model", [
        "test_hist_l0h0_attends_to_bos_by_count", "test_hist_selector_width_direction_is_one_over_count",
        "test_hist_l0h0_is_needed", "test_hist_counts_without_attention_is_false",
        "test_hist_patching_l0h0_carries_the_source_counts", "test_hist_scrub_mlp0_reads_the_count",
        "test_hist_scrub_head_writes_the_output_is_false", "test_hist_mlp0_writes_the_whole_correct_logit"],
        False, False),
}


def module_claims(key: str, model) -> dict:
    """The chosen claims of one module on `model` (records by name, raise_on_failure off), with the
    fixtures the suite would pass (main run, fixed draws)."""
    import importlib

    from circuits.claims.core import Claims
    from circuits.claims.controls import main_control
    from circuits.claims.draws import Draws

    module = importlib.import_module(key.split(":")[0])
    _, fixture, tests, _, _ = OTHER_CLAIMS[key]
    claim = Claims(raise_on_failure=False, draws_seed=7)
    args = {fixture: model, "claim": claim, "control": main_control(), "figures": _Figures(), "draws": Draws(11)}
    if key == "test_skip_trigrams":
        args["d"] = module.data(Draws(5))
    if key == "test_icl":
        args["icl_eval"] = module.icl.generate(2_000, module.EVAL_SEED)
    for test in tests:
        fn = getattr(module, test)
        fn(**{p: args[p] for p in inspect.signature(fn).parameters})
    return {r.name: r for r in claim.records}


@pytest.mark.parametrize("key", list(OTHER_CLAIMS))
def test_other_modules_claims_keep_their_verdicts_and_values(key):
    from circuits.zoo import registry as zoo

    name, _, tests, residual, heads = OTHER_CLAIMS[key]
    # ICL reads float32 inputs: float32 there, values compared to float32 rounding (a claim within 1e-4
    # of its bound could flip; none of the chosen ones is)
    dtype, tol = (torch.float32, 1e-4) if key == "test_icl" else (torch.float64, TOL)
    model = zoo.load(name).model.to(dtype).eval()
    other = _index_preserving(model, residual=residual, heads=heads)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    if getattr(model.cfg, "d_vocab", 0):  # token models: the function itself, on random strings
        toks = torch.randint(0, model.cfg.d_vocab, (64, model.cfg.n_ctx), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            la, lb = model(toks), other(toks)
        assert float((la - lb).abs().max()) <= 1e-9 * max(1.0, float(la.abs().max())), f"{key}: logits moved"
    else:  # the read-in model: on its evaluation inputs
        import test_icl

        x = test_icl.icl.generate(64, 1).inputs.to(dtype)
        with torch.no_grad():
            la, lb = model(x), other(x)
        assert float((la - lb).abs().max()) <= 1e-4 * max(1.0, float(la.abs().max())), f"{key}: outputs moved"
    before = module_claims(key, model)
    assert len(before) >= len(tests), f"{key}: only {len(before)} claims recorded for {len(tests)} tests"
    _same_claims(before, module_claims(key, other), key, tol)


def test_a_rewrite_that_changes_the_function_is_caught():
    """The comparison has teeth on these modules too: W_V of the Tracr histogram's head scaled without
    W_O scaled back (not function-preserving) moves its claims' values or verdicts."""
    from circuits.zoo import registry as zoo

    model = zoo.load("tracr_hist").model.double().eval()
    other = _copy(model)
    with torch.no_grad():
        other.blocks[0].attn.W_QKV[2, 0] *= 0.5
    with pytest.raises(AssertionError, match="verdict|value"):
        _same_claims(module_claims("test_ground_truth:hist", model), module_claims("test_ground_truth:hist", other),
                     "hist, W_V halved")
