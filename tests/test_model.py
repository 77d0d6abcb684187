"""HookedTransformer: every activation against a slow, obvious reference written from the weights;
fast paths against explicit paths; padding and read-out; weight views, dtype moves, copies, gradients;
bad input.

Each identity runs on four configurations that together cover every branch of the model (LayerNorm or
none, bidirectional or causal, padding or none, learned / sinusoidal / no positions, learned or one-hot
embed and unembed, token or vector input, ReLU / GELU / tanh-GELU, attention-only or with MLPs,
read-out first / last), in float32 and float64. Weights are random (`seed=0`) and then every bias and
LayerNorm weight is moved away from its init (zeros / ones), so bias terms are exercised.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from circuits.errors import ConfigError, InputError
from circuits.model.transformer import HookedTransformer, TransformerConfig
from circuits.tasks.brackets.data import tokenize
from model_configs import CONFIGS, perturbed_model
from circuits.model.transformer import MASKED_SCORE

REPO = Path(__file__).resolve().parents[1]



DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def make_model(name: str, dtype=torch.float32, init_range: float = 0.2) -> HookedTransformer:
    return perturbed_model(name, dtype=dtype, init_range=init_range)


def make_input(model: HookedTransformer, batch: int = 5, seed: int = 2) -> torch.Tensor:
    """Inputs of the right kind; token models with a pad token get right-padding of varying length
    (row 0 unpadded, so both the padded and the unpadded mask paths appear in one batch)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    P = cfg.n_ctx
    if cfg.d_input:
        return torch.randn(batch, P, cfg.d_input, generator=g, dtype=torch.float64).to(model.embed.W_in.dtype)
    if cfg.pad_token == 1 and cfg.d_vocab == 5:  # the bracket vocabulary: real bracket sequences
        return tokenize(["(()())", ")(", "((((()))))()", "", "()" * 20][:batch], pad_to=P)
    toks = torch.randint(0, cfg.d_vocab, (batch, P), generator=g)
    if cfg.pad_token is not None:
        toks[toks == cfg.pad_token] = (cfg.pad_token + 1) % cfg.d_vocab
        for i in range(1, batch):
            toks[i, P - (i * P) // (batch + 1):] = cfg.pad_token
    return toks


# --- the slow, obvious reference ------------------------------------------------------------------
def ln_ref(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    scale = (var + eps).sqrt()
    normalized = (x - mean) / scale
    return normalized * w + b, scale, normalized


def act_ref(x, act_fn):
    if act_fn == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    if act_fn == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def padding_of(model, x) -> torch.Tensor:
    cfg = model.cfg
    if cfg.d_input or cfg.pad_token is None:
        return torch.zeros(x.shape[:2], dtype=torch.bool)
    return x == cfg.pad_token


def readout_index(model, x) -> torch.Tensor:
    """[batch] position read by the model: 0, or each row's last non-pad position."""
    pad = padding_of(model, x)
    B, P = pad.shape
    if model.cfg.readout == "first":
        return torch.zeros(B, dtype=torch.long)
    return torch.tensor([max(p for p in range(P) if not pad[b, p]) for b in range(B)])


@torch.no_grad()
def reference_forward(model: HookedTransformer, x: torch.Tensor):
    """Every activation by hand from the weights: (logits, {hook name: activation})."""
    cfg = model.cfg
    acts = {}
    if cfg.d_input:
        embed = torch.einsum("bpi,im->bpm", x, model.embed.W_in) + model.embed.b_in
    else:
        embed = model.embed.W_E[x]
    acts["hook_embed"] = embed
    B, P, M = embed.shape
    resid = embed
    if cfg.positional != "none":
        acts["hook_pos_embed"] = model.pos_embed.W_pos[:P].expand(B, P, M)
        resid = resid + acts["hook_pos_embed"]
    allowed = ~padding_of(model, x)[:, None, :].expand(B, P, P)  # [batch, query, key]
    if cfg.attention == "causal":
        allowed = allowed & torch.ones(P, P, dtype=torch.bool).tril()
    for l, block in enumerate(model.blocks):
        n = f"blocks.{l}."
        acts[n + "hook_resid_pre"] = resid
        if cfg.normalization == "LN":
            x1, acts[n + "ln1.hook_scale"], acts[n + "ln1.hook_normalized"] = ln_ref(
                resid, block.ln1.w, block.ln1.b, cfg.ln_eps)
        else:
            x1 = resid
        a = block.attn
        q = torch.einsum("bpm,hmd->bphd", x1, a.W_Q) + a.b_Q
        k = torch.einsum("bpm,hmd->bphd", x1, a.W_K) + a.b_K
        v = torch.einsum("bpm,hmd->bphd", x1, a.W_V) + a.b_V
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.d_head)
        opened = allowed | ~allowed.any(-1, keepdim=True)  # fully masked rows attend everywhere
        scores = torch.where(opened[:, None], scores, scores + MASKED_SCORE)
        pattern = torch.softmax(scores, dim=-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        result = torch.einsum("bphd,hdm->bphm", z, a.W_O)
        attn_out = result.sum(2) + a.b_O
        acts.update({n + "attn.hook_q": q, n + "attn.hook_k": k, n + "attn.hook_v": v,
                     n + "attn.hook_attn_scores": scores, n + "attn.hook_pattern": pattern,
                     n + "attn.hook_z": z, n + "attn.hook_result": result, n + "hook_attn_out": attn_out})
        if cfg.d_mlp:
            resid_mid = acts[n + "hook_resid_mid"] = resid + attn_out
            if cfg.normalization == "LN":
                x2, acts[n + "ln2.hook_scale"], acts[n + "ln2.hook_normalized"] = ln_ref(
                    resid_mid, block.ln2.w, block.ln2.b, cfg.ln_eps)
            else:
                x2 = resid_mid
            pre = acts[n + "mlp.hook_pre"] = x2 @ block.mlp.W_in + block.mlp.b_in
            post = acts[n + "mlp.hook_post"] = act_ref(pre, cfg.act_fn)
            mlp_out = acts[n + "hook_mlp_out"] = post @ block.mlp.W_out + block.mlp.b_out
            resid = resid_mid + mlp_out
        else:
            resid = resid + attn_out
        acts[n + "hook_resid_post"] = resid
    final = resid[torch.arange(B), readout_index(model, x)][:, None]  # [batch, 1, d_model]
    if cfg.normalization == "LN":
        final, acts["ln_final.hook_scale"], acts["ln_final.hook_normalized"] = ln_ref(
            final, model.ln_final.w, model.ln_final.b, cfg.ln_eps)
    logits = final[:, 0] @ model.unembed.W_U + model.unembed.b_U
    return logits, acts


def all_hooks_returning_none(model):
    def noop(x, hook):
        assert isinstance(x, torch.Tensor)
        return None
    return [(name, noop) for name in model.hook_dict]


# --- identities -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_cached_activation_matches_reference(name, dtype):
    model = make_model(name, dtype)
    x = make_input(model)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x)
    ref_logits, ref = reference_forward(model, x)
    assert set(cache) == set(ref), "cached names differ from the reference's"
    for hook_name, expected in ref.items():
        got = cache[hook_name]
        assert got.dtype == dtype, hook_name
        torch.testing.assert_close(got, expected, **TOL[dtype], msg=lambda m: f"{hook_name}: {m}")
    torch.testing.assert_close(logits, ref_logits, **TOL[dtype])
    # and the plain forward (fast paths everywhere) gives the same logits
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_logits, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", CONFIGS)
def test_none_returning_hooks_do_not_change_output(name, dtype):
    """Activating every hook point switches every sublayer to its explicit path: fast == explicit."""
    model = make_model(name, dtype)
    x = make_input(model)
    with torch.no_grad():
        fast = model(x)
        explicit = model.run_with_hooks(x, fwd_hooks=all_hooks_returning_none(model))
        fast_all = model(x, readout="all")
        explicit_all = model.run_with_hooks(x, readout="all", fwd_hooks=all_hooks_returning_none(model))
    assert all(not hp.fns for hp in model.hook_dict.values())
    tol = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}[dtype]
    torch.testing.assert_close(explicit, fast, **tol)
    torch.testing.assert_close(explicit_all, fast_all, **tol)


