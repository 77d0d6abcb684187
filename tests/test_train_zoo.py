"""Trainer determinism and behaviour, the zoo registry, zoo loading through the store, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from circuits.zoo import registry as zoo
from circuits.errors import InputError, UnknownModelError
from circuits.model.transformer import TransformerConfig
from circuits.zoo.store import ModelStore, StaleCheckpointError, MissingCheckpointError, save_reference
from circuits.tasks.brackets import data as B
from circuits.zoo.train import Split, TrainRecipe, batches, data_seeds, evaluate, lr_at, final_test_seed, train

from cli_run import run_cli

REPO = Path(__file__).resolve().parents[1]

TINY = TransformerConfig(n_layers=1, d_model=16, n_ctx=B.N_CTX, n_heads=2, d_mlp=16, d_vocab=B.VOCAB,
                         d_vocab_out=2, pad_token=B.PAD, positional="sinusoidal", readout="first")
TINY_RECIPE = TrainRecipe(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, n_train=2000, n_eval=500,
                          eval_every=20, threads=1)


def tiny_entry(name: str = "tiny_brackets", fast: bool = False) -> zoo.ZooEntry:
    recipe = replace(TINY_RECIPE, readout_only=fast, fused_adamw=fast)  # fast: the bracket recipe's options
    return zoo.ZooEntry(name=name, description="tiny bracket model for tests", config=TINY, recipe=recipe,
                        make_split=B.make_split, data_recipe={"generator": "brackets", "version": "test"})


@pytest.fixture
def registered_tiny():
    entry = tiny_entry()
    zoo.ZOO[entry.name] = entry
    yield entry
    zoo.ZOO.pop(entry.name, None)


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


DIGEST_SCRIPT = """
import hashlib, sys
sys.path.insert(0, {tests!r})
from test_train_zoo import tiny_entry, _weights_digest
from circuits.zoo import registry as zoo
for fast in (False, True):
    model, card = zoo.train_entry(tiny_entry(fast=fast), seed=3)
    print(_weights_digest(model))
