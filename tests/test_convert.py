"""TransformerLens state dicts both ways, bad state dicts and files, and the published ARENA bracket
checkpoint's facts (accuracy, confidence on "()", the final LayerNorm's linear fit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuits.convert import check_state_dict, load_tl_checkpoint, load_tl_state_dict, to_tl_state_dict
from circuits.errors import StateDictError
from circuits.model import HookedTransformer, TransformerConfig, sinusoidal_positions
from circuits.tasks.brackets import tokenize
from model_configs import ATTN_ONLY, BRACKETS, READ_IN, perturbed_model

ARENA = Path(__file__).resolve().parents[1].parent / "shared/reference/arena-brackets"
needs_arena = pytest.mark.skipif(
    not (ARENA / "brackets_model_state_dict.pt").exists(),
    reason=f"the published ARENA bracket checkpoint is not at {ARENA} (../shared relative to the repo root)",
)




def make_model(cfg: dict, seed: int = 0, dtype=torch.float32) -> HookedTransformer:
    return perturbed_model(cfg, seed=seed, dtype=dtype)


def bracket_tokens() -> torch.Tensor:
    return tokenize(["(()())", ")(", "((((()))))()", "", "()" * 20], pad_to=42)


def tl_keys(n_layers: int, mlp: bool = True, ln: bool = True, pos: bool = True) -> dict[str, tuple]:
    """The TL state-dict keys and shapes of the bracket architecture."""
    m, h, d, v = 56, 2, 28, 5
    keys = {"embed.W_E": (v, m), "unembed.W_U": (m, 2), "unembed.b_U": (2,)}
    if pos:
        keys["pos_embed.W_pos"] = (42, m)
    if ln:
        keys |= {"ln_final.w": (m,), "ln_final.b": (m,)}
    for l in range(n_layers):
        b = f"blocks.{l}."
        keys |= {b + "attn.W_Q": (h, m, d), b + "attn.W_K": (h, m, d), b + "attn.W_V": (h, m, d),
                 b + "attn.W_O": (h, d, m), b + "attn.b_Q": (h, d), b + "attn.b_K": (h, d),
                 b + "attn.b_V": (h, d), b + "attn.b_O": (m,)}
        if ln:
            keys |= {b + "ln1.w": (m,), b + "ln1.b": (m,), b + "ln2.w": (m,), b + "ln2.b": (m,)}
        if mlp:
            keys |= {b + "mlp.W_in": (m, 56), b + "mlp.b_in": (56,), b + "mlp.W_out": (56, m), b + "mlp.b_out": (m,)}
    return keys


# --- TL format both ways --------------------------------------------------------------------------
def test_state_dict_has_tl_keys_and_shapes():
    sd = make_model(BRACKETS).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == tl_keys(3)
    assert not any("QKV" in k for k in sd)


def test_state_dict_views_alias_the_fused_weights():
    model = make_model(BRACKETS)
    sd = model.state_dict()
    torch.testing.assert_close(sd["blocks.1.attn.W_K"], model.blocks[1].attn.W_QKV[1].transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(sd["blocks.1.attn.b_V"], model.blocks[1].attn.b_QKV[2], atol=0, rtol=0)
    assert not sd["blocks.1.attn.W_K"].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", [BRACKETS, READ_IN, ATTN_ONLY], ids=["brackets", "read_in", "attn_only"])
def test_tl_round_trip_gives_identical_outputs(cfg, dtype):
    source = make_model(cfg, seed=0, dtype=dtype)
    fresh = make_model(cfg, seed=7, dtype=dtype)
    x = bracket_tokens() if cfg is BRACKETS else (
        torch.randn(3, 12, 3, dtype=dtype) if cfg is READ_IN else torch.randint(0, 11, (3, 8)))
    with torch.no_grad():
        assert not torch.allclose(fresh(x), source(x))
        load_tl_state_dict(fresh, to_tl_state_dict(source))
        torch.testing.assert_close(fresh(x), source(x), atol=0, rtol=0)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, atol=0, rtol=0, msg=k)


def test_load_casts_to_the_models_dtype():
    source = make_model(BRACKETS)
    target = make_model(BRACKETS, seed=3, dtype=torch.float64)
    load_tl_state_dict(target, source.state_dict())
    assert target.blocks[0].attn.W_QKV.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(target(bracket_tokens()).float(), source(bracket_tokens()), atol=1e-5, rtol=1e-5)


def test_to_tl_state_dict_is_a_detached_copy():
    model = make_model(BRACKETS)
    sd = to_tl_state_dict(model)
    sd["blocks.0.attn.W_Q"].zero_()
    assert model.blocks[0].attn.W_Q.abs().sum() > 0


def test_nn_module_load_state_dict_round_trip():
    source, fresh = make_model(BRACKETS), make_model(BRACKETS, seed=5)
    assert not fresh.load_state_dict(source.state_dict()).missing_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(bracket_tokens()), source(bracket_tokens()), atol=0, rtol=0)


@pytest.mark.parametrize("key", ["blocks.1.attn.W_Q", "blocks.1.attn.b_V", "blocks.1.attn.W_O", "blocks.1.attn.b_O"])
def test_nn_module_load_state_dict_reports_missing_attention_keys(key):
    sd = make_model(BRACKETS).state_dict()
    del sd[key]
    fresh = make_model(BRACKETS, seed=5)
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{key}"'):
        fresh.load_state_dict(sd)
    assert fresh.load_state_dict(sd, strict=False).missing_keys == [key]


def test_nn_module_load_state_dict_reports_unexpected_and_misshaped_attention_keys():
    sd = make_model(BRACKETS).state_dict()
    sd["blocks.0.attn.W_QK"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "blocks.0.attn.W_QK"'):
        make_model(BRACKETS).load_state_dict(sd)
    sd = make_model(BRACKETS).state_dict()
    sd["blocks.2.attn.W_V"] = torch.zeros(2, 28, 56)
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks.2.attn.W_V: expected \(2, 56, 28\), "
                                           r"got \(2, 28, 56\)"):
        make_model(BRACKETS).load_state_dict(sd)


def test_tl_only_buffers_are_ignored():
    source = make_model(BRACKETS)
    sd = dict(source.state_dict())
    for l in range(3):
        sd[f"blocks.{l}.attn.mask"] = torch.ones(42, 42).tril().bool()
        sd[f"blocks.{l}.attn.IGNORE"] = torch.tensor(-1e5)
    fresh = load_tl_state_dict(make_model(BRACKETS, seed=2), sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(bracket_tokens()), source(bracket_tokens()), atol=0, rtol=0)


# --- bad state dicts ------------------------------------------------------------------------------
def test_state_dict_error_names_missing_unexpected_and_misshaped_keys_at_once():
    model = make_model(BRACKETS)
    sd = dict(model.state_dict())
    del sd["blocks.1.mlp.W_in"], sd["ln_final.b"]
    sd["blocks.3.attn.W_Q"] = torch.zeros(2, 56, 28)
    sd["unembed.W_U"] = torch.zeros(56, 3)
    sd["blocks.0.attn.W_O"] = torch.zeros(2, 56, 28)
    with pytest.raises(StateDictError) as e:
        load_tl_state_dict(make_model(BRACKETS, seed=4), sd)
    msg = str(e.value)
    assert "missing keys: ['blocks.1.mlp.W_in', 'ln_final.b']" in msg
    assert "unexpected keys: ['blocks.3.attn.W_Q']" in msg
    assert "blocks.0.attn.W_O: expected (2, 28, 56), got (2, 56, 28)" in msg
    assert "unembed.W_U: expected (56, 2), got (56, 3)" in msg


def test_failed_load_leaves_model_untouched():
    model = make_model(BRACKETS, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(make_model(BRACKETS).state_dict())
    del sd["unembed.b_U"]
    with pytest.raises(StateDictError, match=r"missing keys: \['unembed.b_U'\]"):
        load_tl_state_dict(model, sd)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_state_dict_with_non_tensor_values():
    sd = dict(make_model(BRACKETS).state_dict())
    sd["embed.W_E"] = [[0.0] * 56] * 5
    sd["blocks.0.ln1.w"] = 1.0
    with pytest.raises(StateDictError, match=r"values that are not tensors: \['blocks.0.ln1.w', 'embed.W_E'\]"):
        check_state_dict(make_model(BRACKETS), sd)


def test_state_dict_for_another_architecture():
    with pytest.raises(StateDictError) as e:
        load_tl_state_dict(make_model(ATTN_ONLY), make_model(BRACKETS).state_dict())
    msg = str(e.value)
    assert "unexpected keys" in msg and "blocks.0.mlp.W_in" in msg and "pos_embed.W_pos" in msg
    assert "blocks.0.attn.W_Q: expected (3, 11, 1), got (2, 56, 28)" in msg


# --- checkpoint files -----------------------------------------------------------------------------
class Payload:
    """Unpickling this would create a file: proof that a loader executed pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    sd = dict(make_model(BRACKETS).state_dict())
    sd["payload"] = Payload(marker)
    torch.save(sd, path)
    with pytest.raises(StateDictError, match=r"could not read .*evil.pt as a weights-only torch file"):
        load_tl_checkpoint(path, TransformerConfig(**BRACKETS))
    assert not marker.exists(), "the loader unpickled an arbitrary object"


