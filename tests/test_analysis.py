"""Analysis functions and interventions, each against a slow obvious version."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from circuits.analysis import measures as A
from circuits.analysis import interventions as I
from circuits.errors import InputError
from circuits.claims.stats import bootstrap_ci
from circuits.model.transformer import HookedTransformer, TransformerConfig
from circuits.tasks.brackets import data as B

CFG = TransformerConfig(n_layers=2, d_model=24, n_ctx=B.N_CTX, n_heads=3, d_mlp=32, d_vocab=B.VOCAB,
                        d_vocab_out=2, pad_token=B.PAD, positional="sinusoidal", readout="first", seed=0)


@pytest.fixture(scope="module")
def model():
    m = HookedTransformer(CFG).eval()
    with torch.no_grad():  # move biases and LN weights off their init so they matter
        g = torch.Generator().manual_seed(1)
        for name, p in m.named_parameters():
            if p.requires_grad and (name.endswith(".b") or name.endswith(".w") or ".b_" in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def data():
    return B.generate(300, 7)


def test_predict_with_length_buckets_equals_full_width(model, data):
    full = A.predict(model, data.toks, batch_size=64)
    bucketed = A.predict(model, data.toks, batch_size=64, lengths=data.lengths + 2)
    torch.testing.assert_close(bucketed, full, atol=1e-5, rtol=1e-5)


def test_run_in_batches_equals_one_run(model, data):
    names = A.decomposition_names(model)
    chunked = A.run_in_batches(model, data.toks, names=names, batch_size=70)
    _, whole = model.run_with_cache(data.toks, names=names)
    for n in names:
        torch.testing.assert_close(chunked[n], whole[n], atol=1e-5, rtol=1e-5)


def test_run_in_batches_with_length_buckets_equals_full_width_at_the_kept_position(model, data):
    names = A.decomposition_names(model) + [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    full = A.run_in_batches(model, data.toks, names=names, batch_size=64, keep=A.at_position(0))
    bucketed = A.run_in_batches(model, data.toks, names=names, batch_size=64, keep=A.at_position(0),
                                lengths=data.lengths + 2)
    assert int((data.lengths + 2).min()) < data.toks.shape[1]  # some chunks really are narrower
    for n in names:
        assert bucketed[n].shape == full[n].shape, n
        torch.testing.assert_close(bucketed[n], full[n], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="needs keep"):
        A.run_in_batches(model, data.toks, names=names, lengths=data.lengths + 2)
    with pytest.raises(InputError, match="width-dependent"):
        A.run_in_batches(model, data.toks, names=["blocks.0.hook_resid_pre"], batch_size=64,
                         keep=lambda n, a: a, lengths=data.lengths + 2)
    with pytest.raises(InputError, match="hook_attn_scores"):
        A.run_in_batches(model, data.toks, names=["blocks.0.attn.hook_attn_scores"], keep=A.at_position(0),
                         lengths=data.lengths + 2)


def test_linear_fit_recovers_an_affine_map_and_pull_back_is_its_transpose():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    W, b = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    fit, r2 = A.linear_fit(x, x @ W + b)
    assert r2 == pytest.approx(1.0, abs=1e-9)
    d = torch.randn(4, generator=g)
    torch.testing.assert_close(A.pull_back(fit, d), (W.double() @ d.double()), atol=1e-6, rtol=1e-6)
    _, r2_noise = A.linear_fit(x, torch.randn(500, 4, generator=g))
    assert r2_noise < 0.1
    with pytest.raises(InputError, match="matching row counts"):
        A.linear_fit(x, x[:10])


def test_ln_final_io_matches_the_model(model, data):
    _, cache = model.run_with_cache(data.toks, names=A.decomposition_names(model))
    x, y = A.ln_final_io(cache, pos=0)
    ln = model.ln_final
    expected = torch.nn.functional.layer_norm(x, (CFG.d_model,), ln.w, ln.b, ln.eps)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # and the logits are the unembedding of that output
    torch.testing.assert_close(y @ model.unembed.W_U + model.unembed.b_U, model(data.toks).detach(),
                               atol=1e-5, rtol=1e-5)


def test_component_contributions_sum_to_the_projected_residual(model, data):
    _, cache = model.run_with_cache(data.toks, names=A.decomposition_names(model))
    direction = A.logit_direction(model, 0, 1)
    values, labels = A.component_contributions(cache, direction, pos=0)
    assert labels[0] == "embed" and labels[-1] == "biases" and len(labels) == 2 + 2 * (3 + 1) + 1
    resid = cache.residual(None, pos=0)[:, 0]
    torch.testing.assert_close(values.sum(0), (resid.double() @ direction.double()), atol=1e-5, rtol=1e-5)


def test_heads_by_mean_difference_orders_by_difference():
    values = torch.tensor([[1.0, 1.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
    mask = torch.tensor([True, True, False, False])
    ranked = A.heads_by_mean_difference(values, ["a", "b", "c"], mask)
    assert [r[0] for r in ranked] == ["b", "a", "c"] and ranked[0][1] == pytest.approx(5.0)
    with pytest.raises(InputError):
        A.heads_by_mean_difference(values, ["a", "b", "c"], torch.ones(4, dtype=torch.bool))


def test_loss_recovered():
    assert A.loss_recovered(1.0, clean=1.0, baseline=3.0) == 1.0
    assert A.loss_recovered(3.0, clean=1.0, baseline=3.0) == 0.0
    assert A.loss_recovered(5.0, clean=1.0, baseline=3.0) == -1.0
    assert np.isnan(A.loss_recovered(2.0, clean=1.0, baseline=1.0))
    # per-example losses with axis: the means first, vectorised over the bootstrap's leading axis
    patched, clean, baseline = np.array([[1.0, 3.0], [2.0, 2.0]]), np.array([[0.0, 2.0]] * 2), np.full((2, 2), 3.0)
    np.testing.assert_allclose(A.loss_recovered(patched, clean, baseline, axis=-1), [0.5, 0.5])
    assert A.loss_recovered(np.array([1.0, 2.0]), 0.0, np.array([3.0, 3.0]), axis=-1) == 0.5  # a number is a mean
    est = bootstrap_ci((patched[0], clean[0], baseline[0]), A.loss_recovered, paired=True, name="kept")
    assert est.point == 0.5 and est.statistic == "kept"


# --- interventions ---------------------------------------------------------------------------------------


def _hook_zero_head(model, x, layer, head):
    def zero(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z
    return model.run_with_hooks(x, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])


def test_zero_ablate_head_equals_zeroing_its_z_and_leaves_the_input_alone(model, data):
    before = model(data.toks).detach()
    ablated = I.zero_ablate_head(model, 1, 2)
    torch.testing.assert_close(ablated(data.toks), _hook_zero_head(model, data.toks, 1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(data.toks), before, atol=0, rtol=0)
    with pytest.raises(InputError, match="no head L5H0"):
        I.zero_ablate_head(model, 5, 0)


def test_mean_ablate_head_replaces_z_by_its_mean(model, data):
    ablated = I.mean_ablate_head(model, 0, 1, data.toks)
    _, cache = ablated.run_with_cache(data.toks[:5], names=["blocks.0.attn.hook_z"])
    z = cache["blocks.0.attn.hook_z"][:, :, 1]
    assert torch.allclose(z[0], z[1]) and torch.allclose(z[0], z[4])  # the same mean for every row
    assert not model.hook_dict["blocks.0.attn.hook_z"].fns, "the original model keeps no hook"


def test_permute_heads_keeps_the_function_but_moves_the_heads(model, data):
    permuted = I.permute_heads(model, 1, perm=[2, 0, 1])
    torch.testing.assert_close(permuted(data.toks), model(data.toks), atol=1e-5, rtol=1e-5)
    _, c0 = model.run_with_cache(data.toks, names=["blocks.1.attn.hook_z"])
    _, c1 = permuted.run_with_cache(data.toks, names=["blocks.1.attn.hook_z"])
    torch.testing.assert_close(c1["blocks.1.attn.hook_z"][:, :, 0], c0["blocks.1.attn.hook_z"][:, :, 2])
    default = I.permute_heads(model, 1, seed=3)  # a derangement: no head stays put
    _, c2 = default.run_with_cache(data.toks, names=["blocks.1.attn.hook_z"])
    for h in range(3):
        assert not torch.allclose(c2["blocks.1.attn.hook_z"][:, :, h], c0["blocks.1.attn.hook_z"][:, :, h])
    with pytest.raises(InputError, match="not a permutation"):
        I.permute_heads(model, 1, perm=[0, 0, 1])


def test_reinitialize_gives_a_different_untrained_model(model, data):
    fresh = I.reinitialize(model, seed=5)
    assert not torch.allclose(fresh.blocks[0].attn.W_Q, model.blocks[0].attn.W_Q)
    assert torch.equal(fresh.pos_embed.W_pos, model.pos_embed.W_pos)  # fixed sinusoids are not trained
    torch.testing.assert_close(fresh(data.toks), I.reinitialize(model, seed=5)(data.toks))


def test_shuffle_labels_permutes_only_the_label_field(data):
    shuffled = I.shuffle_labels(data, seed=0)
    assert torch.equal(shuffled.toks, data.toks)
    assert not torch.equal(shuffled.isbal, data.isbal)
    assert sorted(shuffled.isbal.tolist()) == sorted(data.isbal.tolist())
    with pytest.raises(InputError, match="label fields"):
        I.shuffle_labels(dataclasses.make_dataclass("X", ["a"])(a=1))


def test_patch_activations_from_itself_is_the_clean_run_and_from_others_matches_a_manual_patch(model, data):
    x = data.toks[:50]
    patches = [("blocks.1.attn.hook_v", (1, 0)), ("blocks.1.attn.hook_k", (1, 0))]
    torch.testing.assert_close(I.patch_activations(model, x, x, patches), model(x), atol=1e-5, rtol=1e-5)
    src = data.toks[50:100]
    width = min(x.shape[1], src.shape[1])
    _, sc = model.run_with_cache(src, names=["blocks.1.attn.hook_v", "blocks.1.attn.hook_k"])

    def manual(name):
        def fn(act, hook):
            act = act.clone()
            act[:, 1, 0] = sc[name][:, 1, 0]
            return act
        return fn

    expected = model.run_with_hooks(x, fwd_hooks=[(n, manual(n)) for n, _ in patches])
    torch.testing.assert_close(I.patch_activations(model, x, src, patches), expected, atol=1e-6, rtol=1e-6)
    assert width > 1
    with pytest.raises(InputError, match="source batch"):
        I.patch_activations(model, x, src[:3], patches)


@pytest.mark.parametrize("patches", [
    [("blocks.1.attn.hook_v", (1, 0)), ("blocks.1.attn.hook_k", (1, 0))],  # resumes at block 1
    [("blocks.0.hook_resid_post", (2,)), ("blocks.1.attn.hook_z", (0, 1))],  # resumes at block 0: full run
    [("hook_embed", (3,))],  # outside the blocks: full run
])
def test_resample_activations_equals_patching_from_the_resampled_rows(model, data, patches):
    x = data.toks[:60]
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(60, (60,), generator=g), torch.arange(60), torch.randperm(60, generator=g)]
    outputs = I.resample_activations(model, x, patches, rows)
    for r, out in zip(rows, outputs):
        torch.testing.assert_close(out, I.patch_activations(model, x, x[r], patches), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outputs[1], model(x), atol=1e-5, rtol=1e-5)  # every row from itself
    for batch_size in (16, 60):  # several length buckets; one bucket (rows still reordered by length)
        bucketed = I.resample_activations(model, x, patches, rows, lengths=data.lengths[:60] + 2,
                                          batch_size=batch_size)
        for a, b in zip(bucketed, outputs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_resample_activations_rejects_bad_rows_and_names(model, data):
    x = data.toks[:10]
    patches = [("blocks.1.attn.hook_v", (1, 0))]
    with pytest.raises(InputError, match="index tensor"):
        I.resample_activations(model, x, patches, [torch.arange(5)])
    with pytest.raises(InputError, match="index the batch"):
        I.resample_activations(model, x, patches, [torch.arange(10) + 1])
    with pytest.raises(Exception, match="hook_vv"):
        I.resample_activations(model, x, [("blocks.1.attn.hook_vv", (1, 0))], [torch.arange(10)])
    with pytest.raises(InputError, match="does not exist"):  # position 30 is past these rows' chunks
        I.resample_activations(model, x, [("blocks.1.attn.hook_v", (30, 0))], [torch.arange(10)],
                               lengths=torch.full((10,), 4))
    with pytest.raises(InputError, match="lengths must be"):
        I.resample_activations(model, x, patches, [torch.arange(10)], lengths=torch.full((3,), 4))


@pytest.mark.parametrize("patches", [
    [("blocks.1.attn.hook_v", (1, 0)), ("blocks.1.attn.hook_k", (1, 0))],  # resumes at block 1
    [("hook_embed", (3,))],  # outside the blocks: full run
])
def test_resample_together_equals_patching_from_the_resampled_rows(model, data, patches):
    x = data.toks[:60]
    g = torch.Generator().manual_seed(5)
    groups = [[torch.arange(60), torch.randint(60, (60,), generator=g)], [torch.randperm(60, generator=g)]]
    outputs = I.resample_together(model, x, patches, groups)
    assert [len(o) for o in outputs] == [2, 1]
    for group, outs in zip(groups, outputs):
        for r, out in zip(group, outs):
            torch.testing.assert_close(out, I.patch_activations(model, x, x[r], patches), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outputs[0][0], model(x), atol=1e-6, rtol=1e-6)  # every row from itself
    with pytest.raises(InputError, match="at least one set"):
        I.resample_together(model, x, patches, [[]])
    with pytest.raises(InputError, match="index the batch"):
        I.resample_together(model, x, patches, [[torch.arange(60) + 1]])


def _full_forward_of_the_group(model, x, patches, group):
    """The group's sets in one forward of the whole model on the repeated inputs (no resume)."""
    _, cache = model.run_with_cache(x, names=[n for n, _ in patches])
    source = torch.cat(group)
    hooks = [(n, I._overwrite(index, cache[n][(slice(None), *index)][source])) for n, index in patches]
    with torch.no_grad():
        return list(model.run_with_hooks(x.repeat(len(group), 1), fwd_hooks=hooks).split(len(x)))


