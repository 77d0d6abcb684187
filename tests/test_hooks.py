"""Hook points: TransformerLens names, editing hooks (checked against hand computations), ablation,
clean-up on every exit path, and unknown-name errors that suggest the closest names."""

from __future__ import annotations

import pytest
import torch

from circuits.errors import HookNameError, HookOutputError, InputError
from circuits.model.hooks import HookPoint
from circuits.model.transformer import HookedTransformer
from circuits.tasks.brackets.data import tokenize
from model_configs import ATTN_ONLY, BRACKETS, PALINDROME, perturbed_model




def make_model(cfg: dict, dtype=torch.float64) -> HookedTransformer:
    return perturbed_model(cfg, dtype=dtype)


def bracket_tokens() -> torch.Tensor:
    return tokenize(["(()())", ")(", "((((()))))()", "", "()" * 20], pad_to=42)


def assert_no_hooks(model: HookedTransformer) -> None:
    active = [name for name, hp in model.hook_dict.items() if hp.fns]
    assert not active, f"hook functions left attached on {active}"


def ln(x, mod, eps=1e-5):
    c = x - x.mean(-1, keepdim=True)
    return c / (c.pow(2).mean(-1, keepdim=True) + eps).sqrt() * mod.w + mod.b


# --- names ----------------------------------------------------------------------------------------
def test_hook_names_are_transformerlens_names():
    model = make_model(BRACKETS)
    expected = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"}
    for l in range(3):
        b = f"blocks.{l}."
        expected |= {b + n for n in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                                     "hook_resid_post", "ln1.hook_scale", "ln1.hook_normalized",
                                     "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post")}
        expected |= {b + "attn." + n for n in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern",
                                               "hook_z", "hook_result")}
    assert set(model.hook_dict) == expected
    for name, hp in model.hook_dict.items():
        assert isinstance(hp, HookPoint) and hp.name == name and model.get_submodule(name) is hp


def test_hook_receives_activation_and_its_hook_point():
    model = make_model(BRACKETS)
    seen = []
    model.run_with_hooks(bracket_tokens(), fwd_hooks=[
        (lambda n: n.endswith("hook_z"), lambda x, hook: seen.append((hook.name, tuple(x.shape))))])
    assert seen == [(f"blocks.{l}.attn.hook_z", (5, 42, 2, 28)) for l in range(3)]


# --- editing hooks --------------------------------------------------------------------------------
def test_editing_hook_changes_output_exactly_as_computed():
    """No-LN model: adding a vector to the final residual at the read-out position moves the logits by
    that vector times W_U, exactly."""
    model = make_model(PALINDROME)
    x = torch.randint(0, 5, (4, 12), generator=torch.Generator().manual_seed(0))
    delta = torch.randn(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def add(resid, hook):
        resid = resid.clone()
        resid[:, 0] += delta
        return resid

    with torch.no_grad():
        clean = model(x)
        edited = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", add)])
    assert not torch.allclose(clean, edited)
    torch.testing.assert_close(edited, clean + delta @ model.unembed.W_U, atol=1e-12, rtol=1e-12)
    assert_no_hooks(model)


def test_several_hooks_on_one_point_apply_in_order():
    model = make_model(PALINDROME)
    x = torch.randint(0, 5, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", lambda r, hook: r * 2),
                                               ("blocks.1.hook_resid_post", lambda r, hook: r + 1)])
        b = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", lambda r, hook: (r + 1) * 2)])
        c = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", lambda r, hook: r * 2 + 1)])
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)


def test_zero_ablating_head_in_last_layer_matches_hand_computation():
    model = make_model(BRACKETS)
    x = bracket_tokens()
    blk = model.blocks[2]
    for head in range(2):
        def ablate(z, hook, head=head):
            z = z.clone()
            z[:, :, head] = 0.0
            return z

        with torch.no_grad():
            clean, cache = model.run_with_cache(x)
            ablated = model.run_with_hooks(x, fwd_hooks=[("blocks.2.attn.hook_z", ablate)])
            # by hand: remove the head's output from resid_mid, rerun ln2 + MLP, final LN, unembed
            resid_mid = cache["blocks.2.hook_resid_mid"] - cache["blocks.2.attn.hook_result"][:, :, head]
            h = ln(resid_mid, blk.ln2) @ blk.mlp.W_in + blk.mlp.b_in
            resid_post = resid_mid + torch.relu(h) @ blk.mlp.W_out + blk.mlp.b_out
            expected = ln(resid_post[:, 0], model.ln_final) @ model.unembed.W_U + model.unembed.b_U
        assert (ablated - clean).abs().max() > 1e-3
        torch.testing.assert_close(ablated, expected, atol=1e-10, rtol=1e-10)