@pytest.mark.parametrize("hook", ["attn.hook_result", "attn.hook_pattern", "attn.hook_v", "ln1.hook_scale",
                                  "ln1.hook_normalized", "mlp.hook_pre"])
def test_single_explicit_sublayer_matches_fast_path(hook):
    """One sublayer explicit, the rest fast (mixed paths), in float64."""
    model = make_model("brackets", torch.float64)
    x = make_input(model)
    with torch.no_grad():
        fast = model(x)
        for l in range(model.cfg.n_layers):
            mixed = model.run_with_hooks(x, fwd_hooks=[(f"blocks.{l}.{hook}", lambda a, hook: None)])
            torch.testing.assert_close(mixed, fast, atol=1e-12, rtol=1e-12)


def test_plain_model_computes_the_same_function():
    """benchmarks/plain_model.py (the speed baseline) must compute what the hooked model computes."""
    spec = importlib.util.spec_from_file_location("plain_model", REPO / "benchmarks" / "plain_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = make_model("brackets")
    plain = mod.PlainTransformer.from_hooked(model).eval()
    x = make_input(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
        unpadded = tokenize(["()()"])
        torch.testing.assert_close(plain(unpadded), model(unpadded), atol=1e-5, rtol=1e-5)


# --- padding and read-out -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_padding_does_not_change_position_zero(dtype):
    model = make_model("brackets", dtype)
    strings = ["()", "(()())", ")(", "(((", "()" * 20]
    tight = [tokenize([s]) for s in strings]  # each at its own length, no pad at all
    padded = tokenize(strings, pad_to=42)
    tol = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}[dtype]
    with torch.no_grad():
        batch_logits = model(padded)
        for i, t in enumerate(tight):
            torch.testing.assert_close(model(t)[0], batch_logits[i], **tol)
            for width in (t.shape[1] + 1, t.shape[1] + 7, 42):
                if width <= 42:
                    torch.testing.assert_close(model(tokenize([strings[i]], pad_to=width))[0],
                                               batch_logits[i], **tol)


def test_padding_changes_nothing_at_real_positions_in_causal_model():
    model = make_model("causal_padded", torch.float64)
    x = torch.tensor([[3, 4, 5, 6, 2]])
    with torch.no_grad():
        short = model(x, readout="all")
        long = model(torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1), readout="all")
    torch.testing.assert_close(long[:, :5], short, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["attn_only", "causal_padded", "read_in"])