def test_resample_together_on_a_batch_dependent_mutant_runs_each_group_as_one_full_batch(model, data):
    """A mean ablation's batch mean (and the padding rows its tracker notes at hook_embed) depend on
    the batch: a resumed run skips no permanent hook (one in an earlier block moves the resume point
    back to it; the embedding's tracker is refired on the repeated batch), and each group's sets share
    one batch. Its results are the mutant's own (not the clean model's), also when memoised."""

    x = data.toks[:60]
    patches = [("blocks.1.attn.hook_v", (1, 0)), ("blocks.1.attn.hook_k", (1, 0))]
    g = torch.Generator().manual_seed(6)
    groups = [[torch.arange(60), torch.randint(60, (60,), generator=g)]]
    mutant = I.batch_mean_ablate_head(model, 1, 0)
    names = [n for n, _ in patches]
    assert I._resume_layer(mutant, names) == 1  # its hooks: hook_embed (refired) and block 1's z
    assert I._resume_layer(I.batch_mean_ablate_head(model, 0, 0), names) == 0  # a hook before the patch
    assert I._resume_layer(model, names) == 1
    for m in (mutant, I.batch_mean_ablate_head(model, 0, 0)):
        got = I.resample_together(m, x, patches, groups)[0]
        for a, b in zip(got, _full_forward_of_the_group(m, x, patches, groups[0])):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # the same function (resumed: float rounding)
    memo = A.ModelMemo()
    key = ("resampled", 1, 0)
    clean = memo.get(model, key, lambda: I.resample_together(model, x, patches, groups))
    for mutated in (mutant, I.batch_mean_ablate_head(model, 1, 0), I.zero_ablate_head(model, 1, 0)):
        served = memo.get(mutated, key, lambda: I.resample_together(mutated, x, patches, groups))
        torch.testing.assert_close(served[0][1], I.resample_together(mutated, x, patches, groups)[0][1])
        assert not torch.allclose(served[0][1], clean[0][1]), "a mutant was served the clean model's result"