def test_zero_ablating_head_in_attention_only_model():
    """One-hot unembed, no LN: the ablated head's output leaves the logits exactly."""
    model = make_model(ATTN_ONLY)
    x = torch.randint(0, 11, (6, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, cache = model.run_with_cache(x, names=["blocks.0.attn.hook_result"])
        for head in range(3):
            ablated = model.run_with_hooks(x, fwd_hooks=[
                ("blocks.0.attn.hook_z", lambda z, hook: z.index_fill(2, torch.tensor([head]), 0.0))])
            torch.testing.assert_close(ablated, clean - cache["blocks.0.attn.hook_result"][:, -1, head],
                                       atol=1e-12, rtol=1e-12)


def test_editing_pattern_is_used_downstream():
    """Replace head 1's pattern in layer 0 with attention to position 0 only: its z is v at position 0."""
    model = make_model(BRACKETS)
    x = bracket_tokens()

    def to_first(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 1] = 0.0
        pattern[:, 1, :, 0] = 1.0
        return pattern

    with torch.no_grad(), model.hooks([("blocks.0.attn.hook_pattern", to_first)]):
        out, cache = model.run_with_cache(x, names=["blocks.0.attn.hook_v", "blocks.0.attn.hook_z",
                                                    "blocks.0.attn.hook_pattern"])
    assert torch.all(cache["blocks.0.attn.hook_pattern"][:, 1, :, 0] == 1.0)  # the cache sees the edit
    v, z = cache["blocks.0.attn.hook_v"], cache["blocks.0.attn.hook_z"]
    torch.testing.assert_close(z[:, :, 1], v[:, :1, 1].expand_as(z[:, :, 1]), atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out, model(x))
    assert_no_hooks(model)


def test_zeroing_queries_gives_uniform_attention_over_unpadded_keys():
    model = make_model(BRACKETS)
    x = bracket_tokens()
    with torch.no_grad(), model.hooks([("blocks.1.attn.hook_q", lambda q, hook: torch.zeros_like(q))]):
        _, cache = model.run_with_cache(x, names=["blocks.1.attn.hook_pattern"])
    pattern = cache["blocks.1.attn.hook_pattern"]
    # with q = 0 every score is 0 except masked keys: uniform over non-pad keys
    keep = (x != 1).double()
    expected = (keep / keep.sum(1, keepdim=True))[:, None, None, :].expand_as(pattern)
    torch.testing.assert_close(pattern, expected, atol=1e-12, rtol=1e-12)


def test_editing_ln_scale_rescales_normalized():
    model = make_model(BRACKETS)
    x = bracket_tokens()
    with torch.no_grad():
        _, clean = model.run_with_cache(x, names=["ln_final.hook_normalized"])
        with model.hooks([("ln_final.hook_scale", lambda s, hook: s * 2)]):
            out, cache = model.run_with_cache(x, names=["ln_final.hook_normalized"])
    normalized = clean["ln_final.hook_normalized"] / 2
    torch.testing.assert_close(cache["ln_final.hook_normalized"], normalized, atol=1e-12, rtol=1e-12)
    expected = (normalized[:, 0] * model.ln_final.w + model.ln_final.b) @ model.unembed.W_U + model.unembed.b_U
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_editing_hook_result_and_mlp_post():
    model = make_model(BRACKETS)
    x = bracket_tokens()
    with torch.no_grad():
        clean = model(x)
        for name, fn in [("blocks.0.attn.hook_result", lambda r, hook: r * 0),
                         ("blocks.1.mlp.hook_post", lambda p, hook: p * 0),
                         ("blocks.2.ln1.hook_normalized", lambda n, hook: n * 0)]:
            assert not torch.allclose(model.run_with_hooks(x, fwd_hooks=[(name, fn)]), clean), name
        torch.testing.assert_close(model(x), clean, atol=0, rtol=0)


# --- clean-up -------------------------------------------------------------------------------------
def test_hooks_context_cleans_up_on_exception():
    model = make_model(BRACKETS)
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks([(name, lambda x, hook: None) for name in model.hook_dict]):
            assert all(len(hp.fns) == 1 for hp in model.hook_dict.values())
            raise RuntimeError("boom")
    assert_no_hooks(model)


def test_hooks_context_cleans_up_when_attaching_fails_partway():
    model = make_model(BRACKETS)
    with pytest.raises(HookNameError):
        with model.hooks([("blocks.0.hook_resid_pre", lambda x, hook: None),
                          ("blocks.0.hook_resid_prex", lambda x, hook: None)]):
            pass  # pragma: no cover
    assert_no_hooks(model)


def test_run_with_hooks_cleans_up_when_a_hook_raises():
    model = make_model(BRACKETS)

    def bad(x, hook):
        raise ValueError("hook failed")

    with pytest.raises(ValueError, match="hook failed"):
        model.run_with_hooks(bracket_tokens(), fwd_hooks=[("blocks.1.hook_mlp_out", bad),
                                                          ("blocks.0.hook_mlp_out", lambda x, hook: None)])
    assert_no_hooks(model)


def test_run_with_cache_cleans_up_on_bad_input():
    model = make_model(BRACKETS)
    with pytest.raises(InputError):
        model.run_with_cache(torch.full((2, 5), 7))
    assert_no_hooks(model)
    with model.hooks([("hook_embed", lambda x, hook: None)]):
        with pytest.raises(InputError):
            model.run_with_cache(torch.full((2, 5), 7), names=["hook_embed"])
        assert len(model.hook_dict["hook_embed"].fns) == 1  # the user's hook stays until its block ends
    assert_no_hooks(model)


def test_hooks_context_is_reentrant_and_nests():
    model = make_model(BRACKETS)
    f, g = (lambda x, hook: None), (lambda x, hook: None)
    with model.hooks([("hook_embed", f)]):
        with model.hooks([("hook_embed", g), ("hook_embed", f)]):
            assert model.hook_dict["hook_embed"].fns == [f, g, f]
        assert model.hook_dict["hook_embed"].fns == [f]
    assert_no_hooks(model)


def test_reset_hooks():
    model = make_model(BRACKETS)
    model.hook_dict["blocks.0.hook_resid_pre"].fns.append(lambda x, hook: None)
    model.reset_hooks()
    assert_no_hooks(model)


# --- unknown names --------------------------------------------------------------------------------
TYPOS = [("blocks.0.attn.hook_patern", "blocks.0.attn.hook_pattern"),
         ("blocks.2.hook_resid_postt", "blocks.2.hook_resid_post"),
         ("ln_final.hook_scal", "ln_final.hook_scale"),
         ("blocks.1.hook_mlp_output", "blocks.1.hook_mlp_out")]


@pytest.mark.parametrize("typo, closest", TYPOS)
def test_unknown_name_in_run_with_cache(typo, closest):
    model = make_model(BRACKETS)
    with pytest.raises(HookNameError, match=rf"unknown hook name {typo!r}; did you mean {closest!r}"):
        model.run_with_cache(bracket_tokens(), names=["hook_embed", typo])
    assert_no_hooks(model)


@pytest.mark.parametrize("typo, closest", TYPOS)
def test_unknown_name_in_run_with_hooks(typo, closest):
    model = make_model(BRACKETS)
    with pytest.raises(HookNameError, match=rf"unknown hook name {typo!r}; did you mean {closest!r}"):
        model.run_with_hooks(bracket_tokens(), fwd_hooks=[(typo, lambda x, hook: None)])
    assert_no_hooks(model)


@pytest.mark.parametrize("typo, closest", TYPOS)
def test_unknown_name_in_hooks_context(typo, closest):
    model = make_model(BRACKETS)
    with pytest.raises(HookNameError, match=rf"unknown hook name {typo!r}; did you mean {closest!r}"):
        with model.hooks([(typo, lambda x, hook: None)]):
            pass  # pragma: no cover
    assert_no_hooks(model)


def test_hook_name_error_is_readable_and_a_keyerror():
    model = make_model(BRACKETS)
    with pytest.raises(KeyError) as e:
        model.run_with_cache(bracket_tokens(), names="blocks.9.hook_resid_pre")
    assert isinstance(e.value, HookNameError)
    assert str(e.value).startswith("unknown hook name 'blocks.9.hook_resid_pre'")  # no KeyError quoting
    assert "hook points" in str(e.value)


def test_name_far_from_every_hook_has_no_suggestion():
    model = make_model(BRACKETS)
    with pytest.raises(HookNameError, match=r"unknown hook name 'zzzz' \(this model has 58 hook points"):
        model.run_with_cache(bracket_tokens(), names=["zzzz"])


def test_predicate_matching_nothing_in_hooks_context():
    model = make_model(BRACKETS)
    with pytest.raises(HookNameError, match="matches no hook point"):
        model.run_with_hooks(bracket_tokens(), fwd_hooks=[(lambda n: n.endswith("hook_rot_k"), lambda x, hook: None)])
    assert_no_hooks(model)


def test_attention_only_model_has_no_mlp_hooks():
    model = make_model(ATTN_ONLY)
    with pytest.raises(HookNameError, match=r"unknown hook name 'blocks.0.mlp.hook_pre'"):
        model.run_with_cache(torch.zeros(1, 3, dtype=torch.long), names=["blocks.0.mlp.hook_pre"])


# --- hook outputs are checked ---------------------------------------------------------------------
# Each returns something other than None or a tensor of the activation's shape, dtype and device.
# Several are broadcastable against the activation (x[:1], x[:, :1], x[0], x.mean(0)), which torch
# would otherwise carry on with silently (a batch of 5 becoming 1).
BAD_OUTPUTS = {
    "fewer rows": lambda x: x[:1],
    "more rows": lambda x: torch.cat([x, x]),
    "one position (broadcastable)": lambda x: x[:, :1],
    "batch axis dropped (broadcastable)": lambda x: x[0],
    "mean over batch, axis dropped": lambda x: x.mean(0),
    "extra leading axis": lambda x: x[None],
    "extra trailing axis": lambda x: x[..., None],
    "scalar tensor": lambda x: x.sum(),
    "wrong dtype (float32 in a float64 model)": lambda x: x.float(),
    "wrong dtype (int)": lambda x: x.long(),
    "wrong dtype (bool)": lambda x: x > 0,
    "a list": lambda x: x.tolist(),
    "a numpy array": lambda x: x.numpy(),
    "an int": lambda x: 0,
    "a float": lambda x: 1.0,
    "a tuple holding the tensor": lambda x: (x,),
}


@pytest.mark.parametrize("point", ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.2.attn.hook_z",
                                   "blocks.0.ln1.hook_scale", "hook_embed", "blocks.2.mlp.hook_post"])
@pytest.mark.parametrize("what", list(BAD_OUTPUTS))
def test_hook_returning_a_wrong_output_is_a_clear_error(what, point):
    model = make_model(BRACKETS)
    x = bracket_tokens()
    with torch.no_grad():
        act = model.run_with_cache(x, names=[point])[1][point]
        with pytest.raises(HookOutputError) as e:
            model.run_with_hooks(x, fwd_hooks=[(point, lambda a, hook: BAD_OUTPUTS[what](a))])
    msg = str(e.value)
    assert repr(point) in msg, msg
    assert f"expected a tensor of shape {tuple(act.shape)}, dtype {act.dtype}, device {act.device}" in msg, msg
    assert "\n" not in msg
    assert_no_hooks(model)


@torch.no_grad()
def test_hook_output_error_says_what_came_back():
    model = make_model(BRACKETS)
    with pytest.raises(HookOutputError, match=r"returned shape \(1, 42, 56\), dtype torch.float64, device cpu; "
                                              r"expected a tensor of shape \(5, 42, 56\)"):
        model.run_with_hooks(bracket_tokens(), fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x[:1])])
    with pytest.raises(HookOutputError, match=r"returned a list; expected"):
        model.run_with_hooks(bracket_tokens(), fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.tolist())])
    with pytest.raises(HookOutputError, match=r"returned a numpy.ndarray; expected"):
        model.run_with_hooks(bracket_tokens(), fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.numpy())])


