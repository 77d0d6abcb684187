"""ActivationCache: exact residual decompositions, per-head results, LayerNorm scale, stacks through a
frozen LayerNorm, projection, and which names a cache holds.

Same model configurations as tests/test_model.py (random weights, biases and LN weights moved off
their init so every bias term matters), float32 and float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from circuits.model.cache import ActivationCache, Deferred, decomposition_hook_names, project
from circuits.errors import CircuitsError, HookNameError, InputError
from circuits.model.transformer import MASKED_SCORE, HookedTransformer
from circuits.tasks.brackets.data import tokenize
from model_configs import CONFIGS, perturbed_model

LN_CONFIGS = ["brackets", "read_in"]
DTYPES = [torch.float32, torch.float64]
IDS = ["f32", "f64"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}




def make_model(name: str, dtype=torch.float32) -> HookedTransformer:
    return perturbed_model(name, dtype=dtype)


def make_input(model: HookedTransformer, batch: int = 5) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    if cfg.d_input:
        return torch.randn(batch, cfg.n_ctx, cfg.d_input, generator=g).to(model.embed.W_in.dtype)
    if cfg.d_vocab == 5:
        return tokenize(["(()())", ")(", "((((()))))()", "", "()" * 20][:batch], pad_to=cfg.n_ctx)
    toks = torch.randint(0, cfg.d_vocab, (batch, cfg.n_ctx), generator=g)
    if cfg.pad_token is not None:
        toks[toks == cfg.pad_token] = 0
        for i in range(1, batch):
            toks[i, cfg.n_ctx - 2 * i:] = cfg.pad_token
    return toks


def run(name, dtype, names=None):
    model = make_model(name, dtype)
    x = make_input(model)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x, names=names)
    return model, x, logits, cache


# --- residual decomposition -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_decomposition_sums_to_residual_at_every_layer(name, dtype):
    model, x, _, cache = run(name, dtype)
    n = model.cfg.n_layers
    for layer in list(range(n + 1)) + [None]:
        stack, labels = cache.head_decomposition(layer)
        assert stack.shape[0] == len(labels) and stack.dtype == dtype
        L = n if layer is None else layer
        n_expected = 1 + (model.cfg.positional != "none") + L * (model.cfg.n_heads + (model.cfg.d_mlp > 0)) + 1
        assert len(labels) == n_expected, labels
        assert labels[0] == "embed" and labels[-1] == "biases"
        expected = cache[f"blocks.{layer}.hook_resid_pre"] if L < n else cache[f"blocks.{n - 1}.hook_resid_post"]
        torch.testing.assert_close(stack.sum(0), expected, **TOL[dtype])
        torch.testing.assert_close(cache.residual(layer), expected, atol=0, rtol=0)
        # one position at a time too
        for pos in (0, -1, slice(1, 3)):
            s, _ = cache.head_decomposition(layer, pos=pos)
            torch.testing.assert_close(s.sum(0), cache.residual(layer, pos=pos), **TOL[dtype])


def test_decomposition_labels():
    model, _, _, cache = run("brackets", torch.float64)
    _, labels = cache.head_decomposition(2)
    assert labels == ["embed", "pos_embed", "L0H0", "L0H1", "L0.mlp", "L1H0", "L1H1", "L1.mlp", "biases"]
    _, labels = run("attn_only", torch.float64)[3].head_decomposition(None)
    assert labels == ["embed", "L0H0", "L0H1", "L0H2", "biases"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_decomposition_needs_only_its_hook_names(name, dtype):
    """A cache of exactly decomposition_hook_names suffices for every layer (no hidden dependency)."""
    model = make_model(name, dtype)
    x = make_input(model)
    names = decomposition_hook_names(model)
    with torch.no_grad():
        _, small = model.run_with_cache(x, names=names)
        _, full = model.run_with_cache(x)
    assert set(small) == set(names)
    for layer in range(model.cfg.n_layers + 1):
        torch.testing.assert_close(small.head_decomposition(layer)[0], full.head_decomposition(layer)[0], **TOL[dtype])
        torch.testing.assert_close(small.head_decomposition(layer)[0].sum(0), small.residual(layer), **TOL[dtype])


def test_accumulated_resid():
    model, _, _, cache = run("brackets", torch.float64)
    stack, labels = cache.accumulated_resid()
    assert labels == ["resid_pre 0", "resid_pre 1", "resid_pre 2", "final"]
    for l in range(3):
        torch.testing.assert_close(stack[l], cache[f"blocks.{l}.hook_resid_pre"], atol=0, rtol=0)
    torch.testing.assert_close(stack[3], cache["blocks.2.hook_resid_post"], atol=0, rtol=0)
    assert cache.accumulated_resid(1, pos=0)[0].shape == (2, 5, 1, 56)


@pytest.mark.parametrize("layer", [-1, 4, 1.0, "1"])
def test_bad_layer(layer):
    _, _, _, cache = run("brackets", torch.float32)
    with pytest.raises(InputError, match=r"layer must be an int in \[0, 3\]"):
        cache.head_decomposition(layer)


# --- per-head results -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_head_results_sum_to_attn_out(name, dtype):
    model, _, _, cache = run(name, dtype)
    for l, block in enumerate(model.blocks):
        result = cache[f"blocks.{l}.attn.hook_result"]
        assert result.shape[2] == model.cfg.n_heads and result.shape[-1] == model.cfg.d_model
        torch.testing.assert_close(result.sum(2) + block.attn.b_O, cache[f"blocks.{l}.hook_attn_out"], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_head_results_from_z_equal_hook_result(name, dtype):
    model = make_model(name, dtype)
    x = make_input(model)
    n = model.cfg.n_layers
    with torch.no_grad():
        _, with_result = model.run_with_cache(x, names=lambda s: s.endswith("hook_result"))
        _, with_z = model.run_with_cache(x, names=[f"blocks.{l}.attn.hook_z" for l in range(n)])
    for l in range(n):
        assert f"blocks.{l}.attn.hook_result" not in with_z  # so head_results really computes from z
        from_z = with_z.head_results(l)
        torch.testing.assert_close(from_z, with_result[f"blocks.{l}.attn.hook_result"], **TOL[dtype])
        by_hand = torch.einsum("bphd,hdm->bphm", with_z[f"blocks.{l}.attn.hook_z"], model.blocks[l].attn.W_O)
        torch.testing.assert_close(from_z, by_hand, **TOL[dtype])
        assert with_result.head_results(l) is with_result[f"blocks.{l}.attn.hook_result"]


def test_head_results_large_batch_path():
    """head_results switches kernels for large batch*pos: both give the same per-head outputs."""
    model = make_model("brackets", torch.float64)
    x = tokenize(["(())()", ")()("] * 10, pad_to=42)  # 20 x 42 = 840 > 512
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names=["blocks.1.attn.hook_z", "blocks.1.attn.hook_result"])
    z = cache["blocks.1.attn.hook_z"]
    by_hand = torch.einsum("bphd,hdm->bphm", z, model.blocks[1].attn.W_O)
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"], by_hand, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ActivationCache({"blocks.1.attn.hook_z": z}, model).head_results(1), by_hand,
                               atol=1e-12, rtol=1e-12)



# --- values computed on first read (run_with_cache defers what the forward does not need) -----------
def _deferred_names(cache) -> list[str]:
    return [n for n, v in cache._store.items() if type(v) is Deferred]


def _expected_deferred(model) -> list[str]:
    """Per block, in hook-point order: LayerNorm parts, scores, pattern, results (not ln_final's)."""
    names = []
    for l, block in enumerate(model.blocks):
        b = f"blocks.{l}."
        ln = model.cfg.normalization == "LN"
        names += [b + "ln1.hook_scale", b + "ln1.hook_normalized"] if ln else []
        names += [b + "attn.hook_attn_scores", b + "attn.hook_pattern", b + "attn.hook_result"]
        names += [b + "ln2.hook_scale", b + "ln2.hook_normalized"] if ln and model.cfg.d_mlp else []
    return [n for n in model.hook_dict if n in names]


def _allowed(model, x) -> torch.Tensor:
    """[batch, query, key] True = may attend, fully masked rows opened (as AttentionMask)."""
    B, P = x.shape[:2]
    allowed = torch.ones(B, P, P, dtype=torch.bool)
    if model.cfg.pad_token is not None and not model.cfg.d_input:
        allowed &= (x != model.cfg.pad_token)[:, None, :]
    if model.cfg.attention == "causal":
        allowed &= torch.ones(P, P, dtype=torch.bool).tril()
    return allowed | ~allowed.any(-1, keepdim=True)


TIGHT = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}