def test_readout_last_picks_last_non_pad_token(name):
    model = make_model(name, torch.float64)
    x = make_input(model)
    idx = readout_index(model, x)
    if model.cfg.pad_token is not None:
        assert len(set(idx.tolist())) > 1, "the batch should have rows of several lengths"
    with torch.no_grad():
        every = model(x, readout="all")  # [batch, pos, d_vocab_out]
        last = model(x)  # [batch, d_vocab_out]
        first = model(x, readout="first")
    torch.testing.assert_close(last, every[torch.arange(len(idx)), idx], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(first, every[:, 0], atol=1e-12, rtol=1e-12)


def test_readout_shapes():
    model = make_model("palindrome")
    x = make_input(model)
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], 2)
        assert model(x, readout="all").shape == (x.shape[0], x.shape[1], 2)
        assert make_model("read_in")(make_input(make_model("read_in"))).shape == (5, 1)


# --- weight views, dtype moves, copies, gradients -------------------------------------------------
def test_tl_views_have_tl_shapes_and_alias_the_fused_parameter():
    model = make_model("brackets")
    a = model.blocks[0].attn
    h, m, d = 2, 56, 28
    for n in ("W_Q", "W_K", "W_V"):
        assert getattr(a, n).shape == (h, m, d)
        assert getattr(a, n).data_ptr() != 0 and getattr(a, n)._base is not None
    for n in ("b_Q", "b_K", "b_V"):
        assert getattr(a, n).shape == (h, d)
    assert a.W_O.shape == (h, d, m)
    torch.testing.assert_close(a.W_K, a.W_QKV[1].transpose(1, 2), atol=0, rtol=0)