def test_start_at_layer_from_the_cached_residual_is_the_forward(model, data):
    x = data.toks[:40]
    names = [f"blocks.{l}.hook_resid_pre" for l in range(1, model.cfg.n_layers)]
    out, cache = model.run_with_cache(x, names=names)
    for l in range(1, model.cfg.n_layers):
        torch.testing.assert_close(model(x, start_at_layer=l, resid=cache[f"blocks.{l}.hook_resid_pre"]), out,
                                   atol=1e-6, rtol=1e-6)
    with pytest.raises(InputError, match="start_at_layer must be"):
        model(x, start_at_layer=model.cfg.n_layers, resid=cache[names[0]])
    with pytest.raises(InputError, match="needs resid"):
        model(x, start_at_layer=1, resid=cache[names[0]][:, :3])
    with pytest.raises(InputError, match="needs resid"):
        model(x, start_at_layer=1)


def test_zero_ablate_mlp_removes_its_output(model, data):
    ablated = I.zero_ablate_mlp(model, 0)
    _, cache = ablated.run_with_cache(data.toks, names=["blocks.0.hook_mlp_out"])
    assert torch.count_nonzero(cache["blocks.0.hook_mlp_out"]) == 0
    assert torch.count_nonzero(model.blocks[0].mlp.W_out) > 0
    with pytest.raises(InputError, match="no MLP in layer 4"):
        I.zero_ablate_mlp(model, 4)