@pytest.mark.parametrize("batch", [5, 20], ids=["small", "large"])  # 20 x 42 > 512: head_results' einsum
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_deferred_entries_are_their_functions_of_the_cached_tensors(name, dtype, batch):
    """Caching everything defers scores, pattern, LayerNorm parts and per-head results. Read, each is
    (to 1e-6 in float32, 1e-12 in float64) its formula applied to the same cache's q, k, z and
    LayerNorm inputs, and (to the usual tolerance: the forward's other paths differ by rounding) the
    value the eager explicit path caches (detach=False keeps every value eager)."""
    model = make_model(name, dtype)
    x = make_input(model) if batch == 5 else torch.cat([make_input(model)] * 4)
    with torch.no_grad():
        logits, lazy = model.run_with_cache(x, defer=True)
        eager_logits, eager = model.run_with_cache(x, detach=False)
        _, not_deferred = model.run_with_cache(x, defer=False)
    expected = _expected_deferred(model)
    assert _deferred_names(lazy) == expected and _deferred_names(eager) == _deferred_names(not_deferred) == []
    for n in not_deferred:  # defer=False is the eager explicit path too
        torch.testing.assert_close(not_deferred[n], eager[n], atol=0, rtol=0)
    assert list(lazy) == list(eager) and len(lazy) == len(eager)  # same names, same order
    assert all(n in lazy for n in expected) and _deferred_names(lazy) == expected  # `in` computes nothing
    tight = TIGHT[dtype]
    allowed = _allowed(model, x)[:, None]  # [batch, 1, query, key]
    for l, block in enumerate(model.blocks):
        b = f"blocks.{l}."
        a = block.attn
        q, k, z = lazy[b + "attn.hook_q"], lazy[b + "attn.hook_k"], lazy[b + "attn.hook_z"]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(model.cfg.d_head)
        scores = torch.where(allowed, scores, scores + MASKED_SCORE)
        torch.testing.assert_close(lazy[b + "attn.hook_attn_scores"], scores, **tight)
        torch.testing.assert_close(lazy[b + "attn.hook_pattern"], scores.softmax(-1), **tight)
        torch.testing.assert_close(lazy[b + "attn.hook_result"], torch.einsum("bphd,hdm->bphm", z, a.W_O), **tight)
        lns = [("ln1", "hook_resid_pre")] + ([("ln2", "hook_resid_mid")] if model.cfg.d_mlp else [])
        for ln, source in lns if model.cfg.normalization == "LN" else []:
            inp = lazy[b + source]
            centred = inp - inp.mean(-1, keepdim=True)
            scale = (centred.pow(2).mean(-1, keepdim=True) + model.cfg.ln_eps).sqrt()
            torch.testing.assert_close(lazy[f"{b}{ln}.hook_scale"], scale, **tight)
            torch.testing.assert_close(lazy[f"{b}{ln}.hook_normalized"], centred / scale, **tight)
    for n in expected:
        assert lazy[n].dtype == dtype
    assert _deferred_names(lazy) == []  # computed once and kept
    assert lazy[expected[0]] is lazy[expected[0]]
    torch.testing.assert_close(logits, eager_logits, **TOL[dtype])
    for n in lazy:
        torch.testing.assert_close(lazy[n], eager[n], **TOL[dtype], msg=lambda m: f"{n}: {m}")
    if model.cfg.normalization == "LN":  # the first LayerNorm reads the same input in both runs
        for n in ("blocks.0.ln1.hook_scale", "blocks.0.ln1.hook_normalized"):
            torch.testing.assert_close(lazy[n], eager[n], **tight)