def test_in_place_edit_of_W_Q_view_changes_output():
    model = make_model("brackets")
    x = make_input(model)
    with torch.no_grad():
        before = model(x).clone()
        model.blocks[0].attn.W_Q[0].zero_()
        after = model(x)
    assert torch.all(model.blocks[0].attn.W_QKV[0, 0] == 0)
    assert not torch.allclose(before, after, atol=1e-4)
    # and it is exactly what a reference with head 0's queries constant gives
    torch.testing.assert_close(after, reference_forward(model, x)[0], atol=1e-5, rtol=1e-5)


@pytest.fixture(params=[False, True], ids=["set_data", "overwrite_params"])
def param_conversion(request):
    """Both ways nn.Module._apply converts parameters: in place (.data) or new Parameter objects."""
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_overwrite_module_params_on_conversion(before)


def test_double_and_to_keep_mirrored_attributes_in_sync(param_conversion):
    model = make_model("brackets")
    old_qkv = model.blocks[0].attn.W_QKV
    x = make_input(model)
    with torch.no_grad():
        ref32 = model(x)
    model.double()
    for module in model.modules():
        for n, p in module._parameters.items():
            assert module.__dict__.get(n, p) is p, f"{type(module).__name__}.{n} mirror is stale"
            assert p.dtype == torch.float64
    a = model.blocks[0].attn
    assert a.W_QKV is a._parameters["W_QKV"]
    assert (a.W_QKV is not old_qkv) == param_conversion
    assert a.W_Q.dtype == torch.float64
    with torch.no_grad():
        out64 = model(x)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref32.double(), atol=1e-5, rtol=1e-5)
    model.to(torch.float32)
    assert model.blocks[2].mlp.W_in is model.blocks[2].mlp._parameters["W_in"]
    assert model.blocks[2].mlp.W_in.dtype == torch.float32
    model.to("cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref32, atol=1e-6, rtol=1e-6)
    # an in-place edit after the dtype round trip still reaches the forward (no stale mirror)
    with torch.no_grad():
        model.unembed.b_U.add_(1.0)
        torch.testing.assert_close(model(x), ref32 + 1.0, atol=1e-5, rtol=1e-5)


def test_deepcopy_is_working_and_independent():
    model = make_model("brackets")
    x = make_input(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), atol=0, rtol=0)
        twin.blocks[1].attn.W_O.zero_()
        twin.blocks[1].attn.W_V[1].fill_(3.0)
        assert not torch.allclose(twin(x), model(x))
    assert model.blocks[1].attn.W_O.abs().sum() > 0
    assert twin.blocks[1].attn.W_QKV is twin.blocks[1].attn._parameters["W_QKV"]
    assert twin.blocks[1].attn.W_QKV is not model.blocks[1].attn.W_QKV
    # hook points of the copy are the copy's own, with the same names
    assert set(twin.hook_dict) == set(model.hook_dict)
    assert twin.hook_dict["blocks.0.attn.hook_z"] is twin.blocks[0].attn.hook_z
    with twin.hooks([("blocks.0.hook_resid_pre", lambda a, hook: None)]):
        assert twin.hook_dict["blocks.0.hook_resid_pre"].fns
        assert not model.hook_dict["blocks.0.hook_resid_pre"].fns
    _, cache = twin.run_with_cache(x, names=["blocks.0.attn.hook_z"])
    assert list(cache) == ["blocks.0.attn.hook_z"]


@pytest.mark.parametrize("name", ["brackets", "read_in"])
def test_gradient_flows_to_fused_qkv_in_training_mode(name):
    model = make_model(name).train()
    x = make_input(model)
    loss = model(x).pow(2).sum()
    loss.backward()
    for l, block in enumerate(model.blocks):
        g = block.attn.W_QKV.grad
        assert g is not None and g.shape == block.attn.W_QKV.shape
        for i, part in enumerate("QKV"):
            assert g[i].abs().sum() > 0, f"no gradient reaches W_{part} of layer {l}"
        assert block.attn.b_QKV.grad is not None and block.attn.b_QKV.grad[2].abs().sum() > 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
    # and with hooks active (explicit paths) the gradient is the same
    grad_fast = model.blocks[0].attn.W_QKV.grad.clone()
    model.zero_grad()
    model.run_with_hooks(x, fwd_hooks=all_hooks_returning_none(model)).pow(2).sum().backward()
    torch.testing.assert_close(model.blocks[0].attn.W_QKV.grad, grad_fast, atol=1e-5, rtol=1e-4)



