"""The short cuts of patching compute what the full runs compute: a source run stopped at the patched
hook point (capture_activations), a target run resumed from a clean run's residual (PatchBatch), and
the block loop without per-call module lists. Compared with the full runs at a tight tolerance (the
same kernels on the same tensors: equal up to float rounding of nothing, so 1e-6 in float32 and
1e-12 in float64 would already flag a wrong residual or a patch in the wrong place)."""

from __future__ import annotations

import pytest
import torch

from circuits.analysis import interventions as I
from circuits.errors import HookNameError, InputError
from model_configs import CONFIGS, perturbed_model

TIGHT = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}
DTYPES = (torch.float32, torch.float64)


def inputs(model, batch: int = 6, seed: int = 3) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    if cfg.d_input:
        return torch.randn(batch, cfg.n_ctx, cfg.d_input, generator=g).to(model.embed.W_in.dtype)
    toks = torch.randint(0, cfg.d_vocab, (batch, cfg.n_ctx), generator=g)
    if cfg.pad_token is not None:
        toks[toks == cfg.pad_token] = (cfg.pad_token + 1) % cfg.d_vocab
        for i in range(1, batch):  # right padding of different lengths
            toks[i, cfg.n_ctx - i:] = cfg.pad_token
    return toks


def patches_for(model) -> list[list[tuple[str, tuple]]]:
    """A patch in the first block, one in the last block (position 0, head 0), several across blocks."""
    n = model.cfg.n_layers
    last = n - 1
    out = [[(f"blocks.{last}.attn.hook_z", (0, 0))],
           [(f"blocks.{last}.hook_resid_pre", (slice(0, 2),))],
           [("blocks.0.attn.hook_v", (1, 0))]]
    if n > 1:
        out.append([(f"blocks.1.attn.hook_pattern", (0,)), (f"blocks.{last}.attn.hook_k", (1,)),
                    ("blocks.0.hook_resid_post", (2,))])
        # hook_z patches (PatchBatch starts the patched block after its attention): a head at every
        # position in block 1, two patches of one z, and a z patch followed by one in a later block
        out.append([("blocks.1.attn.hook_z", (slice(None), 1))])
        out.append([(f"blocks.{last}.attn.hook_z", (slice(None), 0)), (f"blocks.{last}.attn.hook_z", (3, -1))])
        out.append([("blocks.1.attn.hook_z", (2,)), (f"blocks.{last}.hook_resid_post", (0,))])
    return out


def reference_patch(model, x, source, patches):
    """The full runs: every source activation cached on the explicit path, then the whole target."""
    names = [n for n, _ in patches]
    with torch.no_grad():
        _, cache = model.run_with_cache(source, names=names, defer=False)

        def hook_for(index, value):
            def patch(act, hook):
                act = act.clone()
                act[(slice(None), *index)] = value
                return act
            return patch

        hooks = [(n, hook_for(idx, cache[n][(slice(None), *idx)])) for n, idx in patches]
        return model.run_with_hooks(x, fwd_hooks=hooks)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patching_short_cuts_equal_the_full_runs(name, dtype):
    model = perturbed_model(name, dtype=dtype)
    x = inputs(model)
    source = inputs(model, seed=4)
    batch = I.PatchBatch(model, x)
    torch.testing.assert_close(batch.logits, model(x), **TIGHT[dtype])
    changed = 0
    for patches in patches_for(model):
        expected = reference_patch(model, x, source, patches)
        torch.testing.assert_close(I.patch_activations(model, x, source, patches), expected, **TIGHT[dtype])
        torch.testing.assert_close(batch.patch(source, patches), expected, **TIGHT[dtype])
        changed += not torch.allclose(expected, batch.logits, atol=1e-6)
    assert changed >= 2  # the patches move the output (else the equalities would prove little)


@pytest.mark.parametrize("batch", [1, 6])
def test_a_hook_z_patch_starts_after_the_attention_and_keeps_the_clean_z(batch, monkeypatch):
    """PatchBatch's hook_z patches: the target run computes no attention in the patched block (only the
    source run does), equals the full runs, and the kept clean z is not edited by the patches (a later
    patch of another head still sees the clean values)."""
    from circuits.model.transformer import Attention

    model = perturbed_model("brackets", dtype=torch.float64)
    x, source = inputs(model, batch=batch), inputs(model, batch=batch, seed=4)
    pb = I.PatchBatch(model, x)
    calls = []
    real = Attention.z_of
    monkeypatch.setattr(Attention, "z_of", lambda self, *a: calls.append(self) or real(self, *a))
    for layer in (1, 2):
        attn = model.blocks[layer].attn
        for head in (0, 1):
            patches = [(f"blocks.{layer}.attn.hook_z", (slice(None), head))]
            expected = reference_patch(model, x, source, patches)
            pb.patch(source, patches)  # the first one keeps the clean z (a clean run to the patched z)
            calls.clear()
            got = pb.patch(source, patches)
            assert sum(c is attn for c in calls) == 1  # the source run's, stopped at the patched z
            torch.testing.assert_close(got, expected, **TIGHT[torch.float64])
        name = f"blocks.{layer}.attn.hook_z"
        with torch.no_grad():
            _, cache = model.run_with_cache(x, names=[name])
        assert torch.equal(pb._z[layer], cache[name])


