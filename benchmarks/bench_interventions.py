"""Resampling ablation: `resample_activations` (one clean run, each resampling resumes at the patched
block; `ours_lengths`: also in length-bucketed chunks) against one `patch_activations` call per
resampling (a source run and a full patched run each).

The bracket model's architecture, 2,000 strings, a key/value patch at layer 2 (the seed's causal
claim), four resamplings (clean, random, agreeing, disagreeing in the claim).

    pytest benchmarks/bench_interventions.py --benchmark-only --benchmark-min-rounds=5
"""

from __future__ import annotations

import pytest
import torch

from circuits.analysis import interventions as I
from circuits.model.transformer import HookedTransformer, TransformerConfig
from circuits.tasks.brackets import data as B

torch.set_num_threads(1)

PATCHES = [("blocks.2.attn.hook_k", (1, 0)), ("blocks.2.attn.hook_v", (1, 0))]
N = 2000


@pytest.fixture(scope="module")
def setup():
    cfg = TransformerConfig(n_layers=3, d_model=56, n_ctx=B.N_CTX, n_heads=2, d_mlp=56, d_vocab=B.VOCAB,
                            d_vocab_out=2, pad_token=B.PAD, positional="sinusoidal", readout="first", seed=0)
    model = HookedTransformer(cfg).eval()
    data = B.generate(N, 5)
    g = torch.Generator().manual_seed(0)
    sources = [torch.arange(N)] + [torch.randint(N, (N,), generator=g) for _ in range(3)]
    return model, data.toks, sources, data.lengths + 2


def test_variants_agree(setup):
    model, toks, sources, lengths = setup
    fast = I.resample_activations(model, toks, PATCHES, sources)
    bucketed = I.resample_activations(model, toks, PATCHES, sources, lengths=lengths)
    for rows, out, out2 in zip(sources, fast, bucketed):
        torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, I.patch_activations(model, toks, toks[rows], PATCHES), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["ours", "ours_lengths", "patch_each"])
def test_four_resamplings(benchmark, setup, variant):
    model, toks, sources, lengths = setup
    benchmark.group = "resampling x4, 2000 strings"
    benchmark.extra_info["variant"] = variant
    if variant == "ours":
        benchmark.pedantic(lambda: I.resample_activations(model, toks, PATCHES, sources), rounds=5, warmup_rounds=1)
    elif variant == "ours_lengths":  # length-bucketed chunks
        benchmark.pedantic(lambda: I.resample_activations(model, toks, PATCHES, sources, lengths=lengths),
                           rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: [I.patch_activations(model, toks, toks[r], PATCHES) for r in sources],
                           rounds=5, warmup_rounds=1)


def _groups():
    g = torch.Generator().manual_seed(1)
    return [[torch.arange(N)] + [torch.randint(N, (N,), generator=g) for _ in range(4)] for _ in range(5)]


def _full_forward_per_group(model, toks, groups):
    """What the bracket resampling claim ran before resample_together: per group, the whole model on
    the strings repeated once per source set (the patched slices taken from one clean run)."""
    _, cache = model.run_with_cache(toks, names=[n for n, _ in PATCHES])
    out = []
    for group in groups:
        source = torch.cat(group)
        hooks = [(n, I._overwrite(index, cache[n][(slice(None), *index)][source])) for n, index in PATCHES]
        out.append(list(model.run_with_hooks(toks.repeat(len(group), 1), fwd_hooks=hooks).split(len(toks))))
    return out


def test_together_variants_agree(setup):
    model, toks, _, _ = setup
    groups = _groups()
    for a, b in zip(I.resample_together(model, toks, PATCHES, groups), _full_forward_per_group(model, toks, groups)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["ours", "full_forward"])
def test_five_draws_of_five_source_sets_in_one_batch(benchmark, setup, variant):
    """The bracket resampling claim's shape: 5 draws, each 5 source sets sharing one forward."""
    model, toks, _, _ = setup
    groups = _groups()
    benchmark.group = "together 5x5, 2000 strings"
    benchmark.extra_info["variant"] = variant
    fn = ((lambda: I.resample_together(model, toks, PATCHES, groups)) if variant == "ours"
          else (lambda: _full_forward_per_group(model, toks, groups)))
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