def test_run_in_batches_keeping_one_position_equals_slicing_the_full_cache(model, data):
    names = A.decomposition_names(model) + ["blocks.1.attn.hook_pattern"]
    full = A.run_in_batches(model, data.toks, names=names, batch_size=70)
    cut = A.run_in_batches(model, data.toks, names=names, batch_size=70, keep=A.at_position(0))
    torch.testing.assert_close(cut["blocks.1.attn.hook_pattern"], full["blocks.1.attn.hook_pattern"][:, :, :1])
    stack_full, labels = full.head_decomposition(None, pos=0)
    stack_cut, labels_cut = cut.head_decomposition(None, pos=0)
    assert labels == labels_cut
    torch.testing.assert_close(stack_cut, stack_full)


# --- devices --------------------------------------------------------------------------------------
# No GPU here, so two checks stand in for one. (1) The helpers run with the *default* device set to
# `meta` while the model and data stay on the CPU: any tensor a helper creates without naming a device
# lands on meta and either fails against the CPU tensors or comes back on the wrong device. Every
# returned tensor must be on the model's device. (2) A model/data device mismatch is an InputError
# naming both devices (the model on meta, the data on the CPU).
def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict) or hasattr(x, "items"):
        for v in x.values():
            yield from _tensors(v)
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