def test_resume_z_refuses_hooks_it_would_skip():
    """forward(resume_z=...) starts a block after its attention: a hook point before hook_z (or a torch
    module hook on the block) would be skipped, so it is refused; without them it is the full forward."""
    from circuits.errors import InputError

    model = perturbed_model("brackets", dtype=torch.float64)
    x = inputs(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names=["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"])
        resume = dict(start_at_layer=1, resid=cache["blocks.1.hook_resid_pre"], resume_z=cache["blocks.1.attn.hook_z"])
        torch.testing.assert_close(model(x, **resume), model(x), atol=1e-12, rtol=1e-12)
        for name in ("blocks.1.hook_resid_pre", "blocks.1.ln1.hook_normalized", "blocks.1.attn.hook_q",
                     "blocks.1.attn.hook_pattern"):
            with pytest.raises(InputError, match="come before"):
                model.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: None)], **resume)
        handle = model.blocks[1].register_forward_hook(lambda m, args, out: out)
        try:
            with pytest.raises(InputError, match="torch module hook"):
                model(x, **resume)
        finally:
            handle.remove()
        with pytest.raises(InputError, match="start_at_layer"):
            model(x, resume_z=cache["blocks.1.attn.hook_z"])
        with pytest.raises(InputError, match="shape"):
            model(x, **dict(resume, resume_z=cache["blocks.1.attn.hook_z"][:, :3]))


def test_a_source_run_stops_at_the_last_patched_hook():
    """capture_activations does not run the blocks after the last hook point it needs."""
    model = perturbed_model("brackets")
    x = inputs(model)
    reached = []
    with model.hooks([("blocks.2.hook_resid_pre", lambda a, hook: reached.append(hook.name)),
                      ("blocks.1.hook_resid_post", lambda a, hook: reached.append(hook.name))]):
        got = I.capture_activations(model, x, ["blocks.1.attn.hook_z", "blocks.0.hook_resid_post"])
    assert reached == [] and sorted(got) == ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names=list(got), defer=False)
    for n in got:
        torch.testing.assert_close(got[n], cache[n], atol=0, rtol=0)
    with pytest.raises(HookNameError, match="unknown hook name"):
        I.capture_activations(model, x, ["blocks.9.attn.hook_z"])


def test_a_patch_batch_runs_the_whole_target_once_the_model_changed():
    """An in-place weight edit or a permanent hook after the clean run: the kept residual is stale,
    so the patch runs the whole target (and equals patch_activations on the edited model)."""
    model = perturbed_model("brackets", dtype=torch.float64)
    x, source = inputs(model), inputs(model, seed=4)
    batch = I.PatchBatch(model, x)
    patches = [("blocks.2.attn.hook_z", (0, 0))]
    with torch.no_grad():
        model.blocks[0].attn.W_O.mul_(0.5)
    torch.testing.assert_close(batch.patch(source, patches), reference_patch(model, x, source, patches), atol=1e-12, rtol=1e-12)

    def double(a, hook):
        return a * 2

    with model.hooks([("blocks.0.hook_resid_post", double)]):
        torch.testing.assert_close(batch.patch(source, patches), reference_patch(model, x, source, patches),
                                   atol=1e-12, rtol=1e-12)


def test_resuming_at_every_layer_is_the_full_forward():
    """forward(start_at_layer=l, resid=the clean residual there) gives the full forward's logits (the
    block loop runs blocks l.. without slicing the module list)."""
    for name in sorted(CONFIGS):
        model = perturbed_model(name, dtype=torch.float64)
        x = inputs(model)
        n = model.cfg.n_layers
        with torch.no_grad():
            full = model(x)
            _, cache = model.run_with_cache(x, names=[f"blocks.{l}.hook_resid_pre" for l in range(n)])
            for l in range(1, n):
                for readout_only in (True, False):
                    out = model(x, start_at_layer=l, resid=cache[f"blocks.{l}.hook_resid_pre"], readout_only=readout_only)
                    torch.testing.assert_close(out, full, atol=1e-12, rtol=1e-12)


def test_torch_module_hooks_still_fire_on_the_sublayers():
    """The sublayers skip nn.Module.__call__ only while no torch hook is registered: a forward hook,
    a pre-hook and a global hook (what nnsight-style tools use) still see and edit their modules."""
    model = perturbed_model("brackets", dtype=torch.float64)
    x = inputs(model)
    with torch.no_grad():
        clean = model(x)
    seen = []
    handles = [model.blocks[1].register_forward_hook(lambda m, args, out: out * 0),
               model.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append("pre")),
               torch.nn.modules.module.register_module_forward_hook(
                   lambda m, args, out: seen.append(type(m).__name__))]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    assert "pre" in seen and "MLP" in seen and "TransformerBlock" in seen
    assert not torch.allclose(out, clean)
    with torch.no_grad():
        torch.testing.assert_close(model(x), clean, atol=0, rtol=0)


