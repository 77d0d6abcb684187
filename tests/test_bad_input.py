"""Issue 31 (bad input, round 2): every try the fault injection listed, each with a clear one-line
`circuits.errors` error or a documented, tested behaviour. Library-level tries here; the report /
option / store tries are at the end of this module."""

from __future__ import annotations

import pytest
import torch

from circuits.tasks.assoc.model import AssocConfig, all_contexts, build_model
from circuits.errors import HookNameError, HookOutputError, InputError
from circuits.analysis.interventions import patch_activations, resample_activations, resample_together
from model_configs import CONFIGS, perturbed_model


@pytest.fixture(scope="module")
def model():
    return perturbed_model("palindrome")  # [batch, 12] tokens, 2 layers x 2 heads, MLPs


@pytest.fixture(scope="module")
def toks(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 5, (4, model.cfg.n_ctx), generator=g)  # no pad token (5)


# --- patching helpers: the same validation as resample_activations ---------------------------------
BAD_PATCHES = [  # (index, hook, what the message must name)
    ((99,), "blocks.0.hook_resid_pre", "out of range"),
    ((-99,), "blocks.0.hook_resid_pre", "out of range"),
    ((0, 9), "blocks.0.attn.hook_z", "out of range"),  # head 9 of 2
    ((0, 0, 0, 0), "blocks.0.attn.hook_z", "has 4 indices"),  # too many dims
    (("0",), "blocks.0.hook_resid_pre", "not an int"),  # a string index
    ((1.0,), "blocks.0.hook_resid_pre", "not an int"),  # a float index is not truncated
    ((True,), "blocks.0.hook_resid_pre", "not an int"),
]


@pytest.mark.parametrize("index,name,what", BAD_PATCHES)
def test_patch_helpers_share_index_validation(model, toks, index, name, what):
    for call in (lambda: patch_activations(model, toks, toks.flip(0), [(name, index)]),
                 lambda: resample_activations(model, toks, [(name, index)], [torch.arange(4).flip(0)]),
                 lambda: resample_together(model, toks, [(name, index)], [[torch.arange(4).flip(0)]])):
        with pytest.raises(InputError, match=what) as info:
            call()
        assert name in str(info.value) and "\n" not in str(info.value)


def test_patch_index_must_be_a_tuple(model, toks):
    with pytest.raises(InputError, match="must be a tuple"):
        patch_activations(model, toks, toks, [("blocks.0.hook_resid_pre", 1)])
    with pytest.raises(InputError, match="a patch is"):
        patch_activations(model, toks, toks, ["blocks.0.hook_resid_pre"])


def test_short_source_is_not_broadcast(model, toks):
    # a length-1 source over every position used to broadcast silently
    with pytest.raises(InputError, match=r"source slice has shape \(4, 1, 32\) but the target's is \(4, 12, 32\)"):
        patch_activations(model, toks, toks[:, :1], [("blocks.0.hook_resid_pre", ())])
    with pytest.raises(InputError, match=r"\(4, 3, 32\)"):  # a length-3 source
        patch_activations(model, toks, toks[:, :3], [("blocks.0.hook_resid_pre", ())])
    with pytest.raises(InputError, match="out of range"):  # a position the short source lacks
        patch_activations(model, toks, toks[:, :3], [("blocks.0.hook_resid_pre", (5,))])


def test_patch_at_a_position_both_have_still_works(model, toks):
    # documented: source and target may differ in length where the patched positions exist in both
    out = patch_activations(model, toks, toks[:, :3].flip(0), [("blocks.1.attn.hook_z", (1, 0))])
    full = toks.clone()
    full[:, :3] = toks[:, :3].flip(0)
    assert torch.equal(out, patch_activations(model, toks, full, [("blocks.1.attn.hook_z", (1, 0))]))
    # and every valid kind of index agrees with resample_activations
    rows = torch.tensor([2, 0, 3, 1])
    for index in [(), (3,), (-1,), (slice(2, 5),), (3, 1), (torch.tensor([0, 4]),)]:
        patches = [("blocks.0.attn.hook_z", index)]
        torch.testing.assert_close(patch_activations(model, toks, toks[rows], patches),
                                   resample_activations(model, toks, patches, [rows])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [torch.tensor([1.0, 0.0, 3.0, 2.0]), [1.5, 0, 3, 2], torch.ones(4, dtype=torch.bool)])
