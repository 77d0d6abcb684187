"""Issue 31 (bad input, round 2): every try the fault injection listed, each with a clear one-line
`circuits.errors` error or a documented, tested behaviour. Library-level tries here; the report /
option / store tries are at the end of this module."""

from __future__ import annotations

import pytest
import torch

from circuits.assoc_model import AssocConfig, all_contexts, build_model
from circuits.errors import HookNameError, HookOutputError, InputError
from circuits.interventions import patch_activations, resample_activations, resample_together
from model_configs import CONFIGS, perturbed_model


@pytest.fixture(scope="module")
def model():
    return perturbed_model("palindrome")  # [batch, 12] tokens, 2 layers x 2 heads, MLPs


@pytest.fixture(scope="module")
def toks(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 5, (4, model.cfg.n_ctx), generator=g)  # no pad token (5)


# --- patching helpers: the same validation as resample_activations ---------------------------------
BAD_PATCHES = [  # (index, hook, what the message must name)
    ((99,), "blocks.0.hook_resid_pre", "out of range"),
    ((-99,), "blocks.0.hook_resid_pre", "out of range"),
    ((0, 9), "blocks.0.attn.hook_z", "out of range"),  # head 9 of 2
    ((0, 0, 0, 0), "blocks.0.attn.hook_z", "has 4 indices"),  # too many dims
    (("0",), "blocks.0.hook_resid_pre", "not an int"),  # a string index
    ((1.0,), "blocks.0.hook_resid_pre", "not an int"),  # a float index is not truncated
    ((True,), "blocks.0.hook_resid_pre", "not an int"),
]


@pytest.mark.parametrize("index,name,what", BAD_PATCHES)
def test_patch_helpers_share_index_validation(model, toks, index, name, what):
    for call in (lambda: patch_activations(model, toks, toks.flip(0), [(name, index)]),
                 lambda: resample_activations(model, toks, [(name, index)], [torch.arange(4).flip(0)]),
                 lambda: resample_together(model, toks, [(name, index)], [[torch.arange(4).flip(0)]])):
        with pytest.raises(InputError, match=what) as info:
            call()
        assert name in str(info.value) and "\n" not in str(info.value)


def test_patch_index_must_be_a_tuple(model, toks):
    with pytest.raises(InputError, match="must be a tuple"):
        patch_activations(model, toks, toks, [("blocks.0.hook_resid_pre", 1)])
    with pytest.raises(InputError, match="a patch is"):
        patch_activations(model, toks, toks, ["blocks.0.hook_resid_pre"])


def test_short_source_is_not_broadcast(model, toks):
    # a length-1 source over every position used to broadcast silently
    with pytest.raises(InputError, match=r"source slice has shape \(4, 1, 32\) but the target's is \(4, 12, 32\)"):
        patch_activations(model, toks, toks[:, :1], [("blocks.0.hook_resid_pre", ())])
    with pytest.raises(InputError, match=r"\(4, 3, 32\)"):  # a length-3 source
        patch_activations(model, toks, toks[:, :3], [("blocks.0.hook_resid_pre", ())])
    with pytest.raises(InputError, match="out of range"):  # a position the short source lacks
        patch_activations(model, toks, toks[:, :3], [("blocks.0.hook_resid_pre", (5,))])


def test_patch_at_a_position_both_have_still_works(model, toks):
    # documented: source and target may differ in length where the patched positions exist in both
    out = patch_activations(model, toks, toks[:, :3].flip(0), [("blocks.1.attn.hook_z", (1, 0))])
    full = toks.clone()
    full[:, :3] = toks[:, :3].flip(0)
    assert torch.equal(out, patch_activations(model, toks, full, [("blocks.1.attn.hook_z", (1, 0))]))
    # and every valid kind of index agrees with resample_activations
    rows = torch.tensor([2, 0, 3, 1])
    for index in [(), (3,), (-1,), (slice(2, 5),), (3, 1), (torch.tensor([0, 4]),)]:
        patches = [("blocks.0.attn.hook_z", index)]
        torch.testing.assert_close(patch_activations(model, toks, toks[rows], patches),
                                   resample_activations(model, toks, patches, [rows])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [torch.tensor([1.0, 0.0, 3.0, 2.0]), [1.5, 0, 3, 2], torch.ones(4, dtype=torch.bool)])