def test_a_resumed_forward_refires_the_embedding_hooks_and_refuses_an_edit():
    """Hooks on hook_embed / hook_pos_embed run in a resumed forward on x's embeddings (a mean
    ablation's padding tracker must see the patched batch); one that edits them is refused."""
    from circuits.model.transformer import EmbeddingEditedError

    model = perturbed_model("brackets", dtype=torch.float64)
    x = inputs(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names=["blocks.1.hook_resid_pre", "hook_embed", "hook_pos_embed"])
        seen = {}
        with model.hooks([("hook_embed", lambda e, hook: seen.update(embed=e)),
                          ("hook_pos_embed", lambda p, hook: seen.update(pos=p))]):
            out = model(x, start_at_layer=1, resid=cache["blocks.1.hook_resid_pre"])
        torch.testing.assert_close(seen["embed"], cache["hook_embed"], atol=0, rtol=0)
        torch.testing.assert_close(seen["pos"], cache["hook_pos_embed"], atol=0, rtol=0)
        torch.testing.assert_close(out, model(x), atol=1e-12, rtol=1e-12)
        with model.hooks([("hook_embed", lambda e, hook: e * 2)]), pytest.raises(EmbeddingEditedError, match="hook_embed"):
            model(x, start_at_layer=1, resid=cache["blocks.1.hook_resid_pre"])
        # resampling falls back to the whole model there, and equals patch_activations
        rows = torch.arange(len(x)).roll(1)
        patches = [("blocks.2.attn.hook_z", (0, 0))]
        with model.hooks([("hook_embed", lambda e, hook: e * 2)]):
            got = I.resample_activations(model, x, patches, [rows])[0]
            torch.testing.assert_close(got, reference_patch(model, x, x[rows], patches), atol=1e-12, rtol=1e-12)


def _kv_patches(model) -> list[list[tuple[str, tuple]]]:
    """Patches of the last block's keys and values: one head at one position (the bracket resampling
    claims'), every head at a position, a head's slice of d_head, a negative head index."""
    last, h = model.cfg.n_layers - 1, model.cfg.n_heads
    k, v = f"blocks.{last}.attn.hook_k", f"blocks.{last}.attn.hook_v"
    return [[(k, (1, 0)), (v, (1, 0))],
            [(k, (2,)), (v, (0,))],
            [(v, (slice(1, 3), h - 1, slice(0, 1)))],
            [(k, (0, -1)), (v, (3, 0))]]


def _resampling_groups() -> list:
    """Two groups of source rows for a batch of 7: the identity, a draw with repeats, a permutation;
    and one more draw."""
    g = torch.Generator().manual_seed(8)
    return [[torch.arange(7), torch.randint(7, (7,), generator=g), torch.randperm(7, generator=g)],
            [torch.randint(7, (7,), generator=g)]]


def _short_cut_equals_the_resumed_forwards(model, x, patches, groups, dtype, monkeypatch) -> list:
    """`resample_together` with its last-block short cut, checked against itself with the short cut
    off (the resumed forwards) at the dtype's tolerance; returns the short cut's outputs."""
    got = I.resample_together(model, x, patches, groups)
    with monkeypatch.context() as m:
        m.setattr(I, "_last_block_kv_only", lambda *a: False)
        expected = I.resample_together(model, x, patches, groups)
    for outs, exp in zip(got, expected):
        for a, b in zip(outs, exp):
            torch.testing.assert_close(a, b, **TIGHT[dtype])
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resampling_the_last_blocks_keys_and_values_equals_the_resumed_forwards(name, dtype, monkeypatch):
    """resample_together's short cut for keys / values of the last block on a hook-free model (the
    last block's LayerNorm, key/value projection and read-out query computed once for the clean rows,
    attention per group only for the patched heads) gives what the resumed forwards of each group's
    repeated batch give. The same kernels on the same rows: bitwise here, compared at 1e-6 / 1e-12."""
    model = perturbed_model(name, dtype=dtype)
    x = inputs(model, batch=7)
    groups = _resampling_groups()
    moved = 0
    for patches in _kv_patches(model):
        assert I._last_block_kv_only(model, [n for n, _ in patches], [21, 7])
        got = _short_cut_equals_the_resumed_forwards(model, x, patches, groups, dtype, monkeypatch)
        for r, out in zip(groups[0], got[0]):
            torch.testing.assert_close(out, reference_patch(model, x, x[r], patches), **TIGHT[dtype])
        moved += not torch.allclose(got[1][0], got[0][0], atol=1e-6)
    assert moved >= 2  # the patches move the output


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resampling_with_last_block_mean_ablations_equals_the_resumed_forwards(name, dtype, monkeypatch):
    """The same short cut on a mutant whose last-block heads are batch-mean ablated (the bracket
    resampling claims' `mean_ablate:` mutations): each ablated head's output at the read-out position
    is its mean over the group's batch there, which is all the read-out needs of it. Against the
    resumed forwards, which run the whole last block with the ablations' hooks (every position: the
    read-out rounds differently, hence 1e-6 / 1e-12, not bitwise). A model whose read-out position
    differs between rows (read-out "last" with padding) keeps the resumed forwards."""
    base = perturbed_model(name, dtype=dtype)
    last, h = base.cfg.n_layers - 1, base.cfg.n_heads
    x = inputs(base, batch=7)
    groups = _resampling_groups()
    one_position = base.cfg.readout == "first" or base.cfg.pad_token is None
    moved = 0
    for heads in ([0], [h - 1], list(range(h))):
        model = base
        for head in heads:
            model = I.batch_mean_ablate_head(model, last, head)
        for patches in _kv_patches(base):
            names = [n for n, _ in patches]
            assert I._last_block_kv_only(model, names, [21, 7], x) == one_position
            got = _short_cut_equals_the_resumed_forwards(model, x, patches, groups, dtype, monkeypatch)
            unmutated = I.resample_together(base, x, patches, groups)
            moved += not torch.allclose(got[0][1], unmutated[0][1], atol=1e-4)
    assert moved >= 6  # the ablations move the output (else the equalities would prove little)