"""


def test_training_is_bitwise_deterministic_across_processes():
    """Both recipes (default; readout_only + fused_adamw) in each of two fresh processes: one interpreter
    start per process, not per recipe."""
    script = DIGEST_SCRIPT.format(tests=str(Path(__file__).parent))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           cwd=REPO).stdout.split() for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 2 and all(len(d) == 64 for d in runs[0])
    assert runs[0][0] != runs[0][1], "the fast options change the training"
    for fast, digest in zip((False, True), runs[0]):
        model, _ = zoo.train_entry(tiny_entry(fast=fast), seed=4)
        assert _weights_digest(model) != digest, "a different seed must give different weights"


def test_training_learns_and_keeps_history():
    model, card = zoo.train_entry(tiny_entry(), seed=0)
    history = card["history"]
    assert [row["step"] for row in history] == [20, 40]
    assert all({"loss", "lr", "eval_loss", "eval_acc", "elapsed"} <= set(row) for row in history)
    # it learns: held-out loss below the 0.69 of a constant 50/50 guess, training loss falling
    assert card["metrics"]["eval_loss"] < 0.69
    assert history[-1]["loss"] < history[0]["loss"]
    assert card["data_seeds"]["train"] != card["data_seeds"]["eval"]


def test_early_stop_at_target_metric():
    entry = replace(tiny_entry(), recipe=replace(TINY_RECIPE, target_metric=0.0))
    _, card = zoo.train_entry(entry, seed=0)
    assert card["steps"] == TINY_RECIPE.eval_every  # stopped at the first evaluation


def final_test_seeds_are_disjoint_streams():
    seen = set()
    for s in range(50):
        tr, ev = data_seeds(s)
        assert tr != ev
        seen.update((tr, ev, final_test_seed(s)))
    assert len(seen) == 150


def test_final_test_set_is_scored_once_on_its_own_seed():
    """n_test: after training (early stop included) the model is scored on a fresh test set; the card
    says so (test_* metrics, its seed), and the recipe records n_test only when it is on."""
    assert "n_test" not in TINY_RECIPE.to_dict()
    entry = replace(tiny_entry(), recipe=replace(TINY_RECIPE, n_test=300))
    assert entry.recipe.to_dict()["n_test"] == 300
    model, card = zoo.train_entry(entry, seed=0)
    m = card["metrics"]
    assert {"eval_acc", "eval_loss", "test_acc", "test_loss"} <= set(m)
    assert card["data_seeds"]["test"] == final_test_seed(0)
    expected = evaluate(model, entry.make_split(300, final_test_seed(0)), "ce")
    assert m["test_acc"] == expected["eval_acc"] and m["test_loss"] == expected["eval_loss"]
    assert m["test_acc"] != m["eval_acc"] or m["test_loss"] != m["eval_loss"]  # another sample


def test_lr_schedule_warmup_then_cosine():
    r = TrainRecipe(steps=100, lr=1.0, warmup_steps=10, min_lr_frac=0.1)
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(10, r) == pytest.approx(1.0)
    assert lr_at(100, r) == pytest.approx(0.1)
    assert all(lr_at(s, r) >= lr_at(s + 1, r) for s in range(10, 99))


def test_length_bucketed_batches_cover_every_row_once_and_cut_padding():
    data = B.generate(1000, 0)
    split = Split(data.toks, data.isbal.long(), data.lengths + 2)
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat(list(batches(split, 64, gen, bucket=True)))
    assert sorted(seen.tolist()) == list(range(1000))
    for idx in batches(split, 64, gen, bucket=True):
        b = split.batch(idx)
        assert b.inputs.shape[1] == int((data.lengths[idx] + 2).max())
        widths = data.lengths[idx]
        assert int(widths.max() - widths.min()) <= 4  # sorted by length: near-uniform batches


def test_unknown_loss_is_a_clear_error():
    data = B.generate(100, 0)
    split = Split(data.toks, data.isbal.long(), data.lengths + 2)
    with pytest.raises(InputError, match="unknown loss 'hinge'"):
        train(zoo.build_model(tiny_entry(), 0), split, split, replace(TINY_RECIPE, loss="hinge", steps=1), seed=0)


# --- zoo -----------------------------------------------------------------------------------------------


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UnknownModelError, match="unknown model 'bracket'; did you mean 'brackets'"):
        zoo.get_entry("bracket")


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_bad_seed_is_a_clear_error(seed):
    with pytest.raises(InputError, match="seed must be a non-negative integer"):
        zoo.load("brackets", seed)


def test_spec_changes_with_every_ingredient():
    entry = tiny_entry()
    base = entry.spec(0)
    assert entry.spec(1) != base
    assert replace(entry, recipe=replace(TINY_RECIPE, lr=1e-4)).spec(0) != base
    assert replace(entry, config=replace(TINY, d_model=32)).spec(0) != base
    assert replace(entry, data_recipe={"version": "other"}).spec(0) != base
    assert {"config", "data", "train", "seed", "train_code", "torch"} <= set(base)


def test_load_trains_once_into_the_store_then_loads(registered_tiny, tmp_path):
    store = ModelStore(tmp_path)
    first = zoo.load("tiny_brackets", seed=5, store=store)
    second = zoo.load("tiny_brackets", seed=5, store=store)
    assert (first.source, second.source) == ("trained", "cache")
    x = B.tokenize(["(())", ")("])
    torch.testing.assert_close(first.model(x), second.model(x), rtol=0, atol=0)
    assert second.info()["metrics"]["history"], "training curves reach the report"


def test_reference_checkpoint_round_trip_and_staleness(registered_tiny, tmp_path):
    entry = registered_tiny
    with pytest.raises(MissingCheckpointError, match="--update-reference"):
        zoo.load("tiny_brackets", reference_dir=tmp_path)
    model, card = zoo.train_entry(entry, seed=0)
    save_reference(tmp_path, entry.name, model.state_dict(), {**card, "spec": entry.spec(0)})
    loaded = zoo.load("tiny_brackets", reference_dir=tmp_path)
    assert loaded.source == "reference"
    # the code that produced it changes (here: the recipe): never used silently
    zoo.ZOO[entry.name] = replace(entry, recipe=replace(TINY_RECIPE, lr=1e-2))
    with pytest.raises(StaleCheckpointError, match="train.lr"):
        zoo.load("tiny_brackets", reference_dir=tmp_path)


def test_every_registered_zoo_entry_has_a_current_reference():
    """The committed references must match the current code (else `pytest hypotheses/` fails)."""
    for name in zoo.names():
        entry = zoo.get_entry(name)
        for seed in entry.ref_seeds():
            loaded = zoo.load(name, seed)
            assert loaded.source == "reference", (name, seed)


# --- discovery: built-in modules, entry points, register() --------------------------------------------


def test_every_model_family_is_in_the_one_registry():
    names = zoo.names()
    families = {zoo.get_entry(n).family for n in names}
    assert {"transformer", "assoc"} <= families
    assert {"brackets", "palindromes", "icl", "skip_trigrams", "assoc_exp1_d10_H01", "assoc_exp2_dh01",
            "assoc_exp6_H01"} <= set(names)


def test_task_modules_register_nothing_on_import():
    """Discovery calls `zoo_entries()`; importing a task module has no side effect on the registry."""
    import importlib

    for mod in zoo.builtin_task_modules():
        m = importlib.import_module(mod)
        assert not hasattr(m, "_register"), mod
    before = dict(zoo.ZOO)
    importlib.reload(importlib.import_module("circuits.tasks.palindromes"))
    assert zoo.ZOO == before


def test_a_new_task_module_appears_with_no_other_change(tmp_path, monkeypatch):
    """A file in circuits/tasks/ exposing zoo_entries() is found by pkgutil (here: a temporary folder
    added to the package's search path, as a new file there would be)."""
    import circuits.tasks

    (tmp_path / "x_tiny_task.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_train_zoo import tiny_entry\n"
        "def zoo_entries():\n    return [tiny_entry('x_tiny')]\n" % str(Path(__file__).parent))
    monkeypatch.setattr(circuits.tasks, "__path__", list(circuits.tasks.__path__) + [str(tmp_path)])
    zoo.rediscover()
    try:
        assert "circuits.tasks.x_tiny_task" in zoo.builtin_task_modules()
        assert "x_tiny" in zoo.names() and zoo.get_entry("x_tiny").description.startswith("tiny")
    finally:
        monkeypatch.undo()
        sys.modules.pop("circuits.tasks.x_tiny_task", None)
        zoo.rediscover()
    assert "x_tiny" not in zoo.names()


class _FakeEntryPoint:
    def __init__(self, name, fn):
        self.name, self.value, self._fn = name, f"fake_pkg:{name}", fn

    def load(self):
        if isinstance(self._fn, Exception):
            raise self._fn
        return self._fn


def test_entry_point_group_adds_third_party_entries(monkeypatch):
    import importlib.metadata

    def fake_entry_points(group=None, **kw):
        assert group == zoo.ENTRY_POINT_GROUP
        return [_FakeEntryPoint("plugin", lambda: [tiny_entry("plugin_tiny")])]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    zoo.rediscover()
    try:
        assert "plugin_tiny" in zoo.names()
        assert "brackets" in zoo.names()  # built-ins still there
    finally:
        monkeypatch.undo()
        zoo.rediscover()
    assert "plugin_tiny" not in zoo.names()


def test_a_broken_entry_point_is_a_clear_error(monkeypatch):
    import importlib.metadata

    from circuits.errors import ConfigError

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None, **kw: [_FakeEntryPoint("broken", ImportError("no module named x"))])
    zoo.rediscover()
    try:
        with pytest.raises(ConfigError, match="entry point 'broken'.*failed to load: ImportError"):
            zoo.names()
    finally:
        monkeypatch.undo()
        zoo.rediscover()