def test_ln_hooks_in_training_after_an_inference_mode_run():
    """The explicit LayerNorm path keeps (ones, zeros) for the fused kernel; made first under
    inference_mode they must still serve a later training step (and follow a dtype move)."""
    model = make_model("brackets")
    x = make_input(model)
    with torch.inference_mode():
        model.run_with_cache(x, names=lambda n: "ln" in n)
    model.train()
    fast_grads = torch.autograd.grad(model(x).pow(2).sum(), model.blocks[0].ln1.w)
    hooked = model.run_with_hooks(x, fwd_hooks=[(lambda n: "ln" in n, lambda a, hook: None)])
    hooked_grads = torch.autograd.grad(hooked.pow(2).sum(), model.blocks[0].ln1.w)
    torch.testing.assert_close(hooked_grads, fast_grads, atol=1e-5, rtol=1e-4)
    model.double().eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(x.clone(), names=["blocks.0.ln1.hook_normalized"])
        assert cache["blocks.0.ln1.hook_normalized"].dtype == torch.float64
        torch.testing.assert_close(model.run_with_hooks(x, fwd_hooks=[("blocks.0.ln1.hook_scale", lambda a, hook: None)]),
                                   model(x), atol=1e-12, rtol=1e-12)

def test_frozen_one_hot_and_sinusoidal_weights_get_no_gradient():
    model = make_model("attn_only").train()
    model(make_input(model)).sum().backward()
    assert model.embed.W_E.grad is None and model.unembed.W_U.grad is None
    assert model.blocks[0].attn.W_QKV.grad is not None
    torch.testing.assert_close(model.embed.W_E, torch.eye(11))
    bm = make_model("brackets").train()
    bm(make_input(bm)).sum().backward()
    assert bm.pos_embed.W_pos.grad is None


def test_small_integer_token_dtypes_are_accepted():
    model = make_model("brackets")
    x = make_input(model)
    with torch.no_grad():
        ref = model(x)
        for dt in (torch.int32, torch.int16, torch.int8, torch.uint8):
            torch.testing.assert_close(model(x.to(dt)), ref, atol=0, rtol=0)


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [5, 99, -1])
def test_token_out_of_vocab(bad):
    model = make_model("brackets")
    x = make_input(model)
    x[2, 3] = bad
    with pytest.raises(InputError, match=rf"token id {bad} is out of the vocabulary \[0, 5\)"):
        model(x)


def test_sequence_longer_than_n_ctx():
    model = make_model("brackets")
    with pytest.raises(InputError, match="sequence length 43 exceeds n_ctx=42"):
        model(torch.zeros(2, 43, dtype=torch.long))
    reader = make_model("read_in")
    with pytest.raises(InputError, match="sequence length 13 exceeds n_ctx=12"):
        reader(torch.zeros(1, 13, 3))