def test_the_last_block_short_cut_is_not_taken_with_hooks_or_elsewhere():
    """A permanent hook (other than a batch-mean ablation of a last-block head), a torch module hook,
    training mode, an all-positions read-out, a patch before the last block or a batch of one row:
    the resumed forwards run as before."""
    model = perturbed_model("brackets")
    kv = ["blocks.2.attn.hook_k", "blocks.2.attn.hook_v"]
    x = inputs(model)
    assert I._last_block_kv_only(model, kv, [10])
    assert not I._last_block_kv_only(model, kv + ["blocks.1.attn.hook_v"], [10])
    assert not I._last_block_kv_only(model, ["blocks.2.attn.hook_z"], [10])
    assert not I._last_block_kv_only(model, kv, [10, 1])
    # a batch-mean ablation of a last-block head is modelled (with the inputs: one read-out position)
    assert I._last_block_kv_only(I.batch_mean_ablate_head(model, 2, 0), kv, [10], x)
    assert not I._last_block_kv_only(I.batch_mean_ablate_head(model, 2, 0), kv, [10])
    # ... one elsewhere, of an MLP, or the same head twice, is not
    assert not I._last_block_kv_only(I.batch_mean_ablate_head(model, 1, 0), kv, [10], x)
    assert not I._last_block_kv_only(I.batch_mean_ablate_mlp(model, 2), kv, [10], x)
    twice = I.batch_mean_ablate_head(I.batch_mean_ablate_head(model, 2, 0), 2, 0)
    assert not I._last_block_kv_only(twice, kv, [10], x)
    with I.batch_mean_ablate_head(model, 2, 1).hooks([("blocks.2.attn.hook_z", lambda a, hook: a)]) as hooked:
        assert not I._last_block_kv_only(hooked, kv, [10], x)
    with model.hooks([("blocks.0.hook_resid_post", lambda a, hook: a)]):
        assert not I._last_block_kv_only(model, kv, [10])
    handle = model.blocks[0].register_forward_hook(lambda m, args, out: out)
    try:
        assert not I._last_block_kv_only(model, kv, [10])
    finally:
        handle.remove()
    model.train()
    assert not I._last_block_kv_only(model, kv, [10])
    model.eval()
    every = perturbed_model(dict(CONFIGS["brackets"], readout="all"))
    assert not I._last_block_kv_only(every, kv, [10])