def test_float_rows_refused(model, toks, rows):
    with pytest.raises(InputError, match="must be integers"):
        resample_activations(model, toks, [("blocks.0.hook_resid_pre", (1,))], [rows])
    with pytest.raises(InputError, match="must be integers"):
        resample_together(model, toks, [("blocks.0.hook_resid_pre", (1,))], [[rows]])


# --- cache helpers: out-of-range positions ------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(model, toks):
    with torch.no_grad():
        return model.run_with_cache(toks)[1]


@pytest.mark.parametrize("call", [
    lambda c: c.residual(pos=99), lambda c: c.residual(pos=-99), lambda c: c.residual(1, pos=12),
    lambda c: c.head_decomposition(0, pos=99), lambda c: c.head_decomposition(None, pos=slice(20, 30)),
    lambda c: c.accumulated_resid(pos=99),
    lambda c: c.decompose_resid(1, pos_slice=99), lambda c: c.decompose_resid(1, pos_slice=[0, 99]),
    lambda c: c.stack_head_results(pos_slice=-13),
])
def test_cache_positions_out_of_range(cache, call):
    with pytest.raises(InputError, match="out of range|selects no position"):
        call(cache)


def test_cache_decompose_resid_pos_out_of_range(cache):
    with pytest.warns(DeprecationWarning), pytest.raises(InputError, match="out of range"):
        cache.decompose_resid(1, pos=99)


@pytest.mark.parametrize("pos", [1.0, "3", True, [0.5, 1.0]])
def test_cache_non_integer_positions_refused(cache, pos):
    with pytest.raises(InputError):
        cache.residual(pos=pos) if not isinstance(pos, list) else cache.decompose_resid(1, pos_slice=pos)


def test_cache_valid_positions_unchanged(cache):
    full = cache.residual(1)
    assert torch.equal(cache.residual(1, pos=-1), full[:, -1:])
    assert torch.equal(cache.residual(1, pos=-12), full[:, :1])
    assert torch.equal(cache.residual(1, pos=11), full[:, 11:])
    assert torch.equal(cache.decompose_resid(1, pos_slice=[-1, 0]), cache.decompose_resid(1)[:, :, [11, 0]])


# --- hook points that cannot fire -----------------------------------------------------------------------
ATTN_ONLY_MODELS = {
    "attn_only": lambda: perturbed_model("attn_only"),
    "assoc": lambda: build_model(AssocConfig(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=1,
                                             head_maps="per_head")),
    "assoc_compressed": lambda: build_model(AssocConfig(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=1,
                                                        pos_in_residual=False)),
    "assoc_no_residual": lambda: build_model(AssocConfig(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=1,
                                                         head_maps="per_head", residual=False, qk_input="position")),
}


def _inputs(model):
    if hasattr(model, "acfg"):
        return all_contexts(model.acfg.d_vocab, model.acfg.n_ctx)
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    if cfg.d_input:
        return torch.randn(3, cfg.n_ctx, cfg.d_input, generator=g)
    return torch.randint(0, cfg.d_vocab, (3, cfg.n_ctx), generator=g) % (cfg.pad_token or cfg.d_vocab)


@pytest.mark.parametrize("build", list(ATTN_ONLY_MODELS.values()) + [lambda c=c: perturbed_model(c) for c in CONFIGS],
                         ids=list(ATTN_ONLY_MODELS) + list(CONFIGS))
def test_every_listed_hook_point_fires(build):
    model = build().eval()
    fired = set()
    with torch.no_grad():
        model.run_with_hooks(_inputs(model), fwd_hooks=[(lambda n: True, lambda x, hook: fired.add(hook.name))])
    assert fired == set(model.hook_dict), f"listed but never fire: {sorted(set(model.hook_dict) - fired)}"


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.mlp.hook_post",
                                  "blocks.0.ln2.hook_scale"])
def test_dead_hook_names_raise_on_attention_only(name):
    model = ATTN_ONLY_MODELS["attn_only"]()
    x = _inputs(model)
    with pytest.raises(HookNameError, match="attention-only .*blocks.0.hook_resid_post"):
        model.run_with_hooks(x, fwd_hooks=[(name, lambda x, hook: torch.zeros_like(x))])
    _, cache = model.run_with_cache(x, names=["blocks.0.hook_resid_post"])
    with pytest.raises(HookNameError, match="attention-only"):
        cache[name]