def test_float_rows_refused(model, toks, rows):
    with pytest.raises(InputError, match="must be integers"):
        resample_activations(model, toks, [("blocks.0.hook_resid_pre", (1,))], [rows])
    with pytest.raises(InputError, match="must be integers"):
        resample_together(model, toks, [("blocks.0.hook_resid_pre", (1,))], [[rows]])


# --- cache helpers: out-of-range positions ------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(model, toks):
    with torch.no_grad():
        return model.run_with_cache(toks)[1]


@pytest.mark.parametrize("call", [
    lambda c: c.residual(pos=99), lambda c: c.residual(pos=-99), lambda c: c.residual(1, pos=12),
    lambda c: c.head_decomposition(0, pos=99), lambda c: c.head_decomposition(None, pos=slice(20, 30)),
    lambda c: c.accumulated_resid(pos=99),
    lambda c: c.decompose_resid(1, pos_slice=99), lambda c: c.decompose_resid(1, pos_slice=[0, 99]),
    lambda c: c.stack_head_results(pos_slice=-13),
])
def test_cache_positions_out_of_range(cache, call):
    with pytest.raises(InputError, match="out of range|selects no position"):
        call(cache)


def test_cache_decompose_resid_pos_out_of_range(cache):
    with pytest.warns(DeprecationWarning), pytest.raises(InputError, match="out of range"):
        cache.decompose_resid(1, pos=99)


@pytest.mark.parametrize("pos", [1.0, "3", True, [0.5, 1.0]])
def test_cache_non_integer_positions_refused(cache, pos):
    with pytest.raises(InputError):
        cache.residual(pos=pos) if not isinstance(pos, list) else cache.decompose_resid(1, pos_slice=pos)


def test_cache_valid_positions_unchanged(cache):
    full = cache.residual(1)
    assert torch.equal(cache.residual(1, pos=-1), full[:, -1:])
    assert torch.equal(cache.residual(1, pos=-12), full[:, :1])
    assert torch.equal(cache.residual(1, pos=11), full[:, 11:])
    assert torch.equal(cache.decompose_resid(1, pos_slice=[-1, 0]), cache.decompose_resid(1)[:, :, [11, 0]])


# --- hook points that cannot fire -----------------------------------------------------------------------
ATTN_ONLY_MODELS = {
    "attn_only": lambda: perturbed_model("attn_only"),
    "assoc": lambda: build_model(AssocConfig(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=1,
                                             head_maps="per_head")),
    "assoc_compressed": lambda: build_model(AssocConfig(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=1,
                                                        pos_in_residual=False)),
    "assoc_no_residual": lambda: build_model(AssocConfig(d_vocab=7, n_ctx=2, d_model=6, n_heads=3, d_head=4, seed=1,
                                                         head_maps="per_head", residual=False, qk_input="position")),
}


def _inputs(model):
    if hasattr(model, "acfg"):
        return all_contexts(model.acfg.d_vocab, model.acfg.n_ctx)
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    if cfg.d_input:
        return torch.randn(3, cfg.n_ctx, cfg.d_input, generator=g)
    return torch.randint(0, cfg.d_vocab, (3, cfg.n_ctx), generator=g) % (cfg.pad_token or cfg.d_vocab)


ASSOC = {k: v for k, v in ATTN_ONLY_MODELS.items() if k.startswith("assoc")}


@pytest.mark.parametrize("build", list(ASSOC.values()) + [lambda c=c: perturbed_model(c) for c in CONFIGS],
                         ids=list(ASSOC) + list(CONFIGS))
def test_every_listed_hook_point_fires(build):
    model = build().eval()
    fired = set()
    with torch.no_grad():
        model.run_with_hooks(_inputs(model), fwd_hooks=[(lambda n: True, lambda x, hook: fired.add(hook.name))])
    assert fired == set(model.hook_dict), f"listed but never fire: {sorted(set(model.hook_dict) - fired)}"


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.mlp.hook_post",
                                  "blocks.0.ln2.hook_scale"])