def test_kept_bootstrap_indices_are_the_generators_and_give_the_same_intervals(monkeypatch):
    """stats.resample_indices hands out the index arrays it drew before for the same seed, sample sizes,
    pairing, resamples and batch: they equal a fresh generator's draws, are read-only, and the
    intervals (percentile paired / unpaired, studentized mean, AUROC) are exactly those of a cold
    cache; entries past the byte budget are dropped least recently used first."""
    import numpy as np

    from circuits.claims import stats as S

    monkeypatch.setattr(S, "_RESAMPLE_CACHE", {})
    rng = np.random.default_rng(0)
    x, y, z = rng.normal(size=300), rng.normal(size=300), rng.normal(size=120)
    for lens, paired in (((300,), True), ((300, 120), False)):
        got = S.resample_indices(7, lens, paired, 250, 60)
        fresh = np.random.default_rng(7)
        for part in got:
            assert all(not a.flags.writeable for a in part)
            for a, m in zip(part, lens):
                np.testing.assert_array_equal(a, fresh.integers(0, m, (a.shape[0], m)))
        assert sum(p[0].shape[0] for p in got) == 250
        assert S.resample_indices(7, lens, paired, 250, 60) is got  # kept

    def intervals():
        return [S.bootstrap_ci((x, y), S.pearson, paired=True, method="percentile", n_resamples=400, seed=3),
                S.bootstrap_ci((x, z), S.mean_difference, method="percentile", n_resamples=400, seed=3),
                S.bootstrap_ci(x, np.mean, n_resamples=400, seed=3),
                S.auroc_ci(x[:150] + 0.5, z, n_resamples=400, seed=3)]

    monkeypatch.setattr(S, "_RESAMPLE_CACHE", {})
    cold = intervals()
    assert S._RESAMPLE_CACHE
    warm = intervals()
    monkeypatch.setattr(S, "RESAMPLE_CACHE_BYTES", 0)  # nothing kept: every interval draws afresh
    monkeypatch.setattr(S, "_RESAMPLE_CACHE", {})
    uncached = intervals()
    assert not S._RESAMPLE_CACHE
    for a, b, c in zip(cold, warm, uncached):
        assert (a.point, a.lo, a.hi, a.method) == (b.point, b.lo, b.hi, b.method) == (c.point, c.lo, c.hi, c.method)
    monkeypatch.setattr(S, "RESAMPLE_CACHE_BYTES", 2 * 8 * 100 * 300)  # room for two [100, 300] entries
    monkeypatch.setattr(S, "_RESAMPLE_CACHE", {})
    for seed in (1, 2, 1, 3):  # 1 is used again, so 2 is the least recently used when 3 comes
        S.resample_indices(seed, (300,), True, 100, 100)
    assert [k[0] for k in S._RESAMPLE_CACHE] == [1, 3]


def _attention_way(monkeypatch, per_head: bool) -> None:
    """Make the explicit attention go head by head (out= into head-major slices) or gather q, k, v
    head-major for one batched GEMM, whatever the size (it chooses by PER_HEAD_MIN_TOKENS)."""
    from circuits.model import transformer

    monkeypatch.setattr(transformer, "PER_HEAD_MIN_TOKENS", 0 if per_head else 10 ** 9)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_per_head_explicit_attention_equals_the_gathered_one(name, dtype, monkeypatch):
    """The explicit attention's two ways (head by head on strided q, k, v; gathered head-major for one
    GEMM) cache the same scores, pattern, z and per-head results and give the same logits, eager and
    deferred, with a hook replacing q (no longer a view of the projection), and under autograd
    (head by head then stacks, out= taking no autograd)."""
    model = perturbed_model(name, dtype=dtype)
    x = inputs(model)
    replace_q = [("blocks.0.attn.hook_q", lambda a, hook: a * 1.5)]
    got = {}
    for per_head in (False, True):
        _attention_way(monkeypatch, per_head)
        with torch.no_grad():
            got[per_head, "eager"] = model.run_with_cache(x, defer=False)
            got[per_head, "deferred"] = model.run_with_cache(x, defer=True)
            with model.hooks(replace_q):
                got[per_head, "hooked"] = model.run_with_cache(x, defer=False)
        with torch.enable_grad():
            logits, cache = model.run_with_cache(x, defer=False)
            logits.sum().backward()
            got[per_head, "grad"] = logits.detach(), cache
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            model.zero_grad(set_to_none=True)
            got[per_head, "grads"] = grads
    for kind in ("eager", "deferred", "hooked", "grad"):
        (want_logits, want), (have_logits, have) = got[False, kind], got[True, kind]
        torch.testing.assert_close(have_logits, want_logits, **TIGHT[dtype])
        assert list(have) == list(want)
        for n in want:
            torch.testing.assert_close(have[n], want[n], **TIGHT[dtype], msg=lambda m: f"{kind} {n}: {m}")
    for a, b in zip(got[True, "grads"], got[False, "grads"], strict=True):
        torch.testing.assert_close(a, b, **TIGHT[dtype])
    pattern = got[True, "eager"][1]["blocks.0.attn.hook_pattern"]  # [batch, head, query, key]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1], dtype=dtype), **TIGHT[dtype])


