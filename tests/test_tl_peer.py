"""TransformerLens as a real peer: our exported reference checkpoints load into TL's own
`HookedTransformer` with `strict=True` and agree with ours (logits and cached activations to 1e-4 of
their scale, pad keys masked through the README's hook recipe), and TL's config converts to ours and
back.

Needs the `peers` extra (`pip install -e '.[peers]'`: TransformerLens 3.x, the last with
`HookedTransformer`); skipped with that reason without it. CI installs it and runs this file.
"""

from __future__ import annotations

import warnings

import pytest
import torch

tl = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (pip install -e '.[peers]')")
try:
    from transformer_lens import HookedTransformer as TLModel, HookedTransformerConfig
except ImportError as e:  # TL 4 removed HookedTransformer
    pytest.skip(f"this TransformerLens has no HookedTransformer ({e}); the peers extra pins 3.x", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from circuits.model.convert import (  # noqa: E402
    from_tl_config, load_tl_checkpoint, load_tl_state_dict, tl_extras, tl_key_mask_hooks, to_tl_config,
    to_transformer_lens)
from circuits.model.transformer import HookedTransformer  # noqa: E402
from circuits.paths import reference_dir  # noqa: E402
from circuits.tasks.brackets.reference import arena_data, arena_model  # noqa: E402
from circuits.tasks.brackets import data as B  # noqa: E402
from circuits.tasks import palindromes as P  # noqa: E402
from circuits.zoo.registry import get_entry  # noqa: E402



def assert_agree(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal to 1e-4 of the activation's scale: float32 rounding grows with magnitude (the palindrome
    model has no LayerNorm and its last attention scores reach ~5e3, where ours and TL's are each
    ~2e-3 from a float64 forward, and 1.7e-3 from each other)."""
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=0, msg=lambda s: f"{what} (scale {scale:.3g}): {s}")


def our_reference(name: str) -> HookedTransformer:
    """A committed reference checkpoint (the file `python -m circuits train --update-reference` exports)."""
    cfg = get_entry(name).config
    return load_tl_state_dict(HookedTransformer(cfg), load_file(str(reference_dir() / f"{name}.safetensors"))).eval()


def into_tl(model: HookedTransformer):
    cfg, sd = to_transformer_lens(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL 3.9's deprecation notice for HookedTransformer
        tl_model = TLModel(HookedTransformerConfig(**cfg))
    result = tl_model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return tl_model.eval()


def inputs(name: str) -> torch.Tensor:
    if name == "brackets":  # published strings of every length: right-padding in almost every row
        return arena_data(500).toks
    return P.generate(500, seed=3).toks


def tl_hooks(model: HookedTransformer, toks: torch.Tensor) -> list:
    return tl_key_mask_hooks(toks != model.cfg.pad_token) if model.cfg.pad_token is not None else []


@pytest.fixture(scope="module", params=["brackets", "palindromes"])
def pair(request):
    ours = our_reference(request.param)
    return request.param, ours, into_tl(ours), inputs(request.param)


def test_exported_checkpoint_loads_strictly_and_configs_round_trip(pair):
    name, ours, tl_model, _ = pair
    assert from_tl_config(tl_model.cfg, **tl_extras(ours.cfg)) == ours.cfg
    assert to_tl_config(from_tl_config(to_tl_config(ours.cfg))) == to_tl_config(ours.cfg)


def test_logits_agree(pair):
    name, ours, tl_model, toks = pair
    assert toks.shape[0] == 500
    if name == "brackets":
        assert bool((toks == B.PAD).any()), "the comparison must include padded rows"
    with torch.no_grad():
        want = ours(toks)  # [batch, d_vocab_out], read at position 0
        got = tl_model.run_with_hooks(toks, fwd_hooks=tl_hooks(ours, toks))  # [batch, pos, d_vocab_out]
    assert_agree(got[:, 0], want, "logits")


def test_cached_activations_agree(pair):
    """Every hook point both models have, at every position (ours caches the final LayerNorm at the
    read-out position only; attention scores are compared on unmasked keys, where both are defined)."""
    name, ours, tl_model, toks = pair
    with torch.no_grad():
        _, mine = ours.run_with_cache(toks)
        with tl_model.hooks(fwd_hooks=tl_hooks(ours, toks)):
            _, theirs = tl_model.run_with_cache(toks)
    common = sorted(set(mine.keys()) & set(theirs.keys()))
    assert len(common) >= 8 * ours.cfg.n_layers, f"too few shared hook names: {common}"
    keep = (toks != ours.cfg.pad_token) if ours.cfg.pad_token is not None else torch.ones_like(toks, dtype=torch.bool)
    for hook in common:
        a, b = mine[hook], theirs[hook]
        if a.shape != b.shape and hook.startswith("ln_final"):
            b = b[:, :1]  # the read-out position ("first")
        if hook.endswith("hook_attn_scores"):
            m = keep[:, None, None, :].expand_as(a)
            a, b = a[m], b[m]
        assert_agree(a, b, hook)


def test_tl_attention_mask_argument_is_not_pad_masking():
    """Why the README's recipe masks pad keys with hooks: TL's bidirectional attention ignores
    `attention_mask=`, so a TL user who passes it gets wrong logits with no error. If this starts
    failing, TL honours the argument now and the README can say so."""
    ours = our_reference("brackets")
    tl_model = into_tl(ours)
    toks = arena_data(500).toks
    with torch.no_grad():
        naive = tl_model(toks, attention_mask=(toks != B.PAD).long())[:, 0]
        assert (naive - ours(toks)).abs().max() > 1.0


def test_arena_checkpoint_through_a_tl_config_dict(tmp_path):
    """A TL-format checkpoint plus TL's config dict is a model in one call (the published ARENA one)."""
    tl_cfg, sd = to_transformer_lens(arena_model())
    torch.save(sd, tmp_path / "arena.pt")
    model = load_tl_checkpoint(tmp_path / "arena.pt", tl_cfg, pad_token=B.PAD, readout="first",
                               positional="sinusoidal").eval()
    toks = arena_data(500).toks
    with torch.no_grad():
        torch.testing.assert_close(model(toks), arena_model()(toks), atol=0, rtol=0)
        tl_model = into_tl(model)
        assert_agree(tl_model.run_with_hooks(toks, fwd_hooks=tl_key_mask_hooks(toks != B.PAD))[:, 0],
                     model(toks), "logits")


@pytest.mark.parametrize("name", ["brackets", "attn_only", "palindrome", "causal_padded"])
def test_every_tl_expressible_architecture_agrees_at_every_position(name):
    """Causal and bidirectional, padded or not, LN or none, one-hot embeddings and no positions:
    ours with read-out "all" against TL at every position (pad positions included)."""
    from model_configs import CONFIGS, perturbed_model

    ours = perturbed_model({**CONFIGS[name], "readout": "all"}, seed=0).eval()
    tl_model = into_tl(ours)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, ours.cfg.d_vocab, (16, ours.cfg.n_ctx), generator=g)
    if ours.cfg.pad_token is not None:  # right-pad rows to random lengths (at least one real token)
        pad = ours.cfg.pad_token
        toks = toks.masked_fill(toks == pad, (pad + 1) % ours.cfg.d_vocab)  # no pad among real tokens
        lengths = torch.randint(1, ours.cfg.n_ctx + 1, (16,), generator=g)
        toks = toks.masked_fill(torch.arange(ours.cfg.n_ctx)[None] >= lengths[:, None], pad)
    with torch.no_grad():
        assert_agree(tl_model.run_with_hooks(toks, fwd_hooks=tl_hooks(ours, toks)), ours(toks), "logits")