def test_helpers_put_every_output_on_the_models_device(model, data):
    device = next(model.parameters()).device
    toks, lengths = data.toks[:40], data.lengths[:40]
    direction = A.logit_direction(model, 0, 1)
    rows = torch.arange(40).roll(1)
    patches = [("blocks.1.attn.hook_z", (0, 1)), ("blocks.0.hook_mlp_out", (0,))]
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names=A.decomposition_names(model))
        fit, _ = A.linear_fit(*A.ln_final_io(cache, pos=0))
    outputs = {}
    with torch.no_grad(), torch.device("meta"):
        outputs["forward"] = model(toks)
        outputs["run_with_cache"] = model.run_with_cache(toks)
        _, cache = outputs["run_with_cache"]
        outputs["predict"] = A.predict(model, toks, batch_size=16)
        outputs["predict lengths"] = A.predict(model, toks, batch_size=16, lengths=lengths)
        outputs["run_in_batches"] = A.run_in_batches(model, toks, names=["blocks.0.hook_resid_post"], batch_size=16)
        outputs["run_in_batches lengths"] = A.run_in_batches(
            model, toks, names=["blocks.0.attn.hook_pattern"], batch_size=16, keep=A.at_position(0), lengths=lengths)
        outputs["ln_final_io"] = A.ln_final_io(cache, pos=0)
        outputs["pull_back"] = A.pull_back(fit, direction)
        outputs["component_contributions"] = A.component_contributions(cache, direction, pos=0)[0]
        outputs["head_decomposition"] = cache.head_decomposition(None, pos=0)[0]
        outputs["decompose_resid"] = cache.decompose_resid(1, pos_slice=[0, 2])
        outputs["stack_head_results"] = cache.stack_head_results(incl_remainder=True, pos_slice=[0, 1])
        outputs["attention_from"] = A.attention_from(cache, 0, 1)
        outputs["patch_activations"] = I.patch_activations(model, toks, toks[rows], patches)
        outputs["resample_activations"] = I.resample_activations(model, toks, patches, [rows])
        outputs["resample_activations lengths"] = I.resample_activations(model, toks, patches, [rows],
                                                                         lengths=lengths, batch_size=16)
        outputs["mean_ablate_head"] = I.mean_ablate_head(model, 1, 0, toks)(toks)
        outputs["permute_heads"] = I.permute_heads(model, 0)(toks)
        outputs["shuffle_labels"] = I.shuffle_labels(data)
    for what, out in outputs.items():
        found = list(_tensors(out))
        assert found, what
        for t in found:
            assert t.device == device, f"{what} returned a tensor on {t.device}, the model is on {device}"