@pytest.mark.parametrize("per_head", [False, True], ids=["gathered", "per_head"])
@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_values_are_not_edited_after_the_hook_saw_them(name, defer, per_head, monkeypatch):
    """Every cache entry equals a copy taken when its hook point fired (the cache keeps tensors
    without cloning them, so nothing may edit one in place later in the forward); batch 1 and 6,
    the explicit attention going head by head and gathered."""
    _attention_way(monkeypatch, per_head)
    model = perturbed_model(name, dtype=torch.float64)
    for batch in (1, 6):
        x = inputs(model, batch=batch)
        with torch.no_grad():
            _, cache = model.run_with_cache(x, defer=defer)
            seen = {}
            model.run_with_hooks(x, fwd_hooks=[(lambda n: True, lambda a, hook: seen.__setitem__(hook.name, a.clone()))])
        assert set(seen) <= set(cache)
        for n in seen:
            torch.testing.assert_close(cache[n], seen[n], atol=1e-12, rtol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("per_head", [False, True], ids=["gathered", "per_head"])
def test_an_in_place_edit_of_q_k_or_v_reaches_the_explicit_attention(per_head, monkeypatch):
    """The explicit attention copies q, k and v head-major in one go while they are still views of the
    fused projection (or reads them in place head by head): an edit in place (a hook returning None)
    must reach it as a returned edit does."""
    _attention_way(monkeypatch, per_head)
    model = perturbed_model("brackets", dtype=torch.float64)
    x = inputs(model)
    for point in ("hook_q", "hook_k", "hook_v"):
        name = f"blocks.1.attn.{point}"

        def in_place(a, hook):
            a[:, 1:3, 0] *= -2.0

        def returned(a, hook):
            a = a.clone()
            a[:, 1:3, 0] *= -2.0
            return a

        with torch.no_grad():
            with model.hooks([(name, in_place)]):
                got, cache = model.run_with_cache(x, names=["blocks.1.attn.hook_pattern"], defer=False)
            with model.hooks([(name, returned)]):
                want, want_cache = model.run_with_cache(x, names=["blocks.1.attn.hook_pattern"], defer=False)
            clean = model(x)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"], want_cache["blocks.1.attn.hook_pattern"],
                                   atol=1e-12, rtol=1e-12)
        assert not torch.allclose(got, clean)


def _random_bracket_strings(seed: int, n: int = 300) -> list:
    """n random bracket strings of 1-40 characters (balanced or not): bucket widths of every size."""
    g = torch.Generator().manual_seed(seed)
    return ["".join("()"[int(b)] for b in torch.randint(2, (int(k),), generator=g))
            for k in torch.randint(1, 41, (n,), generator=g)]


def test_a_brackets_analysis_reads_attention_from_its_own_run_as_from_the_full_cache(monkeypatch):
    """`Analysis.cache` (tasks/brackets/subjects.py) no longer caches every layer's attention pattern;
    `attention_from_query_0` runs the one layer a claim reads. Both give what one cache of the
    decomposition and every pattern gives (the same forward and pattern function): bitwise, in
    batches of 4,096 batch x positions or more, where a cache with patterns defers them and leaves
    the fused forward's values alone (one bucket of all 300 strings here; smaller buckets agree to
    float rounding: the next test)."""
    from circuits.analysis import measures as A
    from circuits.tasks.brackets import data as B
    from circuits.tasks.brackets import subjects as S
    from circuits.tasks.brackets.subjects import Analysis

    monkeypatch.setattr(S, "BUCKET_ROWS", 300)

    model = perturbed_model("brackets")
    strs = _random_bracket_strings(11)
    data = B.BracketData.from_strings(strs)
    for m in (model, I.batch_mean_ablate_head(model, 2, 0)):
        an = Analysis(m, data)
        names = A.decomposition_names(m) + [f"blocks.{l}.attn.hook_pattern" for l in range(m.cfg.n_layers)]
        full = A.run_in_batches(m, data.toks, names=names, keep=A.at_position(0), lengths=data.lengths + 2,
                                batch_size=an.batch_size)
        assert not any(k.endswith("hook_pattern") for k in an.cache.keys())
        for k in A.decomposition_names(m):
            assert torch.equal(an.cache[k], full[k]), k
        for layer in range(m.cfg.n_layers):
            for head in range(m.cfg.n_heads):
                got = an.attention_from_query_0(layer, head)
                assert got.shape == (len(data), data.toks.shape[1])
                assert torch.equal(got, A.attention_from(full, layer, head, query=0))


def test_a_brackets_analysis_runs_length_buckets_only_where_no_hook_can_see_the_batch(monkeypatch):
    """`Analysis` (tasks/brackets/subjects.py) runs a model without hooks in length buckets of
    BUCKET_ROWS rows (each row's values its own, up to float rounding of GEMMs over other widths), and
    a hooked one in one batch: a batch-mean ablation's mean must be over every evaluation string. A
    bucketed run that let a batch mean in would differ from the one-batch run far beyond rounding."""
    from circuits.analysis import measures as A
    from circuits.tasks.brackets import data as B
    from circuits.tasks.brackets import subjects as S

    monkeypatch.setattr(S, "BUCKET_ROWS", 64)
    model = perturbed_model("brackets")
    strs = _random_bracket_strings(13)
    data = B.BracketData.from_strings(strs)
    lengths = data.lengths + 2
    mutant = I.batch_mean_ablate_head(model, 1, 0)
    assert not A.has_hooks(model) and A.has_hooks(mutant)
    for m, rows in ((model, 64), (mutant, len(data))):
        an = S.Analysis(m, data)
        assert an.batch_size == rows
        one_batch = A.predict(m, data.toks, lengths=lengths, batch_size=len(data))
        torch.testing.assert_close(an.logits, one_batch, atol=1e-5, rtol=1e-5)
        full = A.run_in_batches(m, data.toks, names=A.decomposition_names(m), keep=A.at_position(0),
                                lengths=lengths, batch_size=len(data))
        for k in A.decomposition_names(m):
            torch.testing.assert_close(an.cache[k], full[k], atol=1e-5, rtol=1e-5)
    # the mutant in buckets of 64 would take its mean over each bucket: not the same function
    bucketed = A.predict(mutant, data.toks, lengths=lengths, batch_size=64)
    assert (bucketed - S.Analysis(mutant, data).logits).abs().max() > 1e-3