def test_the_readme_transformerlens_example_runs_as_written():
    """The README's TransformerLens block, pasted after the three names it leaves to the reader (`model`,
    `toks`, `PAD`): it runs and its read-out equals ours."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from transformer_lens" in b]
    model = arena_model()
    data = arena_data(64)
    names = {"model": model, "toks": data.toks, "PAD": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL 3.9's deprecation notice for HookedTransformer
        exec(compile(block, "README.md", "exec"), names)
    assert_agree(names["logits"], model(data.toks).detach(), "the README's TL read-out")


# --- issue 32: TransformerLens habits that work on ours -------------------------------------------------------

TL_WEIGHTS = ("W_E", "W_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
              "W_in", "b_in", "W_out", "b_out")


def lm_pair():
    """A small next-token model (readout 'all', d_vocab_out == d_vocab, causal) and its TL twin."""
    from circuits.model.transformer import TransformerConfig

    cfg = TransformerConfig(n_layers=2, d_model=16, n_ctx=8, n_heads=2, d_mlp=32, d_vocab=10, readout="all",
                            attention="causal", seed=3)
    ours = HookedTransformer(cfg).eval()
    return ours, into_tl(ours)


def test_weight_properties_are_tl_s_stacked_over_layers():
    ours = our_reference("brackets")
    tl_model = into_tl(ours)
    for name in TL_WEIGHTS:
        got, want = getattr(ours, name), getattr(tl_model, name)
        assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
        torch.testing.assert_close(got.detach(), want.detach(), atol=1e-6, rtol=0, msg=lambda s: f"{name}: {s}")


def test_return_type_logits_loss_both_and_none_as_tl():
    ours, tl_model = lm_pair()
    toks = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_loss = tl_model(toks, return_type="loss")
        want_logits = tl_model(toks, return_type="logits")
        assert_agree(ours(toks, return_type="logits"), want_logits, "logits")
        torch.testing.assert_close(ours(toks, return_type="loss"), want_loss, atol=1e-5, rtol=0)
        logits, loss = ours(toks, return_type="both")
        assert_agree(logits, want_logits, "both: logits")
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=0)
        assert ours(toks, return_type=None) is None and tl_model(toks, return_type=None) is None
    # a classifier's loss needs its labels (TL's next-token loss means nothing there)
    clf = our_reference("brackets")
    data = arena_data(32)
    with torch.no_grad():
        loss = clf(data.toks, return_type="loss", targets=data.isbal.long())
        want = torch.nn.functional.cross_entropy(clf(data.toks), data.isbal.long())
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=0)
    from circuits.errors import InputError

    with pytest.raises(InputError, match="targets="):
        clf(data.toks, return_type="loss")
    with pytest.raises(InputError, match="return_type='bogus'"):
        clf(data.toks, return_type="bogus")


def test_run_with_cache_remove_batch_dim_as_tl():
    ours, tl_model = lm_pair()
    toks = torch.randint(0, 10, (1, 8), generator=torch.Generator().manual_seed(1))
    _, cache = ours.run_with_cache(toks, remove_batch_dim=True)
    _, tl_cache = tl_model.run_with_cache(toks, remove_batch_dim=True)
    for name in ("blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "hook_embed"):
        assert cache[name].shape == tl_cache[name].shape, (name, cache[name].shape, tl_cache[name].shape)
        assert_agree(cache[name], tl_cache[name], name)
    from circuits.errors import InputError

    with pytest.raises(InputError, match="batch of one"):
        ours.run_with_cache(torch.cat([toks, toks]), remove_batch_dim=True)


def test_cache_logit_attrs_as_tl():
    ours = our_reference("brackets")
    tl_model = into_tl(ours)
    g = torch.Generator().manual_seed(2)
    body = torch.randint(3, 5, (16, 20), generator=g)  # "(" and ")" only: no padding, which TL cannot mask here
    toks = torch.cat([torch.zeros(16, 1, dtype=torch.long), body, torch.full((16, 1), 2)], 1)
    answer, other = torch.randint(0, 2, (16,), generator=g), torch.ones(16, dtype=torch.long)
    _, cache = ours.run_with_cache(toks)
    _, tl_cache = tl_model.run_with_cache(toks)
    stack, _ = cache.decompose_resid(return_labels=True)  # [component, batch, pos, d_model]
    got = cache.logit_attrs(stack[:, :, :1], answer, incorrect_tokens=other)[:, :, 0].detach()  # read-out pos 0
    tl_stack = tl_cache.decompose_resid(return_labels=False)[:, :, 0]  # [component, batch, d_model]
    want = tl_cache.logit_attrs(tl_stack, answer, incorrect_tokens=other, pos_slice=0).detach()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert_agree(got, want, "logit_attrs")


def test_lnpre_is_refused_with_the_fold_ln_hint():
    from circuits.errors import ConfigError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, act_fn="relu", d_vocab=5,
                                      normalization_type="LNPre")
    with pytest.raises(ConfigError, match="fold_ln=False"):
        from_tl_config(cfg)


def test_first_readout_with_causal_attention_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, act_fn="relu", d_vocab=5,
                                      attention_dir="causal")
    with pytest.warns(UserWarning, match="readout='first' with causal attention"):
        HookedTransformer(from_tl_config(cfg, readout="first"))