def test_dead_hook_names_raise_on_attention_only(name):
    model = ATTN_ONLY_MODELS["attn_only"]()
    x = _inputs(model)
    with pytest.raises(HookNameError, match="attention-only .*blocks.0.hook_resid_post"):
        model.run_with_hooks(x, fwd_hooks=[(name, lambda x, hook: torch.zeros_like(x))])
    _, cache = model.run_with_cache(x, names=["blocks.0.hook_resid_post"])
    with pytest.raises(HookNameError, match="attention-only"):
        cache[name]


# --- a hook returning None; NaN / inf from a hook ----------------------------------------------------
EXPLICIT_ATTENTION = ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result")


@pytest.mark.parametrize("config,dtype", [("brackets", torch.float32), ("palindrome", torch.float32),
                                          ("attn_only", torch.float32), ("causal_padded", torch.float64)])
def test_hook_returning_none_is_documented(config, dtype):
    """README "Hooks": None leaves the activation unchanged. The output is bitwise the unhooked one
    except where observing switches a sublayer to its explicit path (attention scores / pattern /
    per-head results; any last-block hook that turns off the read-out-only path), and there it agrees
    to float rounding."""
    model = perturbed_model(config, dtype=dtype)
    x = _inputs(model).repeat(22, 1)  # 66 rows: the read-out-only path is on (READOUT_ONLY_MIN_BATCH)
    from circuits.model.transformer import FULL_POSITION_HOOKS
    last = f"blocks.{model.cfg.n_layers - 1}."
    with torch.no_grad():
        base = model(x)
        for name in model.hook_dict:
            out = model.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: None)])
            explicit = name.endswith(EXPLICIT_ATTENTION) or (
                model.cfg.readout != "all" and name.startswith(last) and name[len(last):] not in FULL_POSITION_HOOKS)
            if explicit:
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(out, base, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
            else:
                assert torch.equal(out, base), f"{name}: a hook returning None changed the output"


def test_nan_from_a_hook_flows_on_unless_checked(model, toks):
    def poison(x, hook):
        x = x.clone()
        x[0, 0, 0] = float("nan")
        return x

    hooks = [("blocks.0.hook_resid_pre", poison)]
    with torch.no_grad():
        out = model.run_with_hooks(toks, fwd_hooks=hooks)  # documented: flows on, as in TransformerLens
        assert torch.isnan(out[0]).any() and not torch.isnan(out[1:]).any()
        with pytest.raises(HookOutputError, match=r"poison on 'blocks.0.hook_resid_pre' returned 1 non-finite"):
            model.run_with_hooks(toks, fwd_hooks=hooks, check_finite=True)
        inf = [("blocks.1.attn.hook_z", lambda x, hook: x / 0)]
        with pytest.raises(HookOutputError, match="non-finite"):
            model.run_with_hooks(toks, fwd_hooks=inf, check_finite=True)
        assert not any(hp.fns for hp in model.hook_dict.values())  # detached after the error
        ok = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 1)],
                                  check_finite=True)
        assert torch.equal(ok, model(toks))


# --- options, environment and output paths: one usage error at start-up ------------------------------
def _flag(name: str) -> str:
    """The plugin's spelling of an option (`--NAME`, or `--circuits-NAME` once options are prefixed)."""
    import inspect

    from circuits.plugin import pytest_plugin

    src = inspect.getsource(pytest_plugin.pytest_addoption)
    return f"--circuits-{name}" if f'"--circuits-{name}"' in src else f"--{name}"


ONE_TEST = "def test_x():\n    pass\n"