def test_checkpoint_round_trip_through_files(tmp_path):
    source = make_model(BRACKETS).eval()  # both in eval mode: the same (pruned read-out) path
    torch.save(to_tl_state_dict(source), tmp_path / "model.pt")
    loaded = load_tl_checkpoint(tmp_path / "model.pt", TransformerConfig(**BRACKETS)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(bracket_tokens()), source(bracket_tokens()), atol=0, rtol=0)
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(to_tl_state_dict(source), str(tmp_path / "model.safetensors"))
    loaded = load_tl_checkpoint(tmp_path / "model.safetensors", TransformerConfig(**BRACKETS)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(bracket_tokens()), source(bracket_tokens()), atol=0, rtol=0)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(StateDictError, match=r"list.pt does not hold a state dict \(got list\)"):
        load_tl_checkpoint(tmp_path / "list.pt", TransformerConfig(**BRACKETS))


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(StateDictError, match=r"could not read .*junk.pt as a weights-only torch file"):
        load_tl_checkpoint(tmp_path / "junk.pt", TransformerConfig(**BRACKETS))


def test_checkpoint_with_wrong_keys_names_them(tmp_path):
    sd = dict(make_model(BRACKETS).state_dict())
    del sd["blocks.2.ln2.w"]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(StateDictError, match=r"missing keys: \['blocks.2.ln2.w'\]"):
        load_tl_checkpoint(tmp_path / "short.pt", TransformerConfig(**BRACKETS))


