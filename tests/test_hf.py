"""Hugging Face GPT-2 interop (circuits.model.hf): our weights <-> a `transformers.GPT2Model` with a linear
read-in and read-out, as seed 003's `format_flat_weights` does by hand.

The tensor maps are tested without transformers (round trips, layouts against the seed's own
formula, bad state dicts). Equality of outputs is proven against a real `transformers.GPT2Model`
built from a config (no download); those tests skip, saying why, when the optional `hf` extra is
not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from circuits.model import hf
from circuits.model.convert import load_tl_state_dict
from circuits.errors import ConfigError, StateDictError
from circuits.model.transformer import HookedTransformer, TransformerConfig

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS,
    reason="transformers is not installed: it is the optional extra `hf` (pip install -e '.[hf]'); "
           "the GPT-2 equality tests need a real transformers.GPT2Model",
)

# seed 003's architecture (the `icl` zoo entry), and a token-input GPT-2 of another shape
ICL = dict(n_layers=3, d_model=64, n_ctx=21, n_heads=2, d_mlp=256, d_input=3, d_vocab=0, d_vocab_out=1,
           act_fn="gelu_new", normalization="LN", attention="causal", positional="learned", readout="last")
TOKENS = dict(n_layers=2, d_model=24, n_ctx=10, n_heads=3, d_mlp=40, d_vocab=13, d_vocab_out=7,
              act_fn="gelu_new", normalization="LN", attention="causal", positional="learned", readout="all")


@torch.no_grad()
def random_model(cfg: dict, seed: int = 0, dtype=torch.float64, **over) -> HookedTransformer:
    """Every weight random, LN weights and biases too, so no part of the map can hide behind 1s/0s."""
    model = HookedTransformer(TransformerConfig(**{**cfg, **over}, seed=seed, init_range=0.3))
    g = torch.Generator().manual_seed(seed + 100)
    for name, p in model.named_parameters():
        if p.ndim == 1 or name.endswith("b_QKV"):
            base = 1.0 if name.endswith(".w") else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


def icl_inputs(n: int = 32, dtype=torch.float64, n_pos: int = 21) -> torch.Tensor:
    return 2 * torch.randn(n, n_pos, 3, generator=torch.Generator().manual_seed(5), dtype=dtype)


# --- the tensor maps (no transformers needed) -----------------------------------------------------
@pytest.mark.parametrize("cfg", [ICL, TOKENS], ids=["read_in", "tokens"])
def test_round_trip_through_gpt2_layout_is_exact(cfg):
    model = random_model(cfg)
    c = model.cfg
    backbone, read_in, read_out = hf.to_gpt2(model.state_dict(), c)
    back = hf.from_gpt2(backbone, c, read_in=read_in, read_out=read_out)
    own = model.state_dict()
    assert set(back) == set(own)
    for k, v in own.items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0, msg=k)


def test_gpt2_layout_has_conv1d_shapes_and_gpt2_names():
    c = random_model(ICL).cfg
    backbone, read_in, read_out = hf.to_gpt2(random_model(ICL).state_dict(), c, vocab_size=50257)
    m = 64
    assert backbone["wte.weight"].shape == (50257, m) and not backbone["wte.weight"].any()
    assert backbone["wpe.weight"].shape == (21, m)
    assert backbone["h.2.attn.c_attn.weight"].shape == (m, 3 * m)  # Conv1D: [in, out]
    assert backbone["h.2.attn.c_attn.bias"].shape == (3 * m,)
    assert backbone["h.2.attn.c_proj.weight"].shape == (m, m)
    assert backbone["h.2.mlp.c_fc.weight"].shape == (m, 256)
    assert backbone["h.2.mlp.c_proj.weight"].shape == (256, m)
    assert {"ln_f.weight", "ln_f.bias", "h.0.ln_1.weight", "h.0.ln_2.bias"} <= set(backbone)
    assert read_in["weight"].shape == (m, 3) and read_out["weight"].shape == (1, m)  # nn.Linear: [out, in]
    assert all(v.is_contiguous() for v in backbone.values())


def test_qkv_split_matches_the_seeds_format_flat_weights():
    """The seed's own recipe, written out: tensor_split c_attn into thirds along dim 1, then
    rearrange "m (i h) -> i m h" with i = n_head; biases "(qkv index head) -> qkv index head";
    c_proj "(i h) m -> i h m"."""
    model = random_model(ICL)
    backbone, read_in, read_out = hf.to_gpt2(model.state_dict(), model.cfg)
    n_head, m = 2, 64
    ours = hf.from_gpt2(backbone, model.cfg, read_in=read_in, read_out=read_out)
    for l in range(3):
        W = backbone[f"h.{l}.attn.c_attn.weight"]
        for name, part in zip("QKV", torch.tensor_split(W, 3, dim=1)):
            seed_w = part.reshape(m, n_head, m // n_head).permute(1, 0, 2)  # "m (i h) -> i m h"
            torch.testing.assert_close(ours[f"blocks.{l}.attn.W_{name}"], seed_w, atol=0, rtol=0)
        bias = backbone[f"h.{l}.attn.c_attn.bias"].reshape(3, n_head, m // n_head)
        for i, name in enumerate("QKV"):
            torch.testing.assert_close(ours[f"blocks.{l}.attn.b_{name}"], bias[i], atol=0, rtol=0)
        W_O = backbone[f"h.{l}.attn.c_proj.weight"].reshape(n_head, m // n_head, m)  # "(i h) m -> i h m"
        torch.testing.assert_close(ours[f"blocks.{l}.attn.W_O"], W_O, atol=0, rtol=0)
        torch.testing.assert_close(ours[f"blocks.{l}.mlp.W_in"], backbone[f"h.{l}.mlp.c_fc.weight"], atol=0, rtol=0)
    torch.testing.assert_close(ours["embed.W_in"], read_in["weight"].t(), atol=0, rtol=0)
    torch.testing.assert_close(ours["unembed.W_U"], read_out["weight"].t(), atol=0, rtol=0)


def test_seed_flat_layout_round_trip():
    model = random_model(ICL)
    flat = hf.to_seed_state_dict(model.state_dict(), model.cfg, vocab_size=50257)
    assert {"_read_in.weight", "_read_in.bias", "_read_out.weight", "_read_out.bias",
            "_backbone.wte.weight", "_backbone.h.0.attn.c_attn.weight", "_backbone.ln_f.bias"} <= set(flat)
    back = hf.from_seed_state_dict(flat, model.cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0, msg=k)


def test_causal_mask_buffers_of_older_transformers_are_ignored():
    model = random_model(ICL)
    backbone, read_in, read_out = hf.to_gpt2(model.state_dict(), model.cfg)
    backbone["h.0.attn.bias"] = torch.ones(1, 1, 21, 21, dtype=torch.bool).tril()
    backbone["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    hf.from_gpt2(backbone, model.cfg, read_in=read_in, read_out=read_out)


def test_bad_gpt2_state_dicts_name_every_problem():
    model = random_model(ICL)
    c = model.cfg
    backbone, read_in, read_out = hf.to_gpt2(model.state_dict(), c)
    broken = dict(backbone)
    del broken["h.1.mlp.c_fc.bias"]
    broken["h.2.attn.c_attn.weight"] = broken["h.2.attn.c_attn.weight"].t()
    broken["h.3.ln_1.weight"] = torch.ones(64)
    with pytest.raises(StateDictError) as e:
        hf.from_gpt2(broken, c, read_in={"weight": read_in["weight"]}, read_out=read_out)
    msg = str(e.value)
    for part in ("h.1.mlp.c_fc.bias", "h.2.attn.c_attn.weight: expected (64, 192), got (192, 64)",
                 "h.3.ln_1.weight", "read_in.bias"):
        assert part in msg, msg
    with pytest.raises(StateDictError, match="read_in"):
        hf.from_gpt2(backbone, c, read_out=read_out)
    with pytest.raises(StateDictError, match="read_out"):
        hf.from_gpt2(backbone, c, read_in=read_in)
    with pytest.raises(StateDictError, match="outside _read_in"):
        hf.from_seed_state_dict({"model.h.0.ln_1.weight": torch.ones(64)}, c)


@pytest.mark.parametrize("change, words", [
    (dict(attention="bidirectional"), "causal"), (dict(positional="sinusoidal"), "learns its positions"),
    (dict(normalization=None), "pre-LN"), (dict(d_mlp=0), "MLP"),
])
def test_configs_gpt2_cannot_compute_are_refused(change, words):
    cfg = TransformerConfig(**{**ICL, **change})
    with pytest.raises(ConfigError, match=words):
        hf.check_gpt2_compatible(cfg)
    with pytest.raises(ConfigError):
        hf.to_gpt2(HookedTransformer(cfg).state_dict(), cfg)


# --- equality of outputs against a real transformers.GPT2Model -------------------------------------
@needs_transformers
@pytest.mark.parametrize("act_fn", ["gelu_new", "gelu", "relu"])
def test_gpt2_model_from_config_converts_to_identical_outputs(act_fn):
    """A seed-style model (read-in -> GPT2Model -> read-out) with random weights everywhere, converted
    to ours: the same outputs at every position and the same residual stream after every block."""
    cfg = TransformerConfig(**{**ICL, "act_fn": act_fn})
    torch.manual_seed(0)
    ref = hf.GPT2ReadIn(hf.gpt2_config(cfg, vocab_size=50257), d_input=3).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    ours = hf.from_gpt2_module(ref, cfg)
    assert ours.cfg.ln_eps == ref._backbone.config.layer_norm_epsilon == 1e-5
    x = icl_inputs()
    with torch.no_grad():
        got, want = ours(x), ref(x)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(ours(x, readout="all"), ref(x, all_positions=True), atol=1e-12, rtol=1e-12)
        hidden = ref._backbone(inputs_embeds=ref._read_in(x), output_hidden_states=True).hidden_states
        _, cache = ours.run_with_cache(x, names=lambda n: n.endswith("hook_resid_pre"))
        for l in range(3):  # hidden_states[l] is the residual entering block l
            torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_pre"], hidden[l], atol=1e-12, rtol=1e-12)
        assert not torch.allclose(got, hf.from_gpt2_module(hf.GPT2ReadIn(hf.gpt2_config(cfg), 3).double(), cfg)(x))


@needs_transformers
def test_our_model_converts_to_a_gpt2_model_with_identical_outputs():
    ours = random_model(ICL, seed=3)
    ref = hf.to_gpt2_module(ours, vocab_size=7)
    assert ref._backbone.wte.weight.shape == (7, 64)
    for x in (icl_inputs(), icl_inputs(n_pos=9)):  # shorter sequences use the first positions
        with torch.no_grad():
            torch.testing.assert_close(ref(x), ours(x), atol=1e-12, rtol=1e-12)


@needs_transformers
def test_float32_equality():
    ours = random_model(ICL, seed=4, dtype=torch.float32)
    ref = hf.to_gpt2_module(ours)
    x = icl_inputs(dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), atol=2e-5, rtol=2e-5)


@needs_transformers
def test_token_gpt2_matches_with_input_ids():
    """A token-input GPT-2 (wte used) with a separate read-out Linear."""
    import transformers

    cfg = TransformerConfig(**TOKENS)
    torch.manual_seed(1)
    backbone = transformers.GPT2Model(hf.gpt2_config(cfg)).double().eval()
    read_out = torch.nn.Linear(24, 7).double()
    with torch.no_grad():
        for p in [*backbone.parameters(), *read_out.parameters()]:
            p.normal_(0.0, 0.3)
    state = hf.from_gpt2(backbone.state_dict(), cfg, read_out=read_out.state_dict())
    ours = load_tl_state_dict(HookedTransformer(cfg).double(), state).eval()
    tokens = torch.randint(0, 13, (6, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = read_out(backbone(input_ids=tokens).last_hidden_state)
        torch.testing.assert_close(ours(tokens), want, atol=1e-12, rtol=1e-12)


@needs_transformers
def test_reference_checkpoint_runs_identically_as_a_gpt2_model():
    """The committed `icl` reference, converted to a real GPT2Model, predicts the same on task data."""
    from circuits.zoo import registry as zoo
    from circuits.tasks import icl

    model = zoo.load("icl").model.double()
    ref = hf.to_gpt2_module(model)
    data = icl.generate(256, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(ref(data.inputs.double()), model(data.inputs.double()), atol=1e-10, rtol=1e-10)
    back = hf.from_gpt2_module(ref, model.cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0, msg=k)


def test_gpt2_equality_tests_skip_with_a_reason_without_transformers(pytester):
    """Run this file in a fresh interpreter where `import transformers` is impossible: the tensor-map
    tests still pass and every GPT2Model test is skipped, naming the missing extra."""
    from pathlib import Path

    pytester.makeconftest("import sys\nsys.modules['transformers'] = None  # import fails, find_spec says absent\n")
    pytester.makepyfile(test_hf_copy=Path(__file__).read_text().split("\n\ndef test_gpt2_equality_tests_skip")[0])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", "-q", "-p", "no:randomly")
    result.assert_outcomes(passed=11, skipped=7)
    result.stdout.fnmatch_lines(["SKIPPED*transformers is not installed*optional extra `hf`*"])
