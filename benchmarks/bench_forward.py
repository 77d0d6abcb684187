"""Forward-pass cost of the hooked model: plain PyTorch baseline vs our forward vs caching.

The bracket classifier's architecture (3 layers, d_model 56, 2 heads, d_mlp 56, sequences of 42 with
the last 10 positions padded), at batch 1, 64 and 1000. Per batch size, one group comparing:

  plain       benchmarks/plain_model.py: idiomatic PyTorch, no hook points, the same weights
  ours        HookedTransformer.forward with no hooks attached (the fast paths; in eval mode the last
              block computes only the read-out position)
  ours_full   the same with readout_only=False: the whole last block, as `plain` computes it
  cache_all   run_with_cache of every hook point, the default (since issue 33's third round eager at
              every size: every sublayer on its explicit path), nothing read
  cache_all_read  cache_all, then every entry read: the whole bill of the default
  cache_all_eager run_with_cache(defer=False) of every hook point, every entry read (the same as
              cache_all_read today; before, the default deferred from 4,096 batch x positions)
  cache_all_deferred  run_with_cache(defer=True) of every hook point, nothing read: what the forward does
              not need (attention scores and pattern, LayerNorm scale and normalized, per-head
              results) is computed on first read, so this is the cost of caching with nothing read
  cache_all_deferred_read  the same, then every entry read (the deferred ones computed)
  cache2      run_with_cache of `blocks.2.hook_resid_post` and `blocks.1.attn.hook_pattern`
  patch       patching head 2.0's z at every position from another batch (interventions.patch_activations:
              the source run stops at the patched hook, the target runs whole)
  patch_reuse the same patch through PatchBatch: the target batch's clean run done once beforehand (not
              timed), so each patch is the stopped source run plus the target's block 2 from its z on
              (the clean z kept on the first patch: warm-up)
  tl, tl_cache2, tl_cache_all, tl_patch   TransformerLens's HookedTransformer of the same weights with
              bidirectional attention and the pad mask as a hook on every hook_attn_scores (TL ignores
              attention_mask under bidirectional attention), when `transformer_lens` is installed (the
              optional `peers` extra): forward, the two-name cache, every hook point cached, the patch
  nns, nns_save1, nns_save_all   nnsight's NNsight wrapper of our model: a trace saving the logits,
              one module output, every module's output; only when `nnsight` is installed

Every variant's logits are checked equal to ours (<= 1e-5) before anything is timed (`check_variants`).

pytest (test_forward: one variant after another, min over rounds; test_forward_interleaved: all of
them round-robin in one run, as the script; benchmarks/conftest.py prints both ratio summaries):

    pytest benchmarks/bench_forward.py --benchmark-only --benchmark-min-rounds=20 [--interleaved-reps 20]

script (variants interleaved round-robin, so machine load hits them alike; ratios from the same run):

    python benchmarks/bench_forward.py [--reps 30] [--batches 1 64 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

torch.set_num_threads(1)  # comparable runs; tiny models gain nothing from intra-op threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moment import moment_line  # noqa: E402
from plain_model import PlainTransformer  # noqa: E402

from circuits.model.convert import to_tl_state_dict  # noqa: E402
from circuits.model.transformer import HookedTransformer, TransformerConfig  # noqa: E402
from circuits.tasks.brackets.data import tokenize  # noqa: E402

BATCHES = (1, 64, 1000)
N_BRACKETS = 30  # [start] + 30 brackets + [end] = 32 tokens, then 10 pads to n_ctx = 42
CACHE2 = ["blocks.2.hook_resid_post", "blocks.1.attn.hook_pattern"]
VARIANTS = ("plain", "ours", "ours_full", "cache_all", "cache_all_read", "cache_all_eager", "cache_all_deferred",
            "cache_all_deferred_read", "cache2", "patch",
            "patch_reuse", "tl", "tl_cache2", "tl_cache_all", "tl_patch", "nns", "nns_save1", "nns_save_all")
BRACKETS = dict(n_layers=3, d_model=56, n_ctx=42, n_heads=2, d_mlp=56, d_vocab=5, d_vocab_out=2,
                pad_token=1, positional="sinusoidal", readout="first", normalization="LN")


def bracket_model() -> HookedTransformer:
    return HookedTransformer(TransformerConfig(**BRACKETS, seed=0)).eval()


def bracket_tokens(batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, 42]: random bracket strings of 30 characters, so the last 10 positions are padding."""
    g = torch.Generator().manual_seed(seed)
    chars = torch.randint(0, 2, (batch, N_BRACKETS), generator=g).tolist()
    return tokenize(["".join("()"[c] for c in row) for row in chars], pad_to=42)