def test_model_and_data_on_different_devices_is_a_clear_error(data):
    meta = HookedTransformer(CFG).to("meta")
    with pytest.raises(InputError, match=r"model input is on device cpu but the model is on meta"):
        meta(data.toks[:4])
    cpu = HookedTransformer(CFG)
    with pytest.raises(InputError, match=r"model input is on device meta but the model is on cpu"):
        cpu(data.toks[:4].to("meta"))
    with pytest.raises(InputError, match=r"key_padding_mask must be bool \(4, \d+\) on cpu, got torch.bool .* on meta"):
        cpu(data.toks[:4], key_padding_mask=torch.zeros(data.toks[:4].shape, dtype=torch.bool, device="meta"))
    with pytest.raises(InputError, match=r"model input is on device cpu but the model is on meta"):
        I.patch_activations(meta, data.toks[:4], data.toks[:4], [("blocks.0.hook_resid_post", (0,))])
    # the device the check uses follows .to()
    assert meta.param_device == torch.device("meta") and cpu.param_device == torch.device("cpu")
    assert cpu.to("meta").param_device == torch.device("meta")


def test_pull_back_checks_the_direction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    fit, _ = A.linear_fit(x, x @ torch.randn(6, 4, generator=g))
    with pytest.raises(InputError, match=r"direction must be \[4\]"):
        A.pull_back(fit, torch.ones(5))
    assert A.pull_back(fit, torch.ones(4, device="meta")).device == torch.device("meta")
