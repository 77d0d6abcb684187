"""Targeted mutations and claim power: each mutation breaks exactly what it says (and nothing when it
should change nothing), and the plugin fails a claim that survives the mutation of what it names."""

from __future__ import annotations

import json
import re

import pytest
import torch

from circuits.analysis import interventions as I
from circuits.analysis.interventions import zero_ablate_head
from circuits.claims import mutations as M
from circuits.claims.controls import ControlError, make_control
from circuits.errors import InputError
from model_configs import perturbed_model

TOKS = torch.randint(2, 5, (16, 10), generator=torch.Generator().manual_seed(0))  # no padding
TOKS[:, 0] = 0


def _bracket_model():
    return perturbed_model("brackets", dtype=torch.float64)


def _toks_with_pad(model):
    toks = torch.randint(2, 5, (12, 9), generator=torch.Generator().manual_seed(3))
    toks[:, 0] = 0
    toks[:4, 6:] = model.cfg.pad_token
    return toks


def test_swap_head_leaves_the_function_unchanged_and_moves_the_circuit():
    model = _bracket_model()
    toks = _toks_with_pad(model)
    swapped = I.swap_heads(model, 2, 0)
    torch.testing.assert_close(swapped(toks), model(toks), atol=1e-10, rtol=0)
    a, b = model.blocks[2].attn, swapped.blocks[2].attn
    torch.testing.assert_close(b.W_O[0], a.W_O[1], atol=0, rtol=0)
    torch.testing.assert_close(b.W_Q[1], a.W_Q[0], atol=0, rtol=0)
    assert not torch.equal(model.blocks[2].attn.W_O[0], swapped.blocks[2].attn.W_O[0])  # input untouched below
    torch.testing.assert_close(model.blocks[2].attn.W_O[0], a.W_O[0])


def test_zero_ov_head_contributes_nothing():
    model = _bracket_model()
    toks = _toks_with_pad(model)
    ablated = zero_ablate_head(model, 1, 1)
    _, cache = ablated.run_with_cache(toks, names=["blocks.1.attn.hook_z"])
    z = cache["blocks.1.attn.hook_z"][:, :, 1]  # [batch, pos, d_head]
    contribution = torch.einsum("bpd,dm->bpm", z, ablated.blocks[1].attn.W_O[1])
    assert float(contribution.detach().abs().max()) == 0.0
    assert not torch.allclose(ablated(toks), model(toks))


def test_uniform_attention_attends_uniformly_over_allowed_keys():
    model = _bracket_model()
    toks = _toks_with_pad(model)
    mutated = I.uniform_attention(model, 0, 1)
    _, cache = mutated.run_with_cache(toks, names=["blocks.0.attn.hook_pattern"])
    pattern = cache["blocks.0.attn.hook_pattern"][:, 1]  # [batch, q, k]
    allowed = (toks != model.cfg.pad_token)[:, None, :].expand_as(pattern).to(pattern.dtype)
    expected = allowed / allowed.sum(-1, keepdim=True)
    torch.testing.assert_close(pattern, expected, atol=1e-12, rtol=0)
    # the other head is untouched
    _, ref = model.run_with_cache(toks, names=["blocks.0.attn.hook_pattern"])
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"][:, 0], ref["blocks.0.attn.hook_pattern"][:, 0])


def test_mean_ablate_replaces_the_head_output_by_its_batch_mean_over_real_rows():
    model = _bracket_model()
    toks = _toks_with_pad(model)
    mutated = I.batch_mean_ablate_head(model, 2, 1)
    _, cache = mutated.run_with_cache(toks, names=["blocks.2.attn.hook_z"])
    z = cache["blocks.2.attn.hook_z"][:, :, 1]
    _, clean = model.run_with_cache(toks, names=["blocks.2.attn.hook_z"])
    zc = clean["blocks.2.attn.hook_z"][:, :, 1]
    real = (toks != model.cfg.pad_token).double()[..., None]
    expected = (zc * real).sum(0) / real.sum(0)
    torch.testing.assert_close(z, expected.expand_as(z), atol=1e-12, rtol=0)
    # head 0 of that layer keeps its per-example output
    torch.testing.assert_close(cache["blocks.2.attn.hook_z"][:, :, 0], clean["blocks.2.attn.hook_z"][:, :, 0])


def test_mean_ablate_mlp_is_the_batch_mean():
    model = _bracket_model()
    toks = TOKS
    mutated = I.batch_mean_ablate_mlp(model, 1)
    _, cache = mutated.run_with_cache(toks, names=["blocks.1.hook_mlp_out"])
    _, clean = model.run_with_cache(toks, names=["blocks.1.hook_mlp_out"])
    out = cache["blocks.1.hook_mlp_out"]
    torch.testing.assert_close(out, clean["blocks.1.hook_mlp_out"].mean(0, keepdim=True).expand_as(out),
                               atol=1e-12, rtol=0)