def transformer_lens_model(model: HookedTransformer):
    """TransformerLens's HookedTransformer of the same config and weights (bidirectional attention), or
    None if not installed."""
    try:
        from transformer_lens import HookedTransformer as TLHookedTransformer
        from transformer_lens import HookedTransformerConfig
    except ImportError:
        return None
    import warnings

    c = model.cfg
    tl_cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head, n_heads=c.n_heads,
        d_mlp=c.d_mlp, d_vocab=c.d_vocab, d_vocab_out=c.d_vocab_out, act_fn=c.act_fn,
        normalization_type="LN", attention_dir="bidirectional", device="cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TL 3.x: HookedTransformer -> TransformerBridge
        tl = TLHookedTransformer(tl_cfg)
    tl.load_state_dict(to_tl_state_dict(model), strict=False)  # TL keeps mask buffers we do not have
    return tl.eval()


def tl_pad_hooks(x: torch.Tensor, pad: int) -> list:
    """TL's forward hooks masking pad keys out of every attention row (ARENA's way: TL applies
    attention_mask only under causal attention)."""
    blocked = (x == pad)[:, None, None, :]  # [batch, 1, 1, key_pos]

    def mask(scores, hook):
        return scores.masked_fill(blocked, -1e5)  # [batch, head, query_pos, key_pos]

    return [(lambda name: name.endswith("hook_attn_scores"), mask)]