# --- the published ARENA bracket checkpoint ------------------------------------------------------
@pytest.fixture(scope="module")
def arena():
    """The checkpoint, the first 5000 rows (tokens, labels), and one forward over them with the final
    LayerNorm's input and output cached."""
    model = load_tl_checkpoint(ARENA / "brackets_model_state_dict.pt", TransformerConfig(**BRACKETS)).eval()
    with open(ARENA / "brackets_data.json") as f:
        rows = json.load(f)[:5000]
    toks = tokenize([s for s, _ in rows])
    labels = torch.tensor([bool(b) for _, b in rows])
    with torch.inference_mode():
        logits, cache = model.run_with_cache(toks, names=["blocks.2.hook_resid_post", "ln_final.hook_normalized"])
    return model, toks, labels, logits, cache


@needs_arena
def test_arena_checkpoint_classifies_first_5000_correctly(arena):
    model, toks, labels, logits, _ = arena
    assert toks.shape == (5000, 42)
    assert int(labels.sum()) == 2284  # the file's balanced rows among the first 5000
    pred = logits.argmax(-1) == 1  # logit 1 = balanced
    assert int((pred == labels).sum()) == 5000
    with torch.inference_mode():  # the plain forward (no hooks, fast paths) agrees
        torch.testing.assert_close(model(toks), logits, atol=1e-5, rtol=1e-5)


@needs_arena
def test_arena_checkpoint_confidence_on_empty_pair(arena):
    model = arena[0]
    with torch.inference_mode():
        p_balanced = model(tokenize(["()"])).softmax(-1)[0, 1].item()
    assert round(100 * p_balanced, 4) == 99.9987


@needs_arena
def test_arena_final_layernorm_is_linear_at_position_0(arena):
    from sklearn.linear_model import LinearRegression

    cache = arena[4]
    X = cache["blocks.2.hook_resid_post"][:, 0].numpy()  # the final LN's input at position 0
    Y = cache["ln_final.hook_normalized"][:, 0].numpy()
    r2 = LinearRegression().fit(X, Y).score(X, Y)
    assert round(r2, 3) == 0.982


@needs_arena
def test_arena_checkpoint_positions_are_our_sinusoids(arena):
    sd = torch.load(ARENA / "brackets_model_state_dict.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(sd["pos_embed.W_pos"], sinusoidal_positions(42, 56), atol=1e-5, rtol=0)
    assert {k for k in sd if not k.endswith((".attn.mask", ".attn.IGNORE"))} == set(tl_keys(3))
