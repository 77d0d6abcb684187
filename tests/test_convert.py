"""TransformerLens state dicts both ways, bad state dicts and files, and the published ARENA bracket
checkpoint as the package ships it (checksums, the loaders' file access, its published facts)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuits.tasks.brackets import reference
from circuits.model.convert import check_state_dict, flush_subnormals_, load_tl_checkpoint, load_tl_state_dict, to_tl_state_dict
from circuits.errors import ShippedFileError, StateDictError
from circuits.model.transformer import HookedTransformer, TransformerConfig, sinusoidal_positions
from circuits.paths import arena_dir
from circuits.tasks.brackets.data import tokenize
from model_configs import ATTN_ONLY, BRACKETS, READ_IN, perturbed_model


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


# --- the published ARENA bracket checkpoint, as shipped -------------------------------------------
@pytest.fixture(scope="module")
def arena():
    """The checkpoint, the first 5000 rows (tokens, labels), and one forward over them with the final
    LayerNorm's input and output cached."""
    model = reference.arena_model()
    data = reference.arena_data(5000)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(data.toks, names=["blocks.2.hook_resid_post", "ln_final.hook_normalized"])
    return model, data.toks, data.isbal, logits, cache


def test_arena_checkpoint_classifies_first_5000_correctly(arena):
    model, toks, labels, logits, _ = arena
    assert toks.shape == (5000, 42)
    assert int(labels.sum()) == 2284  # the file's balanced rows among the first 5000
    pred = logits.argmax(-1) == 1  # logit 1 = balanced
    assert int((pred == labels).sum()) == 5000
    with torch.inference_mode():  # the plain forward (no hooks, fast paths) agrees
        torch.testing.assert_close(model(toks), logits, atol=1e-5, rtol=1e-5)


def test_flushing_the_arena_checkpoints_subnormal_weights_changes_no_logit(arena):
    """arena_model() zeroes the checkpoint's 2,470 subnormal weights (a CPU speed fix): the logits of the
    file's weights as they are must equal the shipped model's bit for bit, and every activation may
    differ by at most a subnormal."""
    model, toks = arena[:2]
    raw = reference.arena_model(flush_subnormals=False)
    tiny = torch.finfo(torch.float32).tiny
    assert flush_subnormals_(model) == 0, "the shipped model holds no subnormal weight"
    with torch.inference_mode():
        assert torch.equal(raw(toks[:2000]), model(toks[:2000]))  # the read-out path
        # every position of every block, on the fused paths (defer=True: the forward the model runs; the
        # explicit sublayers of an eager cache put one blocks.2.mlp.hook_pre entry 7.5e-37 apart)
        want_logits, want = raw.run_with_cache(toks[:500], defer=True)
        got_logits, got = model.run_with_cache(toks[:500], defer=True)
    assert torch.equal(got_logits, want_logits) and list(got.keys()) == list(want.keys())
    for name in want.keys():
        torch.testing.assert_close(got[name], want[name], atol=tiny, rtol=0, msg=name)
    assert flush_subnormals_(raw) == 2470 and flush_subnormals_(raw) == 0


def test_arena_checkpoint_confidence_on_empty_pair(arena):
    model = arena[0]
    with torch.inference_mode():
        p_balanced = model(tokenize(["()"])).softmax(-1)[0, 1].item()
    assert round(100 * p_balanced, 4) == 99.9987


def test_arena_final_layernorm_is_linear_at_position_0(arena):
    from sklearn.linear_model import LinearRegression

    cache = arena[4]
    X = cache["blocks.2.hook_resid_post"][:, 0].numpy()  # the final LN's input at position 0
    Y = cache["ln_final.hook_normalized"][:, 0].numpy()
    r2 = LinearRegression().fit(X, Y).score(X, Y)
    assert round(r2, 3) == 0.982


def test_arena_checkpoint_positions_are_our_sinusoids():
    sd = reference.arena_state_dict()
    torch.testing.assert_close(sd["pos_embed.W_pos"], sinusoidal_positions(42, 56), atol=1e-5, rtol=0)
    assert {k for k in sd if not k.endswith((".attn.mask", ".attn.IGNORE"))} == set(tl_keys(3))


def test_arena_config_is_the_brackets_zoo_config():
    """Claims compare the ARENA checkpoint with our `brackets` model: same architecture, same read-out."""
    from circuits.zoo.registry import get_entry

    assert reference.arena_config() == get_entry("brackets").config


