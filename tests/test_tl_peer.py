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

from circuits.convert import (  # noqa: E402
    from_tl_config, load_tl_checkpoint, load_tl_state_dict, tl_extras, tl_key_mask_hooks, to_tl_config,
    to_transformer_lens)
from circuits.model import HookedTransformer  # noqa: E402
from circuits.paths import reference_dir  # noqa: E402
from circuits.reference import arena_data, arena_model  # noqa: E402
from circuits.tasks import brackets as B  # noqa: E402
from circuits.tasks import palindromes as P  # noqa: E402
from circuits.zoo import get_entry  # noqa: E402



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