def test_permute_positions_is_a_derangement_of_the_range_only():
    model = perturbed_model("palindrome")
    mutated = I.permute_positions(model, 1, 10, seed=4)
    old, new = model.pos_embed.W_pos, mutated.pos_embed.W_pos
    torch.testing.assert_close(new[0], old[0]) and torch.testing.assert_close(new[11], old[11])
    moved = [int(torch.nonzero((old[1:11] == new[i]).all(-1))[0]) + 1 for i in range(1, 11)]
    assert sorted(moved) == list(range(1, 11)) and all(m != i for m, i in zip(moved, range(1, 11)))


def test_randomise_read_in_changes_only_the_read_in():
    model = perturbed_model("read_in")
    mutated = I.randomise_read_in(model, seed=0)
    assert not torch.equal(mutated.embed.W_in, model.embed.W_in)
    for (name, p), (_, q) in zip(model.named_parameters(), mutated.named_parameters()):
        if not name.startswith("embed."):
            assert torch.equal(p, q), name
    with pytest.raises(ControlError, match="fixed"):
        I.randomise_read_in(perturbed_model("attn_only"))


def test_mutations_are_derived_from_targets_and_bad_targets_are_clear():
    assert M.derive_mutations(["head:count_head"]) == ["zero_ablate:count_head", "mean_ablate:count_head",
                                                        "swap_head:count_head"]
    assert M.derive_mutations(["qk:L0H0", "ov:L0H0"]) == ["uniform_attention:L0H0", "swap_head:L0H0",
                                                          "zero_ablate:L0H0", "mean_ablate:L0H0"]
    assert M.derive_mutations(["positions:1-10", "read_in", "mlp:L2", "model"]) == [
        "permute_positions:1-10", "randomise_read_in", "zero_ablate_mlp:L2", "mean_ablate_mlp:L2", "untrained"]
    assert M.derive_mutations(["attn:L0"]) == ["zero_ablate_attn:L0", "mean_ablate_attn:L0"]
    for bad, words in [("neuron:3", "unknown target kind"), ("head", "needs a part"), ("positions:x", "range"),
                       ("mlp:2", "not a layer"), ("read_in:L0", "takes no argument"), ("attn", "needs a layer"),
                       ("attn:L0H1", "not a layer")]:
        with pytest.raises(ControlError, match=words):
            M.derive_mutations([bad])


def test_the_attention_of_a_layer_is_removed_or_mean_ablated_head_by_head():
    model = _bracket_model()
    zero, mean = I.zero_ablate_attn(model, 1), I.batch_mean_ablate_attn(model, 1)
    assert not zero.blocks[1].attn.W_O.any() and torch.equal(zero.blocks[0].attn.W_O, model.blocks[0].attn.W_O)
    _, cache = mean.run_with_cache(TOKS, names=["blocks.1.attn.hook_z"])
    _, clean = model.run_with_cache(TOKS, names=["blocks.1.attn.hook_z"])
    z = clean["blocks.1.attn.hook_z"]
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"], z.mean(0, keepdim=True).expand_as(z), atol=1e-12, rtol=0)
    with pytest.raises(InputError, match="the model has 3 layers"):  # a bad layer is bad input, as a bad head
        I.zero_ablate_attn(model, 3)


def test_a_model_that_runs_no_hooks_makes_the_mean_ablations_in_its_weights():
    """``weight_mutation(name, *args)``: the model's own mutant for a hook-based mutation, else the hooks."""
    model = _bracket_model()
    calls = []

    def in_weights(name, *args):
        calls.append((name, *args))
        return "mutant" if name != "mean_ablate_mlp" else None

    model.weight_mutation = in_weights
    assert I.batch_mean_ablate_head(model, 1, 0) == "mutant" and I.batch_mean_ablate_attn(model, 1) == "mutant"
    assert I.batch_mean_ablate_mlp(model, 1) is not model  # None: the hooks do it
    assert calls == [("mean_ablate", 1, 0), ("mean_ablate_attn", 1), ("mean_ablate_mlp", 1)]


def test_about_none_takes_a_reason_and_nothing_else():
    mark = pytest.mark.about
    assert M.about_none([mark(none="  a bound every model obeys ").mark]) == "a bound every model obeys"
    assert M.about_none([mark("head:L0H0").mark]) is None
    for bad, words in [([mark().mark], "names nothing"), ([mark(none="").mark], "give the reason"),
                       ([mark("head:L0H0", none="x").mark], "not about none"),
                       ([mark("head:L0H0").mark, mark(none="x").mark], "about parts or about none")]:
        with pytest.raises(ControlError, match=words):
            M.about_none(bad)