def test_empty_sequence():
    with pytest.raises(InputError, match="empty sequence"):
        make_model("brackets")(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_float_or_bool_tokens(dtype):
    with pytest.raises(InputError, match=rf"token input must be an integer tensor.*{dtype}"):
        make_model("brackets")(torch.zeros(2, 4, dtype=dtype))


@pytest.mark.parametrize("shape", [(4,), (2, 4, 1), (1, 2, 3, 4)])
def test_tokens_of_wrong_ndim(shape):
    with pytest.raises(InputError, match=r"token input must have shape \[batch, pos\], got " + re_shape(shape)):
        make_model("brackets")(torch.zeros(shape, dtype=torch.long))


def re_shape(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("x, what", [
    (torch.zeros(2, 4, 5), "shape (2, 4, 5)"),  # wrong last dim
    (torch.zeros(2, 4), "shape (2, 4)"),  # tokens for a vector model
    (torch.zeros(2, 4, 3, dtype=torch.long), "torch.int64"),  # integer vectors
])
def test_read_in_input_of_wrong_shape_or_dtype(x, what):
    with pytest.raises(InputError, match=r"reads vectors: expected a float tensor \[batch, pos, 3\]") as e:
        make_model("read_in")(x)
    assert what in str(e.value)


@pytest.mark.parametrize("x", [[[0, 3, 4, 2]], "((()))", None, 3])
def test_non_tensor_input(x):
    with pytest.raises(InputError, match=f"must be a torch.Tensor, got {type(x).__name__}"):
        make_model("brackets")(x)


def test_bad_key_padding_mask():
    model = make_model("brackets")
    x = make_input(model)
    with pytest.raises(InputError, match="key_padding_mask must be bool"):
        model(x, key_padding_mask=torch.zeros(x.shape, dtype=torch.long))
    with pytest.raises(InputError, match="key_padding_mask must be bool"):
        model(x, key_padding_mask=torch.zeros(x.shape[0], 3, dtype=torch.bool))


def test_unknown_readout():
    model = make_model("brackets")
    with pytest.raises(InputError, match="readout='middle' is not one of"):
        model(make_input(model), readout="middle")


BASE = dict(n_layers=1, d_model=12, n_ctx=8, n_heads=3, d_vocab=12)


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=10, n_heads=3), r"d_model=10 is not divisible by n_heads=3"),
    (dict(embed="one_hot", d_model=12, d_vocab=11), r"one-hot embed needs d_model == d_vocab \(got 12 != 11\)"),
    (dict(unembed="one_hot", d_vocab_out=4), r"one-hot unembed needs d_model == d_vocab_out \(got 12 != 4\)"),
    (dict(d_input=3), r"exactly one of d_vocab \(12\) and d_input \(3\) must be > 0"),
    (dict(d_vocab=0, d_vocab_out=2), r"exactly one of d_vocab \(0\) and d_input \(0\) must be > 0"),
    (dict(act_fn="swish"), r"act_fn='swish' is not one of \('relu', 'gelu', 'gelu_new'\)"),
    (dict(attention="sliding"), r"attention='sliding' is not one of"),
    (dict(normalization="RMS"), r"normalization='RMS' is not one of"),
    (dict(positional="sinusoidal", d_model=9, d_head=3), r"sinusoidal positions need an even d_model \(got 9\)"),
    (dict(pad_token=12), r"pad_token=12 is not a token id in \[0, 12\)"),
    (dict(n_layers=0), r"n_layers=0 must be positive"),
    (dict(readout="middle"), r"readout='middle' is not one of"),
])
def test_inconsistent_config(changes, message):
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**{**BASE, **changes})


def test_inconsistent_config_names_every_problem():
    with pytest.raises(ConfigError) as e:
        TransformerConfig(**{**BASE, "act_fn": "swish", "embed": "one_hot", "d_vocab": 5})
    assert "act_fn='swish'" in str(e.value) and "one-hot embed" in str(e.value)


def test_unknown_config_field():
    with pytest.raises(ConfigError, match=r"unknown TransformerConfig fields \['n_layer'\]"):
        TransformerConfig.from_dict({**BASE, "n_layer": 2})
    assert TransformerConfig.from_dict(TransformerConfig(**BASE).to_dict()) == TransformerConfig(**BASE)