def test_hook_output_error_is_a_circuits_error_and_a_type_error():
    from circuits.errors import CircuitsError

    assert issubclass(HookOutputError, CircuitsError) and issubclass(HookOutputError, TypeError)


def test_device_mismatch_in_a_hook_output_is_named():
    model = make_model(BRACKETS)
    with pytest.raises(HookOutputError, match=r"device meta; expected a tensor of shape .* device cpu"):
        model.run_with_hooks(bracket_tokens(), fwd_hooks=[("blocks.0.hook_resid_post",
                                                           lambda x, hook: torch.empty_like(x, device="meta"))])


@pytest.mark.parametrize("style", ["in place, returns None", "in place, returns it", "new tensor", "None"])
def test_valid_hook_outputs_still_work(style):
    model = make_model(BRACKETS)
    x = bracket_tokens()
    name = "blocks.1.hook_resid_post"
    with torch.no_grad():
        clean, cache = model.run_with_cache(x, names=[name])
        expected = clean if style == "None" else model(x, start_at_layer=2, resid=cache[name] * 2)
        def double_in_place(r, hook):
            r.mul_(2)

        fns = {"in place, returns None": double_in_place,
               "in place, returns it": lambda r, hook: r.mul_(2),
               "new tensor": lambda r, hook: r * 2,
               "None": lambda r, hook: None}
        got = model.run_with_hooks(x, fwd_hooks=[(name, fns[style])])
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_a_bad_output_from_a_later_hook_on_the_same_point_names_it():
    model = make_model(BRACKETS)

    def widen(x, hook):
        return x[..., :3]

    with pytest.raises(HookOutputError, match=r"hook .*widen on 'blocks.0.hook_mlp_out' returned shape \(5, 42, 3\)"):
        model.run_with_hooks(bracket_tokens(), fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: x + 1),
                                                          ("blocks.0.hook_mlp_out", widen)])
    assert_no_hooks(model)