def test_arena_data_is_all_100k_rows_with_checked_labels():
    data = reference.arena_data(None)
    assert len(data) == 100_000 and int(data.lengths.max()) == 40
    first = reference.arena_data(5000)
    assert first.strs == data.strs[:5000] and torch.equal(first.isbal, data.isbal[:5000])
    with pytest.raises(ValueError, match="non-negative int"):
        reference.arena_data(-1)


def test_shipped_files_carry_provenance_and_checksums():
    folder = arena_dir()
    source = (folder / "SOURCE.md").read_text()
    for fact in ("callummcdougall/ARENA_2.0", "part4_interp_on_algorithmic_model", "Licence", "sha256"):
        assert fact in source
    sums = __import__("json").loads((folder / "checksums.json").read_text())
    assert set(sums["shipped"]) == {reference.WEIGHTS, reference.DATA}
    assert set(sums["original"]) == {"brackets_model_state_dict.pt", "brackets_data.json"}
    assert all(len(h) == 64 for part in sums.values() for h in part.values())


def _copy_arena(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "arena"
    shutil.copytree(arena_dir(), folder)
    monkeypatch.setattr(reference, "arena_dir", lambda: folder)
    reference._arena_data.cache_clear()
    return folder


@pytest.mark.parametrize("name", [reference.WEIGHTS, reference.DATA])
def test_corrupt_shipped_file_is_a_clear_error_naming_it(tmp_path, monkeypatch, name):
    folder = _copy_arena(tmp_path, monkeypatch)
    raw = bytearray((folder / name).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    (folder / name).write_bytes(bytes(raw))
    load = reference.arena_model if name == reference.WEIGHTS else reference.arena_data
    with pytest.raises(ShippedFileError, match=rf"{name}: sha256 [0-9a-f]{{16}}\.\.\. does not match the recorded"):
        load()


def test_missing_shipped_file_and_checksums(tmp_path, monkeypatch):
    folder = _copy_arena(tmp_path, monkeypatch)
    (folder / reference.DATA).unlink()
    with pytest.raises(ShippedFileError, match=rf"{reference.DATA}: cannot read the shipped file"):
        reference.arena_data()
    (folder / "checksums.json").write_text("{not json")
    reference._recorded.cache_clear()
    with pytest.raises(ShippedFileError, match=r"checksums.json: cannot read the recorded checksums"):
        reference.arena_model()
    reference._recorded.cache_clear()


ACCESS_PROBE = """
import json, sys
import circuits.tasks.brackets.reference as R, circuits.model.convert, safetensors.torch  # every import done up front
opened = []
def hook(event, args):
    if recording and event in ("open", "os.listdir", "os.scandir") and isinstance(args[0], (str, bytes)) or (
            recording and event == "open" and hasattr(args[0], "__fspath__")):
        opened.append(args[0].decode() if isinstance(args[0], bytes) else str(args[0]))
recording = False
sys.addaudithook(hook)
recording = True
R.arena_model(); R.arena_data(None)
recording = False
print(json.dumps(opened))
"""


def test_arena_loaders_read_only_the_shipped_files():
    """In a fresh interpreter (nothing patched), every data file the loaders open, as Python's audit
    hooks see it, lies in the package's shipped ARENA folder: they never read ../shared or anything
    else (modules imported lazily on the way are code, and are left out)."""
    out = subprocess.run([sys.executable, "-c", ACCESS_PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    opened = [Path(p).resolve() for p in __import__("json").loads(out.stdout.strip().splitlines()[-1])]
    opened = [p for p in opened if p.suffix not in (".py", ".pyc", ".so")]  # lazy imports of code, not data
    assert opened, "the probe saw no file access at all"
    folder = arena_dir().resolve()
    outside = [str(p) for p in opened if folder not in p.parents]
    assert not outside, f"the ARENA loaders touched files outside {folder}: {outside}"
    assert {p.name for p in opened} >= {reference.WEIGHTS, reference.DATA, "checksums.json"}


# --- TransformerLens configs both ways (no TL needed; tests/test_tl_peer.py checks against real TL) ---
from circuits.model.convert import as_config, from_tl_config, tl_extras, tl_key_mask_hooks, to_tl_config, to_transformer_lens  # noqa: E402
from circuits.errors import ConfigError  # noqa: E402
from model_configs import CONFIGS  # noqa: E402


@pytest.mark.parametrize("name", [k for k in CONFIGS if k != "read_in"])
def test_tl_config_round_trip(name):
    cfg = TransformerConfig(**CONFIGS[name])
    tl_cfg = to_tl_config(cfg)
    assert from_tl_config(tl_cfg, **tl_extras(cfg)) == cfg
    assert __import__("json").loads(__import__("json").dumps(tl_cfg)) == tl_cfg  # JSON-able
    back = from_tl_config(tl_cfg)  # without our extras: TL's view (no pad masking, all positions)
    assert back.pad_token is None and back.readout == "all" and back.d_mlp == cfg.d_mlp


def test_tl_config_refuses_a_read_in_model_and_unsupported_tl_features():
    with pytest.raises(ConfigError, match="TransformerLens has no linear read-in"):
        to_tl_config(TransformerConfig(**READ_IN))
    tl_cfg = to_tl_config(TransformerConfig(**BRACKETS))
    with pytest.raises(ConfigError, match=r"positional_embedding_type='rotary', gated_mlp=True.*normalization_type='RMS'"):
        from_tl_config({**tl_cfg, "positional_embedding_type": "rotary", "gated_mlp": True, "normalization_type": "RMS"})
    with pytest.raises(ConfigError, match=r"from_tl_config takes only .* got \['n_heads'\]"):
        from_tl_config(tl_cfg, n_heads=4)
    with pytest.raises(ConfigError, match=r"TL config lacks \['d_head'\]"):
        from_tl_config({k: v for k, v in tl_cfg.items() if k != "d_head"})


def test_tl_config_defaults_follow_tl():
    cfg = from_tl_config({"n_layers": 2, "d_model": 64, "n_ctx": 16, "d_head": 16, "act_fn": "gelu", "d_vocab": 10})
    assert (cfg.n_heads, cfg.d_mlp, cfg.d_vocab_out, cfg.attention, cfg.normalization) == (4, 256, 10, "causal", "LN")
    assert cfg.init_range == pytest.approx(0.1)  # 0.8 / sqrt(d_model)


def test_as_config_reads_ours_or_tls():
    cfg = TransformerConfig(**BRACKETS)
    assert as_config(cfg) is cfg
    assert as_config(cfg.to_dict()) == cfg
    assert as_config(to_tl_config(cfg), **tl_extras(cfg)) == cfg
    with pytest.raises(ConfigError, match="expected a TransformerConfig"):
        as_config(42)


def test_load_tl_checkpoint_with_a_tl_config_dict(tmp_path):
    source = make_model(BRACKETS).eval()
    tl_cfg, sd = to_transformer_lens(source)
    assert {k for k in sd if k.endswith((".attn.mask", ".attn.IGNORE"))} == {
        f"blocks.{l}.attn.{b}" for l in range(3) for b in ("mask", "IGNORE")}
    torch.save(sd, tmp_path / "tl.pt")
    loaded = load_tl_checkpoint(tmp_path / "tl.pt", tl_cfg, **tl_extras(source.cfg)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(bracket_tokens()), source(bracket_tokens()), atol=0, rtol=0)


def test_load_tl_checkpoint_flushes_subnormals_only_when_asked(tmp_path):
    source = make_model(BRACKETS).eval()
    sd = to_tl_state_dict(source)
    sd["blocks.2.mlp.W_in"][:5, :3] = 1e-40  # weight decay's leftovers
    torch.save(sd, tmp_path / "sub.pt")
    as_is = load_tl_checkpoint(tmp_path / "sub.pt", source.cfg)
    flushed = load_tl_checkpoint(tmp_path / "sub.pt", source.cfg, flush_subnormals=True)
    assert int((as_is.blocks[2].mlp.W_in == 0).sum()) == 0
    assert int((flushed.blocks[2].mlp.W_in == 0).sum()) == 15
    with torch.no_grad():
        torch.testing.assert_close(flushed(bracket_tokens()), as_is(bracket_tokens()), atol=1e-6, rtol=0)


def test_to_transformer_lens_writes_what_tl_cannot_express_as_weights():
    model = make_model(ATTN_ONLY)  # one-hot embed/unembed, no positions
    _, sd = to_transformer_lens(model)
    torch.testing.assert_close(sd["embed.W_E"], torch.eye(11), atol=0, rtol=0)
    torch.testing.assert_close(sd["pos_embed.W_pos"], torch.zeros(8, 11), atol=0, rtol=0)


def test_tl_key_mask_hooks_mask_only_blocked_keys():
    keep = torch.tensor([[True, True, False]])
    [(name_filter, hook)] = tl_key_mask_hooks(keep)
    assert name_filter("blocks.1.attn.hook_attn_scores") and not name_filter("blocks.1.attn.hook_pattern")
    out = hook(torch.zeros(1, 2, 3, 3))
    assert (out[..., :2] == 0).all() and (out[..., 2] == -1e5).all()
    with pytest.raises(ConfigError, match=r"keep must be a \[batch, pos\] tensor"):
        tl_key_mask_hooks(torch.ones(3, dtype=torch.bool))