@pytest.mark.parametrize("report, words", [
    ({"claims": "x"}, "its 'claims' is a JSON str, not a list"),
    ({"claims": [1]}, "claims[0] is a JSON int, not an object"),
    ({"claims": [], "tests": {}}, "its 'tests' is a JSON dict"),
    ([1, 2], "is not a circuits report (no 'claims')"),
])
def test_compare_with_a_malformed_report_is_a_usage_error(pytester, report, words):
    import json

    pytester.makepyfile(ONE_TEST)
    bad = pytester.path / "bad.json"
    bad.write_text(json.dumps(report))
    result = pytester.runpytest(_flag("compare"), str(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert words in result.stderr.str() and "1 passed" not in result.stdout.str()


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_report_dir_that_is_a_file_is_a_usage_error(pytester, where):
    pytester.makepyfile(ONE_TEST)
    (pytester.path / "afile").write_text("x")
    target = "afile" if where == "file" else "afile/reports"
    result = pytester.runpytest(_flag("report-dir"), target)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not a folder" in result.stderr.str() and "1 passed" not in result.stdout.str()
    assert pytester.runpytest(_flag("report-dir"), target, _flag("no-report")).ret == 0  # nothing is written


@pytest.mark.parametrize("value", ["99999999999999999999", "0", "-3", "abc", "1.5", "٣"])
def test_bad_circuits_threads_is_one_usage_error(pytester, monkeypatch, value):
    pytester.makepyfile(ONE_TEST)
    monkeypatch.setenv("CIRCUITS_THREADS", value)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "CIRCUITS_THREADS" in err and "expected a whole number of torch threads" in err
    monkeypatch.setenv("CIRCUITS_THREADS", "2")
    assert pytester.runpytest().ret == 0


def test_threads_from_env_is_what_the_claims_use(monkeypatch):
    from circuits.plugin.session import threads_from_env

    monkeypatch.setenv("CIRCUITS_THREADS", "3")
    assert threads_from_env() == 3
    monkeypatch.delenv("CIRCUITS_THREADS")
    assert threads_from_env() is None


@pytest.mark.parametrize("variant, words", [
    ("skip_trigrams@nope", "{flag} 'skip_trigrams@nope': unknown variant 'nope' of 'skip_trigrams'"),
    ("nosuchmodel@x", "{flag} 'nosuchmodel@x': unknown model 'nosuchmodel'"),
])
def test_unknown_variant_is_one_usage_error(pytester, variant, words):
    pytester.makepyfile(ONE_TEST)
    result = pytester.runpytest(_flag("variant"), variant, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert words.format(flag=_flag("variant")) in result.stderr.str() and "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize("args, words", [
    (["--acc-target", "nan"], "--acc-target nan: expected an accuracy in [0, 1]"),
    (["--acc-target", "inf"], "--acc-target inf"),
    (["--acc-target", "1.5"], "--acc-target 1.5"),
    (["--out", "{file}"], "is not a folder"),
])
def test_census_bad_arguments_refused_up_front(tmp_path, monkeypatch, capsys, args, words):
    from circuits import cli
    from circuits.zoo import census

    monkeypatch.setattr(census, "run_census", lambda *a, **k: pytest.fail("the census started"))
    (tmp_path / "afile").write_text("x")
    args = [a.replace("{file}", str(tmp_path / "afile")) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "census")]
    assert cli.main(["census", "brackets", "--seeds", "0", *out, *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


# --- the model store ------------------------------------------------------------------------------------
STORE_SPEC = {"name": "m", "seed": 0, "train": {"steps": 1}}


def _stored(root):
    from circuits.zoo.store import ModelStore, spec_key

    s = ModelStore(root)
    key = spec_key(STORE_SPEC)
    s.get_or_create(STORE_SPEC, lambda: ({"w": torch.ones(3)}, {"metrics": {"acc": 0.5}}))
    return s, key


def test_card_that_is_a_folder_is_corrupt_and_removed(tmp_path):
    import shutil as sh

    from circuits.zoo.store import CorruptCheckpointWarning

    s, key = _stored(tmp_path)
    card = s.card_path(key)
    card.unlink()
    card.mkdir()
    (card / "inside").write_text("x")
    assert s.verify(key) == ("corrupt", "card.json: the card is a folder, not a file")
    assert s.unreadable() == {key: "card.json: the card is a folder, not a file"}
    with pytest.warns(CorruptCheckpointWarning, match="the card is a folder.*removed it"):
        assert s.load(key) is None
    assert not s.entry_dir(key).exists()  # the warning's "removed it" is true
    _, card_fields, created = s.get_or_create(STORE_SPEC, lambda: ({"w": torch.ones(3)}, {}))
    assert created and card_fields["key"] == key


def test_lowered_format_version_without_card_hash_is_refused(tmp_path):
    import json

    s, key = _stored(tmp_path)
    card = json.loads(s.card_path(key).read_text())
    del card["card_hash"]
    card["format_version"] = 1
    card["metrics"]["acc"] = 1.0
    s.card_path(key).write_text(json.dumps(card))
    status, problem = s.verify(key)
    assert status == "corrupt" and "no card_hash (format_version 1)" in problem
    assert s.entries(verify=True) == []  # `list` does not show it cached


def test_free_space_checked_before_a_build(tmp_path, monkeypatch):
    import collections
    import shutil as sh

    from circuits.errors import StoreError
    from circuits.zoo.store import ModelStore

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10 << 20, (10 << 20) - (1 << 20), 1 << 20))
    built = []

    def build():
        built.append(1)
        return {"w": torch.ones(3)}, {}

    s = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match=r"only 1.0 MiB free on its filesystem, a build needs about 6.0 MiB") as info:
        s.get_or_create(STORE_SPEC, build, expected_bytes=1 << 20)
    assert built == [] and "\n" not in str(info.value)
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 40))
    assert s.get_or_create(STORE_SPEC, build, expected_bytes=1 << 20)[2] and built == [1]