def test_a_mean_ablated_brackets_run_resumes_from_the_models_own_residual():
    """`subjects.mean_ablated_logits` (the sibling-ablation claims) resumes the mean-ablated mutant at
    the ablated head's block (or an earlier hook's) from the model's residual on the same batch: what
    `predict` of the mutant gives, for heads in every block, on a model with and without a permanent
    hook of its own (a mean ablation in block 1: the resume point moves back to it). Bitwise where the
    model has a hook (its residual is captured in the one batch); to float rounding where it has
    none (captured in length buckets, `interventions.capture_by_length`)."""
    from circuits.analysis import measures as A
    from circuits.tasks.brackets import data as B
    from circuits.tasks.brackets.subjects import mean_ablated_logits

    model = perturbed_model("brackets")
    strs = _random_bracket_strings(12)
    data = B.BracketData.from_strings(strs)
    moved = 0
    for m in (model, I.zero_ablate_head(model, 2, 1), I.batch_mean_ablate_head(model, 1, 1)):
        clean = A.predict(m, data.toks, lengths=data.lengths + 2, batch_size=len(data))
        for head in [(2, 0), (2, 1), (1, 0), (0, 1)]:
            got = mean_ablated_logits(m, data, head)
            expected = A.predict(I.batch_mean_ablate_head(m, *head), data.toks, lengths=data.lengths + 2,
                                 batch_size=len(data))
            if A.has_hooks(m):
                assert torch.equal(got, expected), (head, float((got - expected).abs().max()))
            else:
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            moved += not torch.allclose(got, clean, atol=1e-5)
    assert moved >= 10  # the ablations move the output (not of a head already zeroed or ablated)