def test_the_default_caches_everything_eagerly_and_named_entries_by_size():
    """defer=None: a cache of every hook point is eager at every size (it is read whole or nearly,
    and a deferred entry read costs more than an eager one); named entries are eager in small
    batches and deferred from DEFER_MIN_TOKENS batch x positions on (the other entries then stay
    bitwise those of the fused forward). The values agree either way."""
    from circuits.model.transformer import DEFER_MIN_TOKENS

    model = make_model("brackets", torch.float64)
    small = make_input(model)
    large = torch.cat([small] * (DEFER_MIN_TOKENS // (small.shape[0] * small.shape[1]) + 1))
    named = ["blocks.1.attn.hook_pattern", "blocks.1.ln2.hook_normalized", "blocks.1.attn.hook_result",
             "blocks.2.hook_resid_post"]
    with torch.no_grad():
        _, auto_small = model.run_with_cache(small)
        _, lazy_small = model.run_with_cache(small, defer=True)
        _, auto_large = model.run_with_cache(large)
        _, named_small = model.run_with_cache(small, names=named)
        _, named_large = model.run_with_cache(large, names=named)
        _, named_large_lazy = model.run_with_cache(large, names=named, defer=True)
    assert _deferred_names(auto_small) == [] and _deferred_names(auto_large) == []
    assert _deferred_names(named_small) == [] and _deferred_names(named_large) == named[:3]
    assert torch.equal(named_large["blocks.2.hook_resid_post"], named_large_lazy["blocks.2.hook_resid_post"])
    for n in lazy_small:
        torch.testing.assert_close(auto_small[n], lazy_small[n], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(auto_large[n][:small.shape[0]], auto_small[n], atol=1e-12, rtol=1e-12)
    for n in named:
        torch.testing.assert_close(named_large[n][:small.shape[0]], named_small[n], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(named_small[n], auto_small[n], atol=1e-12, rtol=1e-12)


def test_a_deferred_entry_alone_equals_the_eager_one():
    """Asked for alone, a pattern / scale is computed from q, k / resid_pre captured for it (and not
    kept): the same value as the eager explicit sublayer, whose inputs are the same here."""
    model = make_model("causal_padded", torch.float64)
    x = make_input(model)
    for name in ("blocks.1.attn.hook_pattern", "blocks.1.ln2.hook_normalized", "blocks.0.attn.hook_result"):
        with torch.no_grad():
            _, lazy = model.run_with_cache(x, names=[name], defer=True)
            _, eager = model.run_with_cache(x, names=[name], detach=False)
        assert list(lazy) == [name] and _deferred_names(lazy) == [name] and _deferred_names(eager) == []
        torch.testing.assert_close(lazy[name], eager[name], atol=1e-12, rtol=1e-12)


def test_deferred_entries_are_the_values_at_caching_time():
    """Weights edited after run_with_cache (an optimiser step, an ablation) do not reach the cached
    values: they are of the weights the forward used."""
    model = make_model("brackets", torch.float64)
    x = make_input(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, defer=True)
        expected = torch.einsum("bphd,hdm->bphm", cache["blocks.1.attn.hook_z"], model.blocks[1].attn.W_O)
        model.blocks[1].attn.W_O.mul_(0.5)
        model.blocks[1].ln1.eps = 1.0
    assert "blocks.1.attn.hook_result" in _deferred_names(cache)
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"], expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cache.head_results(1), expected, atol=1e-12, rtol=1e-12)
    inp = cache["blocks.1.hook_resid_pre"]
    scale = (inp - inp.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(cache["blocks.1.ln1.hook_scale"], scale, atol=1e-12, rtol=1e-12)



def test_deferred_entries_of_a_deep_copy_read_the_copy():
    """The deferral table is built once per model; a deep copy's must point at the copy's weights."""
    import copy
    model = make_model("brackets", torch.float64)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.blocks[0].attn.W_O.mul_(2.0)
        _, cache = twin.run_with_cache(make_input(model), names=["blocks.0.attn.hook_z", "blocks.0.attn.hook_result"], defer=True)
    assert _deferred_names(cache) == ["blocks.0.attn.hook_result"]
    expected = torch.einsum("bphd,hdm->bphm", cache["blocks.0.attn.hook_z"], twin.blocks[0].attn.W_O)
    torch.testing.assert_close(cache["blocks.0.attn.hook_result"], expected, atol=1e-12, rtol=1e-12)

def test_hook_points_with_a_function_attached_stay_eager_and_edits_flow_into_deferred_ones():
    """A user hook runs in the forward (its group is eager); an edit of q or z by a user hook is what
    both the forward and the deferred pattern / per-head results see."""
    model = make_model("brackets", torch.float64)
    x = make_input(model)
    seen = []
    with torch.no_grad(), model.hooks([("blocks.0.attn.hook_result", lambda r, hook: seen.append(r)),
                                       ("blocks.1.attn.hook_pattern", lambda p, hook: seen.append(p)),
                                       ("blocks.2.ln1.hook_scale", lambda p, hook: seen.append(p))]):
        _, cache = model.run_with_cache(x, defer=True)
    eager = {"blocks.0.attn.hook_result", "blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern",
             "blocks.2.ln1.hook_scale", "blocks.2.ln1.hook_normalized"}
    assert len(seen) == 3 and not eager & set(_deferred_names(cache))
    assert set(_deferred_names(cache)) == set(_expected_deferred(model)) - eager
    assert cache["blocks.0.attn.hook_result"] is seen[0] and cache["blocks.1.attn.hook_pattern"] is seen[1]

    def halve(t, hook):
        return t * 0.5

    with torch.no_grad(), model.hooks([("blocks.1.attn.hook_z", halve), ("blocks.1.attn.hook_q", halve)]):
        _, lazy = model.run_with_cache(x, defer=True)
        _, eager_cache = model.run_with_cache(x, detach=False)
    for n in ("blocks.1.attn.hook_result", "blocks.1.attn.hook_pattern"):
        assert n in _deferred_names(lazy)
        torch.testing.assert_close(lazy[n], eager_cache[n], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lazy["blocks.1.attn.hook_result"].sum(2) + model.blocks[1].attn.b_O,
                               lazy["blocks.1.hook_attn_out"], atol=1e-12, rtol=1e-12)


def test_deferred_entries_of_blocks_the_forward_skips_are_absent():
    model = make_model("brackets", torch.float64)
    x = make_input(model)
    with torch.no_grad():
        _, full = model.run_with_cache(x)
        _, lazy = model.run_with_cache(x, start_at_layer=2, resid=full["blocks.2.hook_resid_pre"], defer=True)
        _, eager = model.run_with_cache(x, start_at_layer=2, resid=full["blocks.2.hook_resid_pre"], detach=False)
    assert list(lazy) == list(eager) and not any(n.startswith(("blocks.0.", "blocks.1.")) for n in lazy)
    for n in lazy:
        torch.testing.assert_close(lazy[n], eager[n], atol=1e-10, rtol=1e-10)


# --- LayerNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", LN_CONFIGS)
def test_ln_scale_reproduces_normalized(name, dtype):
    model, x, logits, cache = run(name, dtype)
    n = model.cfg.n_layers
    pairs = [(f"blocks.{l}.ln1", cache[f"blocks.{l}.hook_resid_pre"]) for l in range(n)]
    pairs += [(f"blocks.{l}.ln2", cache[f"blocks.{l}.hook_resid_mid"]) for l in range(n)]
    final_in = cache[f"blocks.{n - 1}.hook_resid_post"]
    if model.cfg.readout == "first":
        final_in = final_in[:, :1]
    else:  # last: this batch has no padding (vector input), so the last position
        final_in = final_in[:, -1:]
    pairs.append(("ln_final", final_in))
    for ln, inp in pairs:
        scale = cache[f"{ln}.hook_scale"]
        assert scale.shape == inp.shape[:-1] + (1,)
        assert torch.all(scale > 0)
        torch.testing.assert_close(scale, (inp.var(-1, unbiased=False, keepdim=True) + model.cfg.ln_eps).sqrt(),
                                   **TOL[dtype])
        centred = inp - inp.mean(-1, keepdim=True)
        torch.testing.assert_close(centred / scale, cache[f"{ln}.hook_normalized"], **TOL[dtype])
    lnf = model.ln_final
    torch.testing.assert_close(model.unembed(cache["ln_final.hook_normalized"][:, 0] * lnf.w + lnf.b), logits,
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", LN_CONFIGS)
def test_apply_ln_to_stack_of_final_decomposition_sums_to_normalized(name, dtype):
    model, x, _, cache = run(name, dtype)
    pos = 0 if model.cfg.readout == "first" else -1
    stack, labels = cache.head_decomposition(None, pos=pos)  # [component, batch, 1, d_model]
    normed = cache.apply_ln_to_stack(stack, "ln_final")
    assert normed.shape == stack.shape
    torch.testing.assert_close(normed.sum(0), cache["ln_final.hook_normalized"], **TOL[dtype])
    # each component is centred (LN's mean removal is linear)
    torch.testing.assert_close(normed.mean(-1), torch.zeros_like(normed.mean(-1)), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_apply_ln_to_stack_of_block_layernorms(dtype):
    model, x, _, cache = run("brackets", dtype)
    for l in range(model.cfg.n_layers):
        stack, _ = cache.head_decomposition(l)
        torch.testing.assert_close(cache.apply_ln_to_stack(stack, f"blocks.{l}.ln1").sum(0),
                                   cache[f"blocks.{l}.ln1.hook_normalized"], **TOL[dtype])
        s, _ = cache.head_decomposition(l, pos=3)
        torch.testing.assert_close(cache.apply_ln_to_stack(s, f"blocks.{l}.ln1", pos=3).sum(0),
                                   cache[f"blocks.{l}.ln1.hook_normalized"][:, 3:4], **TOL[dtype])


def test_apply_ln_to_stack_errors():
    _, _, _, cache = run("brackets", torch.float32)
    stack, _ = cache.head_decomposition(None)  # every position, but ln_final saw only position 0
    with pytest.raises(InputError, match=r"stack positions \(5, 42\) do not match the cached ln_final scale"):
        cache.apply_ln_to_stack(stack, "ln_final")
    _, _, _, no_ln = run("palindrome", torch.float32)
    with pytest.raises(CircuitsError, match=r"no LayerNorm"):
        no_ln.apply_ln_to_stack(no_ln.head_decomposition(None)[0])


def test_direct_logit_attribution_through_frozen_ln_reproduces_logits():
    """Components through the frozen final LN, times w, projected on W_U[:, c], plus the constant
    terms, give the logit: the identity logit attributions rest on."""
    model, _, logits, cache = run("brackets", torch.float64)
    stack, _ = cache.head_decomposition(None, pos=0)
    normed = cache.apply_ln_to_stack(stack, "ln_final")[:, :, 0]  # [component, batch, d_model]
    lnf, U = model.ln_final, model.unembed
    for c in range(2):
        direction = lnf.w * U.W_U[:, c]
        contrib = project(normed, direction)  # [component, batch]
        assert contrib.shape == normed.shape[:2]
        const = lnf.b @ U.W_U[:, c] + U.b_U[c]
        torch.testing.assert_close(contrib.sum(0) + const, logits[:, c], atol=1e-10, rtol=1e-10)


def test_project_errors():
    with pytest.raises(InputError, match=r"direction must be \[d_model=4\], got \(3,\)"):
        project(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(InputError, match=r"direction must be \[d_model=4\], got \(4, 1\)"):
        project(torch.zeros(2, 4), torch.zeros(4, 1))


# --- what a cache holds ---------------------------------------------------------------------------
def test_cache_holds_only_the_names_asked_for():
    model = make_model("brackets")
    x = make_input(model)
    names = ["blocks.2.hook_resid_post", "blocks.1.attn.hook_pattern"]
    with torch.no_grad():
        out, cache = model.run_with_cache(x, names=names)
        torch.testing.assert_close(out, model(x), atol=2e-6, rtol=2e-6)  # pattern hook: explicit attention
    assert sorted(cache) == sorted(names) and len(cache) == 2
    assert cache["blocks.1.attn.hook_pattern"].shape == (5, 2, 42, 42)
    assert all(not hp.fns for hp in model.hook_dict.values())
    _, one = model.run_with_cache(x, names="hook_embed")
    assert list(one) == ["hook_embed"]


def test_cache_with_predicate():
    model = make_model("brackets")
    with torch.no_grad():
        _, cache = model.run_with_cache(make_input(model), names=lambda n: n.endswith("hook_pattern"))
    assert sorted(cache) == [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    _, empty = model.run_with_cache(make_input(model), names=lambda n: False)
    assert len(empty) == 0


def test_cache_all_names_by_default():
    model = make_model("brackets")
    with torch.no_grad():
        _, cache = model.run_with_cache(make_input(model))
    assert set(cache) == set(model.hook_dict)
    attn_only = make_model("attn_only")
    with torch.no_grad():
        _, cache = attn_only.run_with_cache(make_input(attn_only))
    assert set(cache) == set(attn_only.hook_dict)  # every listed hook point fires (no dead MLP points)


def test_cache_detaches_unless_asked():
    model = make_model("brackets").train()
    x = make_input(model)
    _, cache = model.run_with_cache(x, names=["blocks.0.hook_attn_out"])
    assert not cache["blocks.0.hook_attn_out"].requires_grad
    out, live = model.run_with_cache(x, names=["blocks.0.hook_attn_out"], detach=False)
    act = live["blocks.0.hook_attn_out"]
    assert act.requires_grad
    (g,) = torch.autograd.grad(out.sum(), act)
    assert g.shape == act.shape and g.abs().sum() > 0


def test_uncached_valid_name_says_it_was_not_cached():
    model = make_model("brackets")
    with torch.no_grad():
        _, cache = model.run_with_cache(make_input(model), names=["blocks.0.hook_resid_pre"])
    with pytest.raises(HookNameError, match=r"'blocks.1.attn.hook_z' is a hook point but was not cached"):
        cache["blocks.1.attn.hook_z"]
    with pytest.raises(HookNameError, match=r"was not cached"):
        cache.head_decomposition(1)  # needs hook_embed, which was not asked for
    assert "blocks.1.attn.hook_z" not in cache  # Mapping's __contains__ does not raise


def test_unknown_name_in_cache_suggests_closest():
    model = make_model("brackets")
    with torch.no_grad():
        _, cache = model.run_with_cache(make_input(model), names=["blocks.0.hook_resid_pre"])
    with pytest.raises(HookNameError, match=r"unknown hook name 'blocks.0.hook_resid_pr'.*did you mean "
                                            r"'blocks.0.hook_resid_pre'"):
        cache["blocks.0.hook_resid_pr"]
    with pytest.raises(HookNameError, match=r"unknown hook name 'blocks.1.attn.hook_patern'.*"
                                            r"'blocks.1.attn.hook_pattern'"):
        cache["blocks.1.attn.hook_patern"]


# --- TransformerLens spellings ------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["names_filter", "names"])
def test_names_filter_accepts_a_string_a_list_or_a_predicate(spelling):
    model = make_model("brackets")
    x = make_input(model)
    for flt, want in [("blocks.0.hook_resid_pre", {"blocks.0.hook_resid_pre"}),
                      (["hook_embed", "blocks.1.attn.hook_pattern"], {"hook_embed", "blocks.1.attn.hook_pattern"}),
                      (lambda n: n.endswith("hook_z"), {f"blocks.{l}.attn.hook_z" for l in range(3)})]:
        _, cache = model.run_with_cache(x, **{spelling: flt})
        assert set(cache) == want


def test_names_filter_and_names_together_is_an_error():
    model = make_model("brackets")
    with pytest.raises(InputError, match="either names= or names_filter="):
        model.run_with_cache(make_input(model), names=["hook_embed"], names_filter=["hook_embed"])
    assert all(not hp.fns for hp in model.hook_dict.values())


def test_names_filter_with_an_unknown_name_suggests_the_closest():
    model = make_model("brackets")
    with pytest.raises(HookNameError, match=r"did you mean 'blocks.0.attn.hook_pattern'"):
        model.run_with_cache(make_input(model), names_filter="blocks.0.attn.hook_patern")


# (key, hook name) as TransformerLens's get_act_name / ActivationCache.__getitem__ resolve them
TL_KEYS = [
    (("pattern", 0), "blocks.0.attn.hook_pattern"),
    (("attn", 1), "blocks.1.attn.hook_pattern"),
    (("attn_scores", 2), "blocks.2.attn.hook_attn_scores"),
    (("attn_logits", 2), "blocks.2.attn.hook_attn_scores"),
    (("q", 0, "attn"), "blocks.0.attn.hook_q"),
    (("query", 0), "blocks.0.attn.hook_q"),
    (("key", 1), "blocks.1.attn.hook_k"),
    (("v", 2, "a"), "blocks.2.attn.hook_v"),
    (("z", -1), "blocks.2.attn.hook_z"),
    (("result", 1), "blocks.1.attn.hook_result"),
    (("resid_pre", 1), "blocks.1.hook_resid_pre"),
    (("resid_pre", -1), "blocks.2.hook_resid_pre"),
    (("resid_mid", 0), "blocks.0.hook_resid_mid"),
    (("resid_post", 2), "blocks.2.hook_resid_post"),
    (("attn_out", 0), "blocks.0.hook_attn_out"),
    (("mlp_out", 1), "blocks.1.hook_mlp_out"),
    (("pre", 1), "blocks.1.mlp.hook_pre"),
    (("mlp_post", 0), "blocks.0.mlp.hook_post"),
    (("post", 2, "mlp"), "blocks.2.mlp.hook_post"),
    (("scale", 0, "ln1"), "blocks.0.ln1.hook_scale"),
    (("normalized", 1, "ln2"), "blocks.1.ln2.hook_normalized"),
    (("scale",), "ln_final.hook_scale"),
    ("scale", "ln_final.hook_scale"),
    ("normalized", "ln_final.hook_normalized"),
    ("embed", "hook_embed"),
    ("pos_embed", "hook_pos_embed"),
    ("k1a", "blocks.1.attn.hook_k"),
    ("pattern0", "blocks.0.attn.hook_pattern"),
    ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre"),
]


@pytest.mark.parametrize("key, name", TL_KEYS, ids=[repr(k) for k, _ in TL_KEYS])
def test_transformerlens_keys_resolve_to_hook_names(key, name):
    from circuits.model.cache import act_name

    _, _, _, cache = run("brackets", torch.float32)
    assert cache[key] is cache[name]
    if isinstance(key, str):
        assert act_name(key) == name


def test_unknown_transformerlens_key_suggests_the_closest_name():
    _, _, _, cache = run("brackets", torch.float32)
    with pytest.raises(HookNameError, match=r"\('patern', 0\) \(= 'blocks.0.hook_patern'\); did you mean "
                                            r"'blocks.0.attn.hook_pattern'"):
        cache["patern", 0]
    with pytest.raises(HookNameError, match=r"unknown hook name \('pattern', 7\) \(= 'blocks.7.attn.hook_pattern'\)"):
        cache["pattern", 7]
    with pytest.raises(HookNameError, match="the layer must be an int"):
        cache["pattern", "0"]
    with pytest.raises(HookNameError, match="cache keys are hook names or TransformerLens-style"):
        cache[0]
    _, _, _, small = run("brackets", torch.float32, names=["hook_embed"])
    with pytest.raises(HookNameError, match=r"\('pattern', 0\) \(= 'blocks.0.attn.hook_pattern'\) is a hook "
                                            r"point but was not cached"):
        small["pattern", 0]
    assert ("pattern", 0) not in small and ("embed",) in small and "embed" in small


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_stack_head_results_plus_biases_is_the_attention_output(name, dtype):
    model, _, _, cache = run(name, dtype, names=lambda n: n.endswith(("hook_z", "hook_attn_out", "resid_pre",
                                                                      "resid_post", "hook_result")))
    n, h = model.cfg.n_layers, model.cfg.n_heads
    stack, labels = cache.stack_head_results(-1, return_labels=True)  # every layer
    assert labels == [f"L{l}H{i}" for l in range(n) for i in range(h)]
    assert stack.shape[0] == n * h
    for l, block in enumerate(model.blocks):
        # hook_result was cached; the stack of heads before layer l+1 must agree with it and with attn_out
        heads = stack[l * h:(l + 1) * h]  # [head, batch, pos, d_model]
        torch.testing.assert_close(heads.sum(0) + block.attn.b_O.detach(), cache["attn_out", l], **TOL[dtype])
        torch.testing.assert_close(heads, cache["result", l].movedim(2, 0), **TOL[dtype])
    assert torch.equal(cache.stack_head_results(), stack) and torch.equal(cache.stack_head_results(None), stack)
    assert torch.equal(cache.stack_head_results(n), stack)
    assert cache.stack_head_results(1).shape[0] == h
    # without hook_result, computed from z and W_O
    _, _, _, z_only = run(name, dtype, names=lambda n: n.endswith(("hook_z", "resid_pre", "resid_post")))
    torch.testing.assert_close(z_only.stack_head_results(), stack, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_stack_head_results_with_remainder_sums_to_the_residual(name, dtype):
    model, _, _, cache = run(name, dtype)
    for layer in range(1, model.cfg.n_layers + 1):
        stack, labels = cache.stack_head_results(layer, return_labels=True, incl_remainder=True)
        assert labels[-1] == "remainder" and len(labels) == layer * model.cfg.n_heads + 1
        torch.testing.assert_close(stack.sum(0), cache.residual(layer), **TOL[dtype])
        # pos_slice as TransformerLens: an int drops the position axis, a slice keeps it
        one = cache.stack_head_results(layer, incl_remainder=True, pos_slice=3)
        torch.testing.assert_close(one, stack[:, :, 3], **TOL[dtype])
        torch.testing.assert_close(cache.stack_head_results(layer, pos_slice=slice(1, 4)), stack[:-1, :, 1:4])
        torch.testing.assert_close(cache.stack_head_results(layer, pos_slice=[0, 2]), stack[:-1, :, [0, 2]])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_decompose_resid_sums_to_the_residual(name, dtype):
    model, _, _, cache = run(name, dtype)
    n, has_mlp = model.cfg.n_layers, bool(model.cfg.d_mlp)
    for layer in range(n + 1):
        stack, labels = cache.decompose_resid(layer, return_labels=True)
        embeds = ["embed"] + (["pos_embed"] if model.cfg.positional != "none" else [])
        sub = [f"{l}_{k}_out" for l in range(layer) for k in (("attn", "mlp") if has_mlp else ("attn",))]
        assert labels == embeds + sub
        torch.testing.assert_close(stack.sum(0), cache.residual(layer), **TOL[dtype])
        assert torch.equal(cache.decompose_resid(layer), stack)  # the tensor alone by default
        if layer < n and has_mlp:  # the residual entering block `layer`'s MLP
            mid, mid_labels = cache.decompose_resid(layer, mlp_input=True, return_labels=True)
            assert mid_labels == labels + [f"{layer}_attn_out"]
            torch.testing.assert_close(mid.sum(0), cache["resid_mid", layer], **TOL[dtype])
    full = cache.decompose_resid(-1)
    assert torch.equal(full, cache.decompose_resid(None))
    attn, attn_labels = cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)
    assert attn_labels == [f"{l}_attn_out" for l in range(n)]
    torch.testing.assert_close(attn.sum(0), sum(cache["attn_out", l] for l in range(n)), **TOL[dtype])
    torch.testing.assert_close(cache.decompose_resid(pos_slice=2), full[:, :, 2])


def test_decompose_resid_apply_ln_sums_to_the_normalized_input_of_the_next_layernorm():
    model, _, _, cache = run("brackets", torch.float64)
    for layer in range(model.cfg.n_layers):
        stack = cache.decompose_resid(layer, apply_ln=True)
        torch.testing.assert_close(stack.sum(0), cache["normalized", layer, "ln1"], **TOL[torch.float64])
        mid = cache.decompose_resid(layer, mlp_input=True, apply_ln=True)
        torch.testing.assert_close(mid.sum(0), cache["normalized", layer, "ln2"], **TOL[torch.float64])
        heads = cache.stack_head_results(layer or 1, incl_remainder=True, apply_ln=True)
        torch.testing.assert_close(heads.sum(0), cache["normalized", layer or 1, "ln1"], **TOL[torch.float64])
    with pytest.raises(InputError, match="read-out position only"):  # brackets read out position 0
        cache.decompose_resid(apply_ln=True)


def test_decompose_resid_and_stack_head_results_errors():
    model, _, _, cache = run("brackets", torch.float32)
    with pytest.raises(InputError, match="mode must be"):
        cache.decompose_resid(mode="heads")
    with pytest.raises(InputError, match="mlp_input=True needs a block's MLP"):
        cache.decompose_resid(None, mlp_input=True)
    with pytest.raises(InputError, match=r"layer must be an int in \[0, 3\], -1 or None"):
        cache.decompose_resid(5)
    with pytest.raises(InputError, match="selects no component"):
        cache.decompose_resid(0, incl_embeds=False)
    with pytest.raises(InputError, match="no heads before it"):
        cache.stack_head_results(0)
    with pytest.raises(InputError, match=r"layer must be an int in \[0, 3\], -1 or None"):
        cache.stack_head_results(-2)


def test_old_decompose_resid_call_with_pos_still_gives_the_head_decomposition():
    _, _, _, cache = run("brackets", torch.float32)
    with pytest.warns(DeprecationWarning, match="head_decomposition"):
        stack, labels = cache.decompose_resid(None, pos=0)
    new_stack, new_labels = cache.head_decomposition(None, pos=0)
    assert labels == new_labels and torch.equal(stack, new_stack)