def test_zoo_training_checks_free_space_first(tmp_path, monkeypatch):
    import collections
    import shutil as sh
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_zoo import tiny_entry

    from circuits.zoo import train
    from circuits.zoo import registry as zoo
    from circuits.errors import StoreError
    from circuits.zoo.store import ModelStore

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(1 << 20, 1 << 20, 100))
    monkeypatch.setattr(zoo, "train_entry", lambda *a, **k: pytest.fail("training started on a full disk"))
    entry = tiny_entry()
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    with pytest.raises(StoreError, match="MiB free"):
        zoo.load(entry.name, seed=3, store=ModelStore(tmp_path))


def test_pickle_named_safetensors_is_a_clear_error(tmp_path):
    from circuits.model.convert import load_tl_checkpoint
    from circuits.errors import StateDictError

    path = tmp_path / "model.safetensors"
    torch.save({"embed.W_E": torch.zeros(2, 2)}, path)
    with pytest.raises(StateDictError, match=r"could not read .*model.safetensors as safetensors .*must be one") as info:
        load_tl_checkpoint(path, CONFIGS["brackets"])
    assert "\n" not in str(info.value)
    with pytest.raises(StateDictError, match="no checkpoint file"):
        load_tl_checkpoint(tmp_path / "missing.safetensors", CONFIGS["brackets"])