def test_bootstrap_resamples_a_few_rows_at_a_time_give_the_whole_batchs_values(monkeypatch):
    """The percentile interval and ratio_of_means_interval evaluate a batch of resamples a few rows
    at a time (stats.RESAMPLE_ROW_ELEMENTS): the same values as the whole batch at once (one row at
    a time, and every row together), and ratio_of_means_interval is its formula on a fresh
    generator's draws (batch by batch, as before the indices were kept)."""
    import math

    import numpy as np

    from circuits.claims import stats as S

    def reference(u, v, level, n_resamples, seed):
        n = len(u)
        mu, mv = float(u.mean()), float(v.mean())
        se = float(np.std(u / mu - v / mv, ddof=1)) / math.sqrt(n)
        log_r = math.log(mu / mv)
        rng = np.random.default_rng(seed)
        batch = max(1, min(n_resamples, int(4_000_000 // max(2 * n, 1))))
        parts = []
        for start in range(0, n_resamples, batch):
            idx = rng.integers(0, n, (min(batch, n_resamples - start), n))
            us, vs = u[idx], v[idx]
            mus, mvs = us.mean(axis=1), vs.mean(axis=1)
            ses = np.std(us / mus[:, None] - vs / mvs[:, None], axis=1, ddof=1) / math.sqrt(n)
            parts.append((np.log(mus / mvs) - log_r) / ses)
        t_lo, t_hi = S._order_statistic_quantiles(np.concatenate(parts), (1 - level) / 2)
        return math.exp(log_r - t_hi * se), math.exp(log_r - t_lo * se)

    runs = []
    for rows in (1, 10**9, S.RESAMPLE_ROW_ELEMENTS):
        monkeypatch.setattr(S, "RESAMPLE_ROW_ELEMENTS", rows)
        monkeypatch.setattr(S, "_RESAMPLE_CACHE", {})
        got = []
        for n in (40, 3000, 9000):
            g = np.random.default_rng(n)
            u = g.exponential(size=n)
            v = u + g.exponential(size=n)
            rom = S.ratio_of_means_interval(u, v, 0.95, 300 if rows == 1 else 1000, 4)
            assert rom == reference(u, v, 0.95, 300 if rows == 1 else 1000, 4)
            got.append(rom)
            lo, hi, dist = S._percentile_interval([u, v], lambda a, b, axis=-1: np.mean(a, axis) / np.mean(b, axis),
                                                  True, 0.95, 300, 4, 128)
            got.append((lo, hi, dist.tolist()))
            lo, hi, dist = S._percentile_interval([u, v[: n // 2]], S.mean_difference, False, 0.95, 300, 4, 100)
            got.append((lo, hi, dist.tolist()))
        runs.append(got)
    assert runs[0][1::3] == runs[1][1::3] == runs[2][1::3]
    assert runs[0][2::3] == runs[1][2::3] == runs[2][2::3]
    assert runs[1] == runs[2]


@pytest.mark.parametrize("kind", ["continuous", "integer ties", "rounded ties"])
def test_rank_bootstraps_rank_by_tie_counts_as_rankdata_on_each_resample(kind, monkeypatch):
    """A paired Spearman bootstrap and an unpaired AUROC bootstrap rank each resample from the originals'
    tie groups (one bincount per resample, no sort); the ranks are those of scipy's rankdata on the
    resampled values, bit for bit, and so are the interval and the whole bootstrap distribution (a
    statistic that is not `spearman` / `_auroc_ranks` itself takes the generic path). Samples holding NaN
    keep the generic path."""
    import numpy as np
    from scipy.stats import rankdata

    from circuits.claims import stats as S

    rng = np.random.default_rng(3)
    x = {"continuous": rng.normal(size=2000), "integer ties": rng.integers(1, 6, 2000).astype(float),
         "rounded ties": np.round(rng.normal(size=2000), 1)}[kind]
    y = rng.normal(size=2000) + 0.5 * x
    rows = rng.integers(0, 2000, (30, 2000))
    assert np.array_equal(S._resampled_ranks(S._tie_groups(x), rows)[0], rankdata(x[rows], axis=-1))
    both = np.concatenate([x, y])  # two parts ranked together, as rankdata of their concatenation
    other = rng.integers(0, 2000, (30, 2000))
    expected = rankdata(np.concatenate([x[rows], y[other]], axis=1), axis=-1)
    got = S._resampled_ranks(S._tie_groups(both), rows, other + 2000)
    assert np.array_equal(np.concatenate(got, axis=1), expected)

    def generic(a, b, axis=-1):
        return S.spearman(a, b, axis=axis)

    calls = []
    ranks = S._resampled_ranks
    monkeypatch.setattr(S, "_resampled_ranks", lambda g, *r: calls.append(1) or ranks(g, *r))
    fast = S._percentile_interval((x, y), S.spearman, True, 0.95, 300, 11, 64)
    assert calls, "the Spearman short cut was not taken"
    n_fast = len(calls)
    slow = S._percentile_interval((x, y), generic, True, 0.95, 300, 11, 64)
    assert len(calls) == n_fast and fast[:2] == slow[:2] and np.array_equal(fast[2], slow[2])
    x_nan = x.copy()
    x_nan[5] = np.nan
    with np.errstate(all="ignore"):
        assert np.array_equal(S._percentile_interval((x_nan, y), S.spearman, True, 0.95, 50, 11, 64)[2],
                              S._percentile_interval((x_nan, y), generic, True, 0.95, 50, 11, 64)[2], equal_nan=True)

    # the unpaired AUROC (positives' ranks among both resamples): the same distribution as rankdata's
    def generic_auroc(a, b, axis=-1):
        return S._auroc_ranks(a, b, axis=axis)

    pos, neg = x[:1200] + 0.3, x[1200:]
    calls.clear()
    fast = S._percentile_interval((pos, neg), S._auroc_ranks, False, 0.95, 300, 5, 64)
    assert calls, "the AUROC short cut was not taken"
    slow = S._percentile_interval((pos, neg), generic_auroc, False, 0.95, 300, 5, 64)
    assert fast[:2] == slow[:2] and np.array_equal(fast[2], slow[2])


def test_capture_by_length_gives_each_rows_activations_at_its_real_positions():
    """`interventions.capture_by_length` (the bracket resampling's and sibling ablations' clean
    captures) runs right-padded rows in length buckets: at every real position the one-batch capture's
    values to float rounding, zeros past a bucket's width, the full width kept. A batch that is not
    right-padded runs as one batch: bitwise."""
    from circuits.tasks.brackets import data as B

    model = perturbed_model("brackets")
    strs = _random_bracket_strings(14)
    x = B.BracketData.from_strings(strs).toks
    names = ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_k", "blocks.2.attn.hook_v"]
    got = I.capture_by_length(model, x, names, rows=64)
    want = I.capture_activations(model, x, names)
    real = ~model.key_padding_mask(x)  # [batch, pos]
    assert (~real).any() and not real.all(0).all()  # padded, to several widths
    for name in names:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name][real], want[name][real], atol=1e-5, rtol=1e-5)
    lengths = real.sum(1)
    width = int(lengths.sort().values[63])  # the shortest bucket's width
    first = lengths < width  # rows surely in that bucket (ties at its edge may go either way)
    assert first.any() and width < x.shape[1]
    for name in names:
        assert not got[name][first, width:].any(), name  # zeros past the bucket's width
    with pytest.raises(InputError, match="blocks.0.attn.hook_pattern"):  # not [batch, pos, ...]
        I.capture_by_length(model, x, ["blocks.0.attn.hook_pattern"], rows=64)
    left = x.flip(1)  # padding first: not right-padded
    one = I.capture_by_length(model, left, names, rows=64)
    for name, value in I.capture_activations(model, left, names).items():
        assert torch.equal(one[name], value), name