def test_mutations_on_a_foreign_model_fail_in_one_line():
    seq = torch.nn.Sequential(torch.nn.Linear(3, 3))
    for spec in ("zero_ablate:L0H0", "mean_ablate:L0H0", "swap_head:L0H0", "uniform_attention:L0H0",
                 "mean_ablate_mlp:L0", "permute_positions", "randomise_read_in"):
        ctl = make_control(spec)
        with pytest.raises(ControlError) as info:
            ctl.apply_model(seq)
        assert "torch.nn.modules.container.Sequential" in str(info.value) and "\n" not in str(info.value), spec


def test_untrained_control_works_on_a_plain_module():
    seq = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fresh = make_control("untrained", seed=3).apply_model(seq)
    assert not torch.equal(fresh[0].weight, seq[0].weight) and fresh is not seq
    with pytest.raises(ControlError, match="reset_parameters"):
        make_control("untrained").apply_model(torch.nn.ReLU())


# --- the plugin: power, known failures, draws ---------------------------------------------------------

POWER_CONFTEST = '''
import pytest
import torch
from circuits.model.transformer import HookedTransformer, TransformerConfig

CFG = TransformerConfig(n_layers=1, d_model=8, n_ctx=4, n_heads=2, d_mlp=8, d_vocab=4, d_vocab_out=2,
                        readout="first", seed=0)


@pytest.fixture(scope="session")
def base():
    return HookedTransformer(CFG).eval()


@pytest.fixture
def model(base, control):
    return control.apply_model(base)


@pytest.fixture(scope="session")
def head_roles():
    return {"reader": (0, 1)}


TOKS = torch.tensor([[0, 1, 2, 3], [0, 2, 2, 1], [0, 3, 1, 1]])
'''


@pytest.fixture
def power_project(pytester):
    pytester.makeconftest(POWER_CONFTEST)
    return pytester


def test_a_claim_that_survives_the_mutation_of_its_head_fails_as_no_power(power_project):
    power_project.makepyfile(test_power='''
        import pytest
        import torch
        from conftest import TOKS

        def head_out(model, layer, head):
            _, cache = model.run_with_cache(TOKS, names=[f"blocks.{layer}.attn.hook_z"])
            z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
            return float(torch.einsum("bpd,dm->bpm", z, model.blocks[layer].attn.W_O[head]).detach().norm())

        REF = {}

        @pytest.mark.about("head:reader")
        def test_names_its_head(model, base, claim):
            ref = head_out(base, 0, 1)   # what the bound head writes on the trained model
            claim.close_to("reader_output_norm", head_out(model, 0, 1), ref, rtol=1e-6)

        @pytest.mark.about("head:reader")
        def test_measures_something_else(model, claim):
            claim.at_least("embedding_norm", float(model.embed.W_E.norm()), 0.0)
    ''')
    result = power_project.runpytest("-v", "--circuits-run-id", "power")
    result.stdout.re_match_lines([re.escape(f"test_power.py::test_names_its_head[mutation={m}:reader] PASSED")
                                  for m in ("zero_ablate", "mean_ablate", "swap_head")])
    result.stdout.fnmatch_lines(["*no power: claim 'embedding_norm'*also holds on mutation 'zero_ablate:reader'*"])
    result.assert_outcomes(passed=5, failed=3)
    import json
    report = json.loads((power_project.path / "reports" / "power" / "report.json").read_text())
    runs = {r["nodeid"].split("::")[1]: r for r in report["control_runs"]}
    assert runs["test_measures_something_else[mutation=swap_head:reader]"]["outcome"] == "no_power"
    assert runs["test_names_its_head[mutation=swap_head:reader]"]["outcome"] == "ok"


def test_known_failures_expect_only_failed_claims_and_carry_the_measurement(power_project):
    power_project.makepyfile(test_known='''
        import pytest

        KNOWN_FAILURES = {"test_refuted": "the hypothesis says >= 0.9", "test_crashes": "refuted"}

        @pytest.mark.controls("untrained")
        def test_refuted(model, claim):
            claim.at_least("acc", 0.5, 0.9)

        def test_crashes(claim):
            {}["missing"]
    ''')
    result = power_project.runpytest("-rxXs", "-v", "--circuits-no-report")
    out = result.stdout.str()
    assert ("known failure: the hypothesis says >= 0.9 | measured now: acc = 0.5, claim needs >= 0.9 (short by 0.4)"
            in out), out
    result.stdout.re_match_lines([re.escape("test_known.py::test_crashes FAILED")])
    # its control run tests a claim that does not hold here: deselected at collection, and said so
    result.assert_outcomes(xfailed=1, failed=1, deselected=1)
    result.stdout.fnmatch_lines(["not run: 1 control / mutation runs of known failures * (run with --circuits-seeds)"])