def test_register_from_a_conftest_at_any_time():
    entry = tiny_entry("conftest_tiny")
    zoo.names()  # after discovery
    try:
        zoo.register(entry)
        assert zoo.get_entry("conftest_tiny") is entry
        zoo.register(entry)  # the same object again: fine
        from circuits.errors import ConfigError

        with pytest.raises(ConfigError, match="registered twice"):
            zoo.register(tiny_entry("conftest_tiny"))
    finally:
        zoo.ZOO.pop("conftest_tiny", None)
    with pytest.raises(InputError, match="ZooEntry"):
        zoo.register({"name": "x"})


# --- recipe variants ----------------------------------------------------------------------------------


def test_recipe_variant_has_its_own_name_and_store_key(tmp_path):
    base = replace(tiny_entry("variant_tiny"), variants={
        "fast_lr": {"recipe": {"lr": 1e-2}},
        "renamed": lambda e: replace(e, description="made by a function"),
    })
    zoo.register(base)
    try:
        v = zoo.get_entry("variant_tiny@fast_lr")
        assert v.name == "variant_tiny@fast_lr" and v.recipe.lr == 1e-2 and base.recipe.lr == TINY_RECIPE.lr
        assert v.spec(0)["name"] == "variant_tiny@fast_lr" and v.spec(0) != base.spec(0)
        assert v.ref_seeds() == ()  # a variant is never the committed reference
        assert zoo.get_entry("variant_tiny@renamed").description == "made by a function"
        assert "variant_tiny@fast_lr" in zoo.names(include_variants=True)
        with pytest.raises(UnknownModelError, match="unknown variant 'fast'.*fast_lr"):
            zoo.get_entry("variant_tiny@fast")
        with pytest.raises(UnknownModelError, match="unknown variant .arena_like_typo. of .brackets."):
            zoo.get_entry("brackets@arena_like_typo")
        loaded = zoo.load("variant_tiny@fast_lr", 0, store=ModelStore(tmp_path))
        assert loaded.source == "trained" and loaded.info()["name"] == "variant_tiny@fast_lr"
    finally:
        zoo.ZOO.pop("variant_tiny", None)


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli_list_and_card():
    """`python -m circuits` itself, in a real process (the other CLI tests call cli.main in-process)."""
    out = subprocess.run([sys.executable, "-m", "circuits", "list"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "brackets" in out.stdout
    card = run_cli("card", "brackets")
    assert card.returncode == 0, card.stderr
    assert json.loads(card.stdout)["spec"]["name"] == "brackets"


def test_cli_clear_errors_for_unknown_names_and_bad_seeds(tmp_path):
    out = run_cli("train", "nope", env={"CIRCUITS_CACHE": str(tmp_path)})
    assert out.returncode == 2 and "unknown model 'nope'" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("card", "brackets", "--seed", "-3")
    assert out.returncode == 2 and "seed must be a non-negative integer" in out.stderr
    out = run_cli("card", "brackets", "--seed", "7", env={"CIRCUITS_CACHE": str(tmp_path)})
    assert out.returncode == 1 and "not in the model store" in out.stderr


def test_cli_lists_trains_and_prints_the_assoc_experiments(tmp_path):
    out = run_cli("list")
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    assert rows["assoc_exp1_d10_H06"][1:4] == ["assoc", "reference", "ok"] and "assoc_skip_no_residual" in rows
    assert rows["brackets"][1] == "transformer"  # one registry, one table for every family
    assert rows["assoc_exp2_dh03"][2:4] == ["no", "reference"]  # a sweep point: trained into the store on demand
    card = run_cli("card", "assoc_freeze_none")
    assert card.returncode == 0, card.stderr
    assert json.loads(card.stdout)["spec"]["name"] == "assoc_freeze_none"
    out = run_cli("card", "assoc_exp1_d10_H6")
    assert out.returncode == 2 and "did you mean" in out.stderr and "assoc_exp1_d10_H06" in out.stderr
    out = run_cli("card", "assoc_freeze_none", "--seed", "3", env={"CIRCUITS_CACHE": str(tmp_path)})
    assert out.returncode == 1 and "not in the model store" in out.stderr
    out = run_cli("train", "assoc_freeze_all", "--seed", "3", env={"CIRCUITS_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr  # everything frozen: evaluates, trains nothing (fast)
    card = run_cli("card", "assoc_freeze_all", "--seed", "3", env={"CIRCUITS_CACHE": str(tmp_path)})
    assert card.returncode == 0 and json.loads(card.stdout)["spec"]["seed"] == 3


def test_options_added_later_enter_the_spec_only_when_on():
    """readout_only / fused_adamw / n_test / aux_weight came after models were committed: off, they
    leave the recipe's dict (and so every store key) as it was; on, they are part of it."""
    late = {"readout_only": True, "fused_adamw": True, "n_test": 1000, "aux_weight": 0.3}
    plain = TrainRecipe().to_dict()
    assert not set(late) & set(plain)
    on = TrainRecipe(**late).to_dict()
    assert {k: on[k] for k in late} == late
    brackets = zoo.get_entry("brackets").recipe.to_dict()
    assert brackets["aux_weight"] == 0.3 and brackets["n_test"] == 100_000 and brackets["fused_adamw"] is True


def test_cli_lists_only_cached_models_the_current_spec_would_load(registered_tiny, tmp_path, monkeypatch):
    """A store entry trained under an older recipe is not 'cached' for the entry any more."""
    from circuits import cli

    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    zoo.load("tiny_brackets", seed=2, store=ModelStore(tmp_path))
    assert cli._status("tiny_brackets")[1] == "cached seeds [2]"
    zoo.ZOO["tiny_brackets"] = replace(registered_tiny, recipe=replace(TINY_RECIPE, steps=30))
    assert cli._status("tiny_brackets")[1] == "not cached"


def test_auxiliary_targets_loss():
    """aux_weight: cross-entropy at the read-out position + weight x mean cross-entropy over the other
    labelled positions (all scored by the unembedding); 'correct' is the read-out position's only."""
    import torch.nn.functional as F

    from circuits.zoo.train import compute_loss

    model = zoo.build_model(tiny_entry(), 0).double()
    data = B.generate(64, 1)
    b = Split(data.toks, B.suffix_targets(data), data.lengths + 2).batch(torch.arange(64))
    value, correct = compute_loss(model, b, "ce", aux_weight=0.3)
    out = model(b.inputs, readout="all")  # [batch, pos, 2]
    aux = b.targets[:, 1:]
    keep = aux >= 0
    expected = F.cross_entropy(out[:, 0], b.targets[:, 0]) + 0.3 * F.cross_entropy(out[:, 1:][keep], aux[keep])
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(correct, (out[:, 0].argmax(-1) == b.targets[:, 0]).double())
    with pytest.raises(InputError, match=r"auxiliary targets must be \[batch, pos\]"):
        compute_loss(model, Split(b.inputs, b.targets[:, :3]), "ce", aux_weight=0.3)
    per_position = zoo.HookedTransformer(replace(TINY, readout="all"))
    with pytest.raises(InputError, match="first/last read-out"):
        compute_loss(per_position, b, "ce", aux_weight=0.3)


def test_training_with_auxiliary_targets_learns():
    entry = replace(tiny_entry(), recipe=replace(TINY_RECIPE, aux_weight=0.3),
                    make_train_split=B.make_train_split)
    _, card = zoo.train_entry(entry, seed=0)
    assert card["metrics"]["eval_loss"] < 0.69  # held out on the plain task (1-D labels)


SLOT_SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
from dataclasses import replace
from test_train_zoo import tiny_entry
from circuits.zoo import train as T
from circuits.zoo import registry as zoo
entry = tiny_entry()
entry = replace(entry, recipe=replace(entry.recipe, threads=2, steps=80))
inner = T._train
def timed(*args, **kwargs):
    start = time.time()
    result = inner(*args, **kwargs)
    print(json.dumps([start, time.time()]))
    return result
T._train = timed
zoo.train_entry(entry, seed=0)
"""


def test_multithreaded_trainings_take_turns(tmp_path):
    """Two processes training on 2 threads each hold the training slot in turn (real processes)."""
    script = SLOT_SCRIPT.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # a slot of this test's own
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for _ in range(2)]
    spans = sorted(json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert spans[0][1] <= spans[1][0], f"the two trainings overlapped: {spans}"


def test_one_thread_trainings_do_not_wait_for_the_slot(tmp_path, monkeypatch):
    from filelock import FileLock

    from circuits.zoo import train as T

    monkeypatch.setattr(T, "training_slot_path", lambda: tmp_path / "slot.lock")
    with FileLock(str(tmp_path / "slot.lock")):  # another training holds the slot
        with T.training_slot(1):
            pass  # entered at once: one thread does not oversubscribe