@pytest.fixture
def stored_tiny(tmp_path, monkeypatch):
    """A trained tiny zoo entry (seed 2) in a store at tmp_path, the CLI pointed at it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_zoo import tiny_entry

    from circuits.zoo import registry as zoo
    from circuits.zoo.store import ModelStore, spec_key

    entry = tiny_entry()
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    zoo.load(entry.name, seed=2, store=ModelStore(tmp_path))
    return entry, ModelStore(tmp_path), spec_key(entry.spec(2))


@pytest.mark.parametrize("damage", ["garbage", "folder"])
def test_list_and_card_say_corrupt(stored_tiny, capsys, monkeypatch, damage):
    from circuits import cli

    entry, store, key = stored_tiny
    card = store.card_path(key)
    if damage == "garbage":
        card.write_text("{not json")
    else:
        card.unlink()
        card.mkdir()
    assert cli._status(entry.name)[1] == "not cached, corrupt seeds [2] (retrained on use)"
    monkeypatch.setattr(cli.zoo, "names", lambda: [entry.name])
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "corrupt seeds [2]" in out and f"corrupt model store entry {key}" in out
    assert cli.main(["card", entry.name, "--seed", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{entry.name} seed 2: its model store entry is corrupt" in err and "not in the model store" not in err
    assert store.card_path(key).exists(), "`card` is read-only: it leaves the entry for a rebuild to replace"


# --- terminal injection: names and messages shown through report.text.visible ----------------------------
EVIL = "acc\x1b[2J\x1b]0;pwned\x07\x1b[32mFAKE ALL PASSED\x1b[0m\u202eDESSAP\nALL PASSED\x07"


def test_visible_escapes_and_truncates():
    from circuits.report.text import visible

    shown = visible(EVIL)
    assert shown == ("acc\\x1b[2J\\x1b]0;pwned\\x07\\x1b[32mFAKE ALL PASSED\\x1b[0m\\u202eDESSAP\\nALL PASSED\\x07")
    assert shown.isprintable()
    for c in "\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069\u200e\u200f\u061c\x85\x9b\x7f\u2028":
        assert visible(f"a{c}b") == f"a\\{'x' if ord(c) < 256 else 'u'}{ord(c):0{2 if ord(c) < 256 else 4}x}b"
    assert visible("héllo ✓ 名前 ↳") == "héllo ✓ 名前 ↳"  # printable text is left alone
    long = visible("x" * 60_153, 200)
    assert len(long) == 200 and long.endswith(f"… (+{60_153 - long.index('…')} chars)")
    assert visible("a\nb\u202e", None, keep_lines=True) == "a\nb\\u202e"


def test_escapes_in_claim_names_reach_no_output_raw(pytester):
    import json

    long_name = "n" * 60_153
    pytester.makepyfile(test_evil=f'''
        def test_evil(claim):
            claim.at_least({EVIL!r}, 0.5, 0.9)

        def test_long(claim):
            claim.at_least({long_name!r}, 1.0, 0.9)
    ''')
    result = pytester.runpytest(_flag("run-id"), "evil", "-rA")
    assert result.ret == 1
    out = result.stdout.str() + result.stderr.str()
    for raw in ("\x1b[2J", "\x1b]0;", "\x07", "\u202e", "FAKE ALL PASSED\x1b"):
        assert raw not in out, repr(raw)
    assert "\\x1b[2J" in out and "\\u202e" in out
    assert max(map(len, out.splitlines())) < 3000
    run = pytester.path / "reports" / "evil"
    md = (run / "report.md").read_text()
    assert "\x1b" not in md and "\u202e" not in md and "\x07" not in md
    assert max(map(len, md.splitlines())) < 3000  # the 60,153-character name is cut
    html = (run / "report.html").read_text()
    assert "\x1b" not in html and "\u202e" not in html
    names = {c["name"] for c in json.loads((run / "report.json").read_text())["claims"]}
    assert names == {EVIL, long_name}  # report.json keeps the full text


def test_census_markdown_shows_claim_names_escaped():
    from circuits.zoo.census import Census, markdown

    column = f"test_x::{EVIL}" + "n" * 5000
    md = markdown(Census(name="brackets", module="m.py", seeds=[0], recipes=["default"], columns=[column]))
    assert "\x1b" not in md and "\u202e" not in md and "\\\\x1b\\[2J" in md
    assert max(map(len, md.splitlines())) < 300


def test_numpy_integers_are_integers(model, toks, cache):
    np = pytest.importorskip("numpy")
    patches = [("blocks.0.attn.hook_z", (np.int64(3), 1))]
    assert torch.equal(patch_activations(model, toks, toks.flip(0), patches),
                       patch_activations(model, toks, toks.flip(0), [("blocks.0.attn.hook_z", (3, 1))]))
    assert torch.equal(cache.residual(1, pos=np.int64(2)), cache.residual(1, pos=2))
    assert torch.equal(cache.decompose_resid(1, pos_slice=np.int64(-1)), cache.decompose_resid(1, pos_slice=-1))
    with pytest.raises(InputError, match="out of range"):
        patch_activations(model, toks, toks, [("blocks.0.attn.hook_z", (np.int64(30),))])


def test_one_device_rule_for_the_plugin_and_training(monkeypatch):
    """circuits.devices.check_device is the rule of --circuits-device, --device and training alike:
    mps is a device wherever torch can use it (the plugin used to reject it), a typo never is."""
    from circuits import devices
    from circuits.errors import SettingError

    assert devices.check_device(" cpu ") == "cpu"
    for bad, words in [("tpu", "'tpu' is not a device"), ("cpu:3", "use cpu"), (3, "is not a device")]:
        with pytest.raises(SettingError, match=words):
            devices.check_device(bad, option="--circuits-device")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.check_device("mps") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SettingError, match="--circuits-device 'mps': MPS is not available"):
        devices.check_device("mps", option="--circuits-device")