def nnsight_model(model: HookedTransformer):
    """nnsight's wrapper of our model, or None if nnsight is not installed."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    return NNsight(model)


PATCH = [("blocks.2.attn.hook_z", (slice(None), 0))]  # head 2.0's z at every position
TL_PATCH_NAME = "blocks.2.attn.hook_z"


def make_variants(model: HookedTransformer, plain: PlainTransformer, tl=None, nns=None) -> dict[str, Callable]:
    """name -> fn(tokens); each returns what a user would read (logits, and the cache if any).
    The patching variants take their source batch from `source_for` (a fixed other batch)."""
    from circuits.analysis.interventions import PatchBatch, patch_activations

    sources: dict[tuple, torch.Tensor] = {}
    batches: dict[int, PatchBatch] = {}

    def source_for(x):
        key = tuple(x.shape)
        if key not in sources:
            sources[key] = bracket_tokens(x.shape[0], seed=1)
        return sources[key]

    def patch_reuse(x):
        pb = batches.get(id(x))
        if pb is None or pb.inputs is not x:
            pb = batches[id(x)] = PatchBatch(model, x)  # the clean run, once per batch (warm-up)
        return pb.patch(source_for(x), PATCH)

    variants: dict[str, Callable] = {
        "plain": plain,
        "ours": model,
        "ours_full": lambda x: model(x, readout_only=False),
        "cache_all": lambda x: model.run_with_cache(x),
        "cache_all_read": lambda x: _read_all(*model.run_with_cache(x)),
        "cache_all_eager": lambda x: _read_all(*model.run_with_cache(x, defer=False)),
        "cache_all_deferred": lambda x: model.run_with_cache(x, defer=True),
        "cache_all_deferred_read": lambda x: _read_all(*model.run_with_cache(x, defer=True)),
        "cache2": lambda x: model.run_with_cache(x, names=CACHE2),
        "patch": lambda x: patch_activations(model, x, source_for(x), PATCH),
        "patch_reuse": patch_reuse,
    }
    if tl is not None:
        pad = model.cfg.pad_token

        def tl_logits(x, hooks=()):
            return tl.run_with_hooks(x, fwd_hooks=tl_pad_hooks(x, pad) + list(hooks))[:, 0]

        def tl_cache(x, names=None):
            with tl.hooks(fwd_hooks=tl_pad_hooks(x, pad)):
                logits, cache = tl.run_with_cache(x, names_filter=names)
            return logits[:, 0], cache

        def tl_patch(x):
            _, src = tl_cache(source_for(x), [TL_PATCH_NAME])
            value = src[TL_PATCH_NAME][:, :, 0]

            def patch(z, hook):
                z = z.clone()
                z[:, :, 0] = value
                return z

            return tl_logits(x, [(TL_PATCH_NAME, patch)])

        variants["tl"] = tl_logits
        variants["tl_cache2"] = lambda x: tl_cache(x, CACHE2)
        variants["tl_cache_all"] = lambda x: _read_all(*tl_cache(x))
        variants["tl_patch"] = tl_patch
    if nns is not None:
        variants.update(_nnsight_variants(nns))
    return variants


def _nnsight_variants(nns) -> dict[str, Callable]:
    def save_logits(x):
        with nns.trace(x):
            out = nns.output.save()
        return out

    def save_one(x):
        with nns.trace(x):
            r = nns.blocks[2].output.save()
            out = nns.output.save()
        return out, r

    def save_all(x):
        saved = []
        with nns.trace(x):
            for module in _nnsight_modules(nns):
                saved.append(module.output.save())
            out = nns.output.save()
        return out, saved

    return {"nns": save_logits, "nns_save1": save_one, "nns_save_all": save_all}


def _nnsight_modules(nns) -> list:
    """Every submodule whose output nnsight can save, in forward order (no hook points: ours are not
    called through nn.Module.__call__, so nnsight never sees them)."""
    out = []
    for block in nns.blocks:
        out.extend([block.ln1, block.attn, block.ln2, block.mlp, block])
    return [nns.embed, *out, nns.ln_final, nns.unembed]


def logits_of(result) -> torch.Tensor:
    """The logits in what a variant returns (a tensor, or a tuple whose first item is them)."""
    while isinstance(result, (tuple, list)):
        result = result[0]
    return getattr(result, "value", result)  # an nnsight proxy that was saved


def check_variants(variants: dict[str, Callable], x: torch.Tensor, atol: float = 1e-5) -> dict[str, float]:
    """Each variant's max |logits - ours| on x (the patch variants against the patch); raises if any
    exceeds atol, so nothing is timed that computes a different function."""
    ours = logits_of(variants["ours"](x))
    patched = logits_of(variants["patch"](x))
    diffs = {}
    for name, fn in variants.items():
        want = patched if "patch" in name else ours
        diffs[name] = float((logits_of(fn(x)).reshape(want.shape) - want).abs().max())
        if not diffs[name] <= atol:
            raise AssertionError(f"variant {name!r}: logits differ from ours by {diffs[name]:.3g} > {atol}")
    if torch.allclose(patched, ours, atol=1e-4):
        raise AssertionError("the patch leaves the logits unchanged: the patch rows would time nothing useful")
    return diffs


def _read_all(logits, cache):
    for name in cache:
        cache[name]  # computes a deferred entry
    return logits, cache


# --- pytest-benchmark -------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def variants():
        model = bracket_model()
        return make_variants(model, PlainTransformer.from_hooked(model).eval(), transformer_lens_model(model),
                             nnsight_model(model))

    def test_variants_compute_the_same_logits(variants):
        x = bracket_tokens(64)
        with torch.inference_mode():
            check_variants(variants, x)
            assert sorted(variants["cache2"](x)[1]) == sorted(CACHE2)

    @pytest.mark.parametrize("batch", BATCHES)
    def test_forward_interleaved(benchmark, variants, batch, request):
        """Every variant round-robin in one measurement (as script mode), so load on a shared machine
        hits them alike: the ratios benchmarks/conftest.py prints under "interleaved" come from here
        (test_forward below times one variant after another; its ratios drift with the load)."""
        x = bracket_tokens(batch)
        best: dict[str, float] = {}
        reps = request.config.getoption("--interleaved-reps", default=15)  # conftest may load late
        benchmark.group = f"interleaved batch={batch}"  # before the run: pytest-benchmark reads it then
        benchmark.extra_info.update(interleaved=best, batch=batch)  # filled in by the run
        benchmark.pedantic(lambda: best.update(interleaved(variants, x, reps)), rounds=1, iterations=1)

    @pytest.mark.parametrize("batch", BATCHES)
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_forward(benchmark, variants, variant, batch):
        if variant not in variants:
            pytest.skip("transformer_lens is not installed (optional `peers` extra): no TL comparison")
        benchmark.group = f"forward batch={batch}"
        benchmark.extra_info.update(variant=variant, batch=batch)
        x = bracket_tokens(batch)
        benchmark(variants[variant], x)  # under inference_mode (benchmarks/conftest.py)


# --- script mode: interleaved round-robin ----------------------------------------------------------
def _per_call_seconds(fn: Callable, x: torch.Tensor, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) / calls


def interleaved(variants: dict[str, Callable], x: torch.Tensor, reps: int,
                target_s: float = 0.02) -> dict[str, float]:
    """Min seconds per call of each variant, measured round-robin: each rep times every variant once
    (in a rotated order), so slow phases of a loaded machine hit all of them alike."""
    names = list(variants)
    for fn in variants.values():  # warm-up (allocator, lazy kernel init)
        fn(x)
    # calls per timing so one timing lasts ~target_s; the same count for every variant
    one = _per_call_seconds(variants["ours"], x, 3)
    calls = max(1, int(target_s / max(one, 1e-7)))
    best = {n: float("inf") for n in names}
    for rep in range(reps):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            best[n] = min(best[n], _per_call_seconds(variants[n], x, calls))
    return best


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30, help="round-robin repetitions (min over them is reported)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--only", nargs="+", default=None, help="time only these variants (plus ours, ours_full, plain)")
    args = p.parse_args(argv)
    model = bracket_model()
    tl = transformer_lens_model(model)
    nns = nnsight_model(model)
    variants = make_variants(model, PlainTransformer.from_hooked(model).eval(), tl, nns)
    if args.only:
        keep = {"plain", "ours", "ours_full", "patch", *args.only}
        variants = {k: v for k, v in variants.items() if k in keep}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {args.reps} interleaved reps, "
          f"min per call; transformer_lens: {'yes' if tl is not None else 'not installed'}; nnsight: "
          f"{'yes' if nns is not None else 'not installed (its rows skipped)'}; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    with torch.inference_mode():
        diffs = check_variants(variants, bracket_tokens(64))
    print("logits checked against ours at batch 64 (max |diff|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items() if k != "ours"))
    # / full: to ours_full, the forward doing the same work as caching every hook (the whole last block)
    print(f"{'batch':>6} {'variant':<15} {'min ms':>10} {'/ ours':>8} {'/ full':>8} {'/ plain':>8}")
    with torch.inference_mode():
        for batch in args.batches:
            best = interleaved(variants, bracket_tokens(batch), args.reps)
            for n, t in best.items():
                print(f"{batch:>6} {n:<15} {t * 1e3:>10.4f} {t / best['ours']:>8.2f} "
                      f"{t / best['ours_full']:>8.2f} {t / best['plain']:>8.2f}", flush=True)
    print(moment_line())


if __name__ == "__main__":
    main()