def test_a_known_failure_that_passes_is_strict_and_a_stale_entry_is_an_error(power_project):
    power_project.makepyfile(test_strict='''
        KNOWN_FAILURES = {"test_holds": "said to fail"}

        def test_holds(claim):
            claim.at_least("acc", 0.95, 0.9)
    ''')
    power_project.runpytest("--circuits-no-report").assert_outcomes(failed=1)
    # --circuits-full-sweep scores models trained by the sweep, as --circuits-seeds does: a known failure may pass there
    power_project.runpytest("--circuits-no-report", "--circuits-full-sweep").assert_outcomes(xpassed=1)
    power_project.makepyfile(test_strict='''
        KNOWN_FAILURES = {"test_gone": "a test that was renamed"}

        def test_holds(claim):
            claim.at_least("acc", 0.95, 0.9)
    ''')
    result = power_project.runpytest("--circuits-no-report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR or "stale" in result.stdout.str() + result.stderr.str()


def test_draws_seed_changes_the_draws_and_only_them(power_project):
    power_project.makepyfile(test_draws='''
        import pytest

        @pytest.mark.controls("untrained")
        def test_draw(draws, claim, model, control):
            with open("draws.txt", "a") as f:
                f.write(f"{control.spec} {draws.seed} {draws.torch().initial_seed()} {control.seed}\\n")
            claim.at_least("x", 1.0 if control.is_main else 0.0, 0.5)
    ''')
    seen, control_seeds = {}, {}
    for s in ("0", "0", "3"):
        log = power_project.path / "draws.txt"
        log.unlink(missing_ok=True)
        power_project.runpytest("--circuits-no-report", "--circuits-draws-seed", s).assert_outcomes(passed=2)
        lines = log.read_text().split("\n")[:-1]
        assert len(lines) == 2 and lines[0].split()[1] == lines[1].split()[1]  # main and control draw alike
        seen.setdefault(s, set()).add(lines[0].split()[1])
        control_seeds.setdefault(s, set()).add(lines[1].split()[3])  # the control run's randomness
    assert len(seen["0"]) == 1 and seen["0"] != seen["3"]
    # the control's randomness (here the fresh initialisation) follows the draws seed too
    assert len(control_seeds["0"]) == 1 and control_seeds["0"] != control_seeds["3"]
    result = power_project.runpytest("--circuits-no-report", "--circuits-draws-seed", "-1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


# --- zoo fixtures for entries registered from a conftest, and --circuits-variant -------------------------------

ZOO_CONFTEST = '''
from dataclasses import replace
from circuits.zoo import registry as zoo
from circuits.model.transformer import TransformerConfig
from circuits.tasks.brackets import data as B
from circuits.zoo.train import TrainRecipe

TINY = TransformerConfig(n_layers=1, d_model=8, n_ctx=B.N_CTX, n_heads=2, d_mlp=8, d_vocab=B.VOCAB,
                         d_vocab_out=2, pad_token=B.PAD, positional="sinusoidal", readout="first")
RECIPE = TrainRecipe(steps=6, batch_size=16, lr=3e-3, warmup_steps=1, n_train=200, n_eval=100, eval_every=3,
                     threads=1)
zoo.register(zoo.ZooEntry(name="mine", description="a user's model", config=TINY, recipe=RECIPE,
                          make_split=B.make_split, data_recipe={"generator": "brackets", "version": "user"},
                          reference_seeds=(), variants={"longer": {"recipe": replace(RECIPE, steps=9)}}))
'''


def test_an_entry_registered_in_a_conftest_gets_its_variants(pytester, monkeypatch):
    """(Its fixture under --circuits-seeds: tests/test_sweep.py, on the same conftest.)"""
    monkeypatch.setenv("CIRCUITS_CACHE", str(pytester.path / "cache"))
    pytester.makeconftest(ZOO_CONFTEST)
    pytester.makepyfile(test_user='''
        def test_steps(mine_model, claim, circuits_options):
            claim.holds("a trained model of the entry", mine_model.cfg.d_model == 8)
            with open("steps.txt", "w") as f:
                f.write(circuits_options.model_name("mine"))
    ''')
    # subprocesses: a conftest is imported once per session, as in real use
    pytester.runpytest_subprocess("--circuits-no-report", "--circuits-variant", "mine@longer").assert_outcomes(passed=1)
    assert (pytester.path / "steps.txt").read_text() == "mine@longer"
    result = pytester.runpytest_subprocess("--circuits-no-report", "--circuits-variant", "mine")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_a_known_control_run_that_measured_nothing_is_an_error_not_a_known_failure(power_project):
    """KNOWN_FAILURES excuses a claim that holds under a control, not a control run that recorded no claim."""
    power_project.makepyfile(test_empty="""
        import pytest

        KNOWN_FAILURES = {"test_quiet control=untrained": "said to hold on an untrained model"}

        @pytest.mark.controls("untrained")
        def test_quiet(model, claim, control):
            if control.is_main:
                claim.at_least("acc", 0.9, 0.5)
    """)
    result = power_project.runpytest("-rfx", "--circuits-run-id", "empty")
    result.assert_outcomes(passed=1, failed=1)
    # one line naming the problem, no traceback from the plugin
    result.stdout.fnmatch_lines(["*test_quiet[[]control=untrained[]]: error: control 'untrained': the control run "
                                 "recorded no claims*"])
    assert "pytest_plugin.py" not in result.stdout.str() and "Traceback" not in result.stdout.str()
    report = json.loads((power_project.path / "reports" / "empty" / "report.json").read_text())
    (run,) = report["control_runs"]
    assert run["outcome"] == "error" and run["known"] is None


def test_memoised_results_follow_the_mutation_not_the_weights():
    """Mean ablations are hooks on unchanged weights: a session memo keyed on the model must still
    tell them apart (and from the clean model), also after an earlier mutant is freed."""
    import gc

    from circuits.analysis.measures import ModelMemo, weights_digest

    model = _bracket_model()
    memo = ModelMemo()
    clean = memo.get(model, "logits", lambda: model(TOKS))
    for head in (0, 1, 0):
        mutant = I.batch_mean_ablate_head(model, 2, head)
        got = memo.get(mutant, "logits", lambda: mutant(TOKS))
        torch.testing.assert_close(got, mutant(TOKS))
        assert not torch.allclose(got, clean)
        del mutant
        gc.collect()
    assert weights_digest(I.batch_mean_ablate_head(model, 2, 0)) == weights_digest(I.batch_mean_ablate_head(model, 2, 0))
    assert weights_digest(I.batch_mean_ablate_head(model, 2, 0)) != weights_digest(I.batch_mean_ablate_head(model, 2, 1))


def test_a_control_run_can_be_a_known_failure_of_its_own(power_project):
    power_project.makepyfile(test_teeth='''
        import pytest

        KNOWN_FAILURES = {"test_weak[x] control=untrained": "an untrained model reaches it too"}

        @pytest.mark.parametrize("p", ["x", "y"])
        @pytest.mark.controls("untrained")
        def test_weak(model, claim, p):
            claim.at_least("acc", 0.9 if p == "x" else (0.9 if model is not None and hasattr(model, "cfg")
                                                           and model.blocks[0].attn.W_O.abs().sum() > 0 else 0.1), 0.5)
    ''')
    result = power_project.runpytest("-v", "-rx", "--circuits-no-report")
    result.stdout.re_match_lines([re.escape("test_teeth.py::test_weak[control=untrained-x] XFAIL")])
    assert "measured now: acc = 0.9" in result.stdout.str()
    result.assert_outcomes(passed=2, xfailed=1, failed=1)  # y: its untrained control holds too (no teeth)
    power_project.runpytest("--circuits-run-id", "known").assert_outcomes(passed=2, xfailed=1, failed=1)
    report = json.loads((power_project.path / "reports" / "known" / "report.json").read_text())
    runs = {r["nodeid"].split("::")[1]: r for r in report["control_runs"]}
    assert runs["test_weak[control=untrained-x]"]["known"] == "an untrained model reaches it too"
    assert runs["test_weak[control=untrained-y]"]["known"] is None  # undocumented: still a problem
    assert (report["summary"]["controls_no_teeth"], report["summary"]["controls_known"]) == (1, 1)


# --- specificity: the claim pointed at each alternative of the part it names ---------------------------


def test_alternatives_are_derived_from_targets_by_kind_and_scope():
    assert M.derive_alternatives(["head:reader"], (2, 2)) == [
        "rebind:reader,L0H0", "rebind:reader,L0H1", "rebind:reader,L1H0", "rebind:reader,L1H1"]
    assert M.derive_alternatives(["qk:reader"], (1, 2), scope="layer") == [
        "rebind:reader,L0H0,layer", "rebind:reader,L0H1,layer"]
    assert M.derive_alternatives(["ov:L1H2"], (2, 4)) == ["swap_with:L1H2,L1H0", "swap_with:L1H2,L1H1",
                                                          "swap_with:L1H2,L1H3"]
    assert M.derive_alternatives(["model", "positions", "path:L0H1", "read_in"], (2, 2)) == []
    assert M.derive_alternatives(["mlp:L1"], (3, 2)) == ["other_mlp:L1,L0", "other_mlp:L1,L2"]
    assert M.derive_alternatives(["mlp:L0"], (1, 4)) == []  # one layer: no other MLP
    assert M.derive_alternatives(["feature:count"], None) == ["independent_feature:count"]  # needs no shape
    assert M.derive_alternatives(["head:reader"], None) == []
    with pytest.raises(ControlError, match="alternatives='heads'"):
        M.derive_alternatives(["head:reader"], (1, 2), scope="heads")
    # False: a claim about the model's behaviour (its parts are its power only); needs "model"
    assert M.derive_alternatives(["model", "mlp:L1", "ov:L0H0"], (2, 2), scope=False) == []
    with pytest.raises(ControlError, match="list 'model' among the targets"):
        M.derive_alternatives(["mlp:L1"], (2, 2), scope=False)
    assert M.derive_mutations(["feature:count"]) == []
    with pytest.raises(ControlError, match="identifier"):
        M.parse_target("feature:a b")
    with pytest.raises(ControlError, match="needs a part"):
        M.parse_target("feature")


def test_an_mlp_alternative_is_read_through_the_control_and_a_feature_is_permuted():
    import numpy as np

    main = make_control("main")
    assert main.mlp(2) == 2 and main.applied == 0
    ctl = make_control("other_mlp:L2,L0")
    assert ctl.kind == "part" and ctl.mlp(2) == 0 and ctl.applied == 1
    assert ctl.mlp(1) == 1 and ctl.applied == 1  # another MLP of a claim about two: unchanged
    values = torch.arange(10.0)
    assert main.feature("count", values) is values
    feat = make_control("independent_feature:count", seed=3)
    permuted = feat.feature("count", values)
    assert feat.applied == 1 and not torch.equal(permuted, values)
    assert torch.equal(permuted.sort().values, values)  # the same values: the same marginal distribution
    torch.testing.assert_close(feat.feature("count", values), permuted, atol=0, rtol=0)  # seeded
    rows = torch.arange(12.0).reshape(4, 3)  # per example: rows move whole
    moved = feat.feature("count", rows)
    assert sorted(map(tuple, moved.tolist())) == sorted(map(tuple, rows.tolist()))
    assert isinstance(feat.feature("count", np.arange(5)), np.ndarray)
    assert feat.feature("other", values) is values  # another feature: left alone
    with pytest.raises(ControlError, match="read through control.mlp"):
        M._part_only(None)


def test_rebind_points_a_role_elsewhere_and_skips_the_bound_head_and_other_layers():
    import dataclasses

    roles = {"count": (2, 0), "negative": (2, 1)}
    assert M.rebind(roles, "count", "L1H1") == {"count": (1, 1), "negative": (2, 1)}
    assert roles["count"] == (2, 0)  # a copy
    with pytest.raises(M.SameBindingError, match="bound to L2H0"):
        M.rebind(roles, "count", "L2H0")
    with pytest.raises(M.SameBindingError, match="outside layer 2"):
        M.rebind(roles, "count", "L1H1", "layer")

    @dataclasses.dataclass(frozen=True)
    class Roles:
        mirror: tuple
        other: int = 3

    assert M.rebind(Roles((0, 0)), "mirror", "L0H1") == Roles((0, 1))
    ctl = make_control("rebind:count,L0H1")
    assert ctl.apply_data(roles)["count"] == (0, 1) and ctl.applied == 1
    assert ctl.apply_data(Roles((0, 0))) == Roles((0, 0))  # binds no role 'count': left alone
    with pytest.raises(pytest.skip.Exception, match="not an alternative"):
        make_control("rebind:count,L2H0").apply_data(roles)


def test_swap_with_moves_the_circuit_to_the_other_index_within_a_layer():
    model = _bracket_model()
    toks = _toks_with_pad(model)
    other = make_control("swap_with:L2H1,L2H0").apply_model(model)
    torch.testing.assert_close(other(toks), model(toks), atol=1e-10, rtol=0)
    torch.testing.assert_close(other.blocks[2].attn.W_O[1], model.blocks[2].attn.W_O[0], atol=0, rtol=0)
    with pytest.raises(ControlError, match="share a layer"):
        make_control("swap_with:L2H1,L1H0").apply_model(model)


def test_a_claim_that_holds_for_another_head_fails_as_unspecific(power_project):
    power_project.makepyfile(test_spec='''
        import pytest
        import torch
        from circuits.claims import mutations as M
        from conftest import TOKS

        M.register_model_shape("model", 1, 2)

        def head_norm(model, head):
            _, cache = model.run_with_cache(TOKS, names=["blocks.0.attn.hook_z"])
            return float(cache["blocks.0.attn.hook_z"][:, :, head].norm())

        @pytest.fixture
        def roles(head_roles, control):
            return control.apply_data(dict(head_roles))

        @pytest.mark.about("ov:reader")
        def test_specific(model, base, roles, claim):
            head = roles["reader"][1]
            claim.close_to("reader's z norm is the bound head's", head_norm(model, head), head_norm(base, 1),
                           rtol=1e-6)

        @pytest.mark.about("ov:reader")
        def test_any_head_will_do(model, roles, claim):
            claim.at_least("z norm", head_norm(model, roles["reader"][1]), 0.0)

        KNOWN_FAILURES = {"test_known_unspecific unspecific": "every head has a z norm >= 0 (measured: both)"}

        @pytest.mark.about("ov:reader")
        def test_known_unspecific(model, roles, claim):
            claim.at_least("z norm", head_norm(model, roles["reader"][1]), 0.0)

        @pytest.mark.about("ov:reader")
        def test_reads_no_binding(model, claim):
            claim.at_least("z norm of head 1", head_norm(model, 1), 0.0)
    ''')
    result = power_project.runpytest("-v", "-rA", "--circuits-run-id", "spec")
    result.stdout.re_match_lines([
        re.escape("test_spec.py::test_specific[alternative=rebind:reader,L0H0] PASSED"),
        re.escape("test_spec.py::test_specific[alternative=rebind:reader,L0H1] SKIPPED"),
        re.escape("test_spec.py::test_any_head_will_do[alternative=rebind:reader,L0H0] FAILED"),
        re.escape("test_spec.py::test_known_unspecific[alternative=rebind:reader,L0H0] XFAIL"),
        re.escape("test_spec.py::test_reads_no_binding[alternative=rebind:reader,L0H0] FAILED")])
    result.stdout.fnmatch_lines(["*unspecific: claim 'z norm' = * also holds on alternative 'rebind:reader,L0H0'*",
                                 "*alternative 'rebind:reader,L0H0' was never applied*",
                                 "circuits: *1 unspecific*"])
    report = json.loads((power_project.path / "reports" / "spec" / "report.json").read_text())
    runs = {r["nodeid"].split("::")[1]: r for r in report["control_runs"]}
    assert runs["test_any_head_will_do[alternative=rebind:reader,L0H0]"]["outcome"] == "unspecific"
    assert runs["test_known_unspecific[alternative=rebind:reader,L0H0]"]["known"].startswith("every head")
    assert runs["test_specific[alternative=rebind:reader,L0H0]"]["outcome"] == "ok"
    assert report["summary"]["controls_unspecific"] == 1
    from circuits.report import views

    rows = {r["claim"]["name"]: r for r in views.specificity(report)}
    assert rows["z norm"]["n"] == 1 and len(rows["z norm"]["held"]) == 1
    assert views.specificity_text(rows["reader's z norm is the bound head's"]).startswith("0 of 1 alternatives")
    md = (power_project.path / "reports" / "spec" / "report.md").read_text()
    html = (power_project.path / "reports" / "spec" / "report.html").read_text()
    assert "alternatives that also hold" in md and "**unspecific**" in md
    assert "Specificity" in html and "0 of 1 alternatives also hold" in html


def test_mlp_and_feature_alternatives_run_and_catch_a_claim_that_holds_anywhere(power_project):
    power_project.makepyfile(test_parts='''
        import pytest
        import torch
        from circuits.claims import mutations as M
        from conftest import TOKS

        M.register_model_shape("model3", 3, 2)

        @pytest.fixture
        def model3():
            from circuits.model.transformer import HookedTransformer, TransformerConfig
            return HookedTransformer(TransformerConfig(n_layers=3, d_model=8, n_ctx=4, n_heads=2, d_mlp=8,
                                                       d_vocab=4, d_vocab_out=2, readout="first", seed=0)).eval()

        def mlp_norm(model, layer):
            _, cache = model.run_with_cache(TOKS, names=[f"blocks.{layer}.hook_mlp_out"])
            return float(cache[f"blocks.{layer}.hook_mlp_out"].norm())

        @pytest.mark.about("mlp:L1")
        def test_mlp_specific(model3, claim, control):
            claim.close_to("MLP1's output norm", mlp_norm(model3, control.mlp(1)), mlp_norm(model3, 1), rtol=1e-6)

        @pytest.mark.about("mlp:L1")
        def test_any_mlp_will_do(model3, claim, control):
            claim.at_least("an MLP output norm", mlp_norm(model3, control.mlp(1)), 0.0)

        @pytest.mark.about("mlp:L1")
        def test_reads_layer_1_directly(model3, claim, control):
            claim.at_least("MLP1 output norm", mlp_norm(model3, 1), 0.0)

        @pytest.mark.about("model", "mlp:L1", alternatives=False)
        def test_about_the_outputs(model3, claim):
            claim.at_least("output norm", float(model3(TOKS).norm()), 0.0)

        @pytest.mark.about("feature:rank")
        def test_tracks_the_feature(claim, control):
            x = torch.arange(50.0)
            r = control.feature("rank", x)
            claim.at_least("correlation with the rank", float(torch.corrcoef(torch.stack([x, r]))[0, 1]), 0.9)
    ''')
    result = power_project.runpytest("-v", "-rA", "-p", "no:cacheprovider", "--circuits-run-id", "parts")
    result.stdout.re_match_lines([
        re.escape("test_parts.py::test_mlp_specific[alternative=other_mlp:L1,L0] PASSED"),
        re.escape("test_parts.py::test_mlp_specific[alternative=other_mlp:L1,L2] PASSED"),
        re.escape("test_parts.py::test_any_mlp_will_do[alternative=other_mlp:L1,L0] FAILED"),
        re.escape("test_parts.py::test_reads_layer_1_directly[alternative=other_mlp:L1,L0] FAILED"),
        re.escape("test_parts.py::test_tracks_the_feature[alternative=independent_feature:rank] PASSED")])
    result.stdout.fnmatch_lines(["*unspecific: claim 'an MLP output norm' = * also holds on alternative 'other_mlp:L1,L0'*",
                                 "*never called control.mlp(layer)*"])
    assert "test_about_the_outputs[alternative" not in result.stdout.str()


@pytest.mark.parametrize("spec, outcome", [
    ("mutate:zero_ablate:L2H0", "ok"),  # the ablated head's output is constant: its statistic is undefined
    ("mutate:mean_ablate_mlp:L2", "ok"),
    ("mutate:swap_head:L2H0", "error"),  # the head still computes something: NaN there is a broken measurement
    ("zero_ablate:L2H0", "error"),  # a hand-written control measuring NaN shows nothing (issue 32)
])
def test_a_nan_is_a_failure_only_where_an_ablation_made_the_statistic_undefined(spec, outcome):
    from types import SimpleNamespace

    from circuits.plugin.session import control_error_kind, judge_control

    nan = SimpleNamespace(name="r", passed=False, problem="value is NaN", value_text="nan", requirement=">= 0.5")
    ctl = SimpleNamespace(spec=spec, applied=True, kind="model")
    assert judge_control([nan], ctl)[0] == outcome
    assert (control_error_kind([nan], ctl) is None) == (outcome == "ok")
    held = SimpleNamespace(name="h", passed=True, problem=None, value_text="0.9", requirement=">= 0.5")
    assert judge_control([nan, held], ctl)[0] != "ok"  # a claim that still holds is never excused


def test_about_none_derives_nothing_shows_its_reason_and_is_not_without_controls(power_project):
    power_project.makepyfile(test_none='''
        import pytest

        @pytest.mark.about(none="a bound every model obeys")
        def test_bound(model, claim):
            claim.at_least("norm", float(model.embed.W_E.norm()), 0.0)

        def test_bare(model, claim):
            claim.at_least("norm", float(model.embed.W_E.norm()), 0.0)
    ''', test_empty='''
        import pytest

        @pytest.mark.about()
        def test_empty(model, claim):
            claim.at_least("norm", 1.0, 0.0)
    ''')
    power_project.runpytest("test_empty.py").stdout.fnmatch_lines(["*test_empty.py::test_empty*names nothing*"])
    result = power_project.runpytest("-v", "--circuits-run-id", "none", "test_none.py")
    import json
    report = json.loads((power_project.path / "reports" / "none" / "report.json").read_text())
    claims = {c["nodeid"].split("::")[1]: c for c in report["claims"]}
    assert set(claims) == {"test_bound", "test_bare"}  # one main run each: nothing derived
    assert claims["test_bound"]["about_none"] == "a bound every model obeys" and not claims["test_bound"]["no_controls"]
    assert claims["test_bare"]["no_controls"] and not claims["test_bare"].get("about_none")
    result.stdout.fnmatch_lines(["*(about no part)*"])