@pytest.mark.parametrize("hooked", [False, True], ids=["fast", "explicit"])
def test_fully_masked_rows_do_not_poison_the_output(hooked):
    """A causal model with left padding: the leading pad queries see only masked keys. With -inf
    masking they would softmax to NaN and leak into every position through pattern @ v."""
    model = perturbed_model("causal_padded")
    pad = model.cfg.pad_token
    x = torch.tensor([[pad, pad, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    hooks = [(lambda n: n.endswith("hook_pattern"), lambda a, h: None)] if hooked else []
    with torch.no_grad():
        logits = model.run_with_hooks(x, fwd_hooks=hooks, readout="all")
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("readout", ["first", "last"])
def test_inference_read_out_pruning_matches_the_full_last_block(name, dtype, readout):
    """In eval mode a first/last read-out computes only the read-out position of the last block
    (Attention/TransformerBlock.forward_at); in train mode, or with a hook in the last block, the
    whole block runs. All three agree, padding and causal masks included."""
    model = make_model(name, dtype)
    x = make_input(model)
    last = f"blocks.{model.cfg.n_layers - 1}"
    with torch.no_grad():
        full = model.train()(x, readout=readout)
        pruned = model.eval()(x, readout=readout)
        seen = {}
        hooked = model.run_with_hooks(x, readout=readout, fwd_hooks=[
            (f"{last}.hook_resid_post", lambda a, hook: seen.setdefault("shape", tuple(a.shape)) and None)])
    model.train()
    torch.testing.assert_close(pruned, full, **TOL[dtype])
    torch.testing.assert_close(hooked, full, **TOL[dtype])
    assert seen["shape"][1] == x.shape[1], "a hook in the last block must see every position"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("readout", ["first", "last", "all"])
def test_return_resid_is_the_final_residual_at_the_read_out(name, readout):
    """model(x, return_resid=True) hands back ln_final's input at the read-out position(s): equal to
    the last block's hook_resid_post there (the hook forces the full block; return_resid does not)."""
    model = make_model(name, torch.float64).eval()
    x = make_input(model)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits, resid = model(x, readout=readout, return_resid=True)
        full_logits, cache = model.run_with_cache(x, readout=readout, names=[last])
    torch.testing.assert_close(logits, full_logits, **TOL[torch.float64])
    post = cache[last]  # [batch, pos, d_model]
    if readout == "all":
        expected = post
    else:
        expected = post[torch.arange(x.shape[0]), model.readout_positions(x, readout)]
    torch.testing.assert_close(resid, expected, **TOL[torch.float64])


def test_read_out_pruning_keeps_each_rows_last_real_position():
    """Rows of different lengths (right padding): each row's read-out is its own last token."""
    model = make_model("causal_padded").eval()
    x = make_input(model, batch=6)
    lengths = [2, 3, 5, 7, 10, 10]
    for i, n in enumerate(lengths):
        x[i, n:] = model.cfg.pad_token
    with torch.no_grad():
        pruned = model(x)
        singles = torch.cat([model(x[i:i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(pruned, singles, **TOL[torch.float32])


@pytest.mark.parametrize("hook", ["hook_resid_pre", "ln1.hook_normalized", "attn.hook_k", "attn.hook_v",
                                  "attn.hook_q", "attn.hook_pattern", "mlp.hook_pre", "hook_resid_post"])
def test_last_block_hooks_see_every_position_and_edits_take_effect(hook):
    """Whether or not a hook keeps the read-out path (FULL_POSITION_HOOKS do), it sees the activation
    of every position, and an edit through it gives what the full path gives."""
    model = make_model("brackets", torch.float64)
    x = make_input(model)
    name = f"blocks.{model.cfg.n_layers - 1}.{hook}"
    shapes = []

    def scale(a, hook):  # not a pure rescaling: the final LayerNorm would undo that
        shapes.append(tuple(a.shape))
        return a * 1.5 + 0.1 * torch.arange(a.shape[-1], dtype=a.dtype)

    with torch.no_grad():
        full = model.train().run_with_hooks(x, fwd_hooks=[(name, scale)])
        pruned = model.eval().run_with_hooks(x, fwd_hooks=[(name, scale)])
        plain = model(x)
    model.train()
    torch.testing.assert_close(pruned, full, **TOL[torch.float64])
    assert shapes[0] == shapes[1] and x.shape[1] in shapes[0]
    assert not torch.allclose(pruned, plain), "the edit must change the output"


@pytest.mark.parametrize("name", ["brackets", "attn_only", "read_in", "causal_padded"])
def test_training_with_the_read_out_path_gives_the_same_gradients(name):
    """TrainRecipe(readout_only=True): the last block computes only the read-out position in train
    mode too; the loss and every parameter's gradient match the full block (float64, 1e-10)."""
    model = make_model(name, torch.float64).train()
    x = make_input(model)
    grads = []
    for readout_only in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(x, readout_only=readout_only)
        (out.square().sum() + out.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **TOL[torch.float64], msg=n)
