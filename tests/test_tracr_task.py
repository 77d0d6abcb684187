"""Tracr-compiled ground-truth models (circuits.tasks.tracr.compiled): the shipped weights, converted into our
HookedTransformer, compute exactly what the RASP program computes on every input of the stated set;
the files are hash-checked; a stale or damaged file is a clear error; the regeneration script
rebuilds them bit for bit where the `tracr` extra is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from circuits.zoo import registry as zoo
from circuits.errors import ConfigError, InputError
from circuits.model.transformer import HookedTransformer
from circuits.zoo.store import CorruptCheckpointError, StaleCheckpointError, load_reference
from circuits.tasks.tracr import compiled as T

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = sorted(T.PROGRAMS)
F32_TOL = 1e-5  # float32 identity tolerance (numerical outputs are float32 sums of one-hot products)


@pytest.fixture(scope="module")
def loaded():
    return {p: zoo.load(T.entry_name(p)) for p in PROGRAMS}


def _outputs(model: HookedTransformer, tracr: dict) -> list[list]:
    """The converted model's outputs on every input of the card's set, in the card's order."""
    by_len = defaultdict(list)
    for i, seq in enumerate(tracr["inputs"]):
        by_len[len(seq)].append(i)
    out: list = [None] * len(tracr["inputs"])
    with torch.no_grad():
        for n, idx in by_len.items():
            logits = model(T.encode(tracr, [tracr["inputs"][i] for i in idx]))  # [batch, 1 + n, d_vocab_out]
            for i, row in zip(idx, T.decode_outputs(tracr, logits)):
                out[i] = row
    return out


@pytest.mark.parametrize("program", PROGRAMS)
def test_converted_model_computes_the_program_on_every_input(loaded, program):
    tracr = loaded[program].card["tracr"]
    prog = T.PROGRAMS[program]
    # the stated set is exhaustive: every sequence of length 1..max_seq_len over the vocabulary
    assert [tuple(s) for s in tracr["inputs"]] == T.inputs_of(prog)
    assert len(tracr["inputs"]) == sum(len(prog.vocab) ** n for n in range(1, prog.max_seq_len + 1))
    ours = _outputs(loaded[program].model, tracr)
    wrong = []
    for seq, want, got, compiled in zip(tracr["inputs"], tracr["expected"], ours, tracr["compiled"]):
        if tracr["output"]["kind"] == "categorical":
            if got != want:
                wrong.append((seq, want, got))
        else:
            gap = max(max(abs(a - b) for a, b in zip(got, want)), max(abs(a - b) for a, b in zip(got, compiled)))
            if gap > F32_TOL:
                wrong.append((seq, want, got, gap))
    assert not wrong, f"{program}: {len(wrong)} of {len(ours)} inputs differ from the program, e.g. {wrong[:3]}"


def test_programs_differ_on_the_set():
    """Each card's outputs are not constant (a model computing a constant would pass trivially)."""
    for program in PROGRAMS:
        tracr = T.read_card(program)["tracr"]
        assert len({json.dumps(e[-1]) for e in tracr["expected"]}) >= 2, program


def test_architecture_as_compiled(loaded):
    for program in PROGRAMS:
        model, tracr = loaded[program].model, loaded[program].card["tracr"]
        cfg = model.cfg
        assert cfg.normalization is None and cfg.act_fn == "relu" and cfg.pad_token is None
        assert cfg.attention == ("causal" if T.PROGRAMS[program].causal else "bidirectional")
        assert cfg.d_model == len(tracr["residual_labels"])
        # BOS (position 0) has no positional embedding; position i + 1 holds RASP index i
        W_pos = model.pos_embed.W_pos
        assert float(W_pos[0].detach().abs().max()) == 0.0
        labels = tracr["residual_labels"]
        for i in range(T.PROGRAMS[program].max_seq_len):
            assert labels[int(W_pos[i + 1].argmax())] == f"indices:{i}"
        # every bias is zero (Tracr's compiled model has none in use)
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("b_"):
                assert float(p.detach().abs().max()) == 0.0, name


def test_numerical_output_is_one_residual_dim(loaded):
    tracr = loaded["frac_prevs"].card["tracr"]
    W_U = loaded["frac_prevs"].model.unembed.W_U  # [d_model, 1]
    assert W_U.shape[1] == 1 and int(W_U[:, 0].argmax()) == tracr["output"]["dims"][0]
    assert float(W_U.detach().sum()) == 1.0


def test_compiled_entries_load_the_same_weights_for_every_seed_and_never_train():
    a = zoo.load("tracr_hist")
    b = zoo.load("tracr_hist", seed=3, retrain=True)
    assert a.card["content_hash"] == b.card["content_hash"] and b.source == "reference"
    entry = zoo.get_entry("tracr_hist")
    with pytest.raises(ConfigError, match="compiled by Tracr, not trained"):
        zoo.train_entry(entry, 0)


def test_model_fixture_names():
    from circuits.plugin.zoo_fixtures import fixture_name

    assert {fixture_name(T.entry_name(p)) for p in PROGRAMS} == {
        "tracr_shuffle_dyck_model", "tracr_frac_prevs_model", "tracr_hist_model"}
    assert set(map(T.entry_name, PROGRAMS)) <= set(zoo.names())


def _copy(tmp_path: Path, program: str) -> Path:
    stem = T.entry_name(program)
    for suffix in (".safetensors", ".card.json"):
        shutil.copy(ROOT / "fixtures" / "models" / f"{stem}{suffix}", tmp_path / f"{stem}{suffix}")
    return tmp_path


def test_card_sha256_is_checked(tmp_path):
    d = _copy(tmp_path, "hist")
    stem = T.entry_name("hist")
    load_reference(d, stem, T.spec("hist"))  # intact: loads
    weights = d / f"{stem}.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="hash|sha256|corrupt"):
        load_reference(d, stem, T.spec("hist"))


def test_edited_expected_outputs_fail_the_card_hash(tmp_path):
    d = _copy(tmp_path, "hist")
    stem = T.entry_name("hist")
    card_file = d / f"{stem}.card.json"
    card = json.loads(card_file.read_text())
    card["tracr"]["expected"][0] = [5]
    card_file.write_text(json.dumps(card, indent=2, sort_keys=True))
    with pytest.raises(CorruptCheckpointError):
        load_reference(d, stem, T.spec("hist"))


def test_changed_program_makes_the_files_stale(monkeypatch):
    changed = T.TracrProgram(**{**T.PROGRAMS["hist"].to_dict(), "vocab": ("a", "b"), "max_seq_len": 5})
    monkeypatch.setitem(T.PROGRAMS, "hist", changed)
    with pytest.raises(StaleCheckpointError):
        zoo.load("tracr_hist")


def test_missing_card_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="missing.*regenerate_tracr"):
        T.read_card("hist", reference_dir=tmp_path)


def test_encode_rejects_bad_input():
    tracr = T.read_card("hist")["tracr"]
    with pytest.raises(InputError, match="not in the compiled vocabulary"):
        T.encode(tracr, [("a", "z")])
    with pytest.raises(InputError, match="one length"):
        T.encode(tracr, [("a",), ("a", "b")])


def test_regeneration_is_bit_for_bit():
    """Only where the `tracr` extra is installed (CI checks the shipped outputs above without it)."""
    pytest.importorskip("tracr")
    pytest.importorskip("jax")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "regenerate_tracr.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("unchanged") == len(PROGRAMS), run.stdout


def test_ground_truth_matrix_counts_verdicts():
    """The report's matrix: a TRUE claim's record passing is a right verdict; a FALSE claim's record
    ("... is refuted") passing means the false claim failed, also right; control runs are ignored."""
    from circuits.report.views import ground_truth_matrix, ground_truth_table

    claims = [
        {"name": "TRUE attention: L4H0 to last", "passed": True},
        {"name": "TRUE probe: opens", "passed": False},
        {"name": "FALSE attention (wrong head): L4H1 to last is refuted", "passed": True},
        {"name": "FALSE attention (wrong head): L4H1 to last is refuted", "passed": True, "control": "x"},
        {"name": "FALSE probe (wrong layer): opens before is refuted", "passed": False},
        {"name": "an ordinary claim", "passed": True},
    ]
    gt = ground_truth_matrix({"claims": claims})
    assert gt["types"] == {"attention": {"true_pass": 1, "true_fail": 0, "false_pass": 0, "false_fail": 1},
                           "probe": {"true_pass": 0, "true_fail": 1, "false_pass": 1, "false_fail": 0}}
    assert gt["wrong"] == ["TRUE probe: opens", "FALSE probe (wrong layer): opens before is refuted"]
    assert ground_truth_table({"claims": claims})[-1] == "| **all** | 1 | 1 | 1 | 1 | 2 / 4 |"
    assert ground_truth_matrix({"claims": claims[-1:]}) is None and ground_truth_table({"claims": []}) == []


def test_ground_truth_edges_match_the_model(loaded):
    """The card's graph: the shuffle_dyck chain is there, and every head it leaves out is unused
    (zero-ablating it changes no output on any input of the set)."""
    from circuits.analysis.interventions import zero_ablate_head

    edges = {(a, b) for a, b, _ in T.ground_truth_edges(loaded["shuffle_dyck"].card["tracr"])}
    for step in [("L0.mlp", "L1H0"), ("L1H0", "L2.mlp"), ("L1H1", "L2.mlp"), ("L2.mlp", "L3.mlp"),
                 ("L3.mlp", "L4H0"), ("L3.mlp", "L4H1"), ("L1.mlp", "L4H0"), ("L4H0", "L5.mlp"),
                 ("L4H1", "L4.mlp"), ("L4.mlp", "L5.mlp"), ("L5.mlp", "logits")]:
        assert step in edges, step
    for program in PROGRAMS:
        model, tracr = loaded[program].model, loaded[program].card["tracr"]
        used = {c for e in T.ground_truth_edges(tracr) for c in e[:2]}
        clean = _outputs(model, tracr)
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                if f"L{layer}H{head}" not in used:
                    assert _outputs(zero_ablate_head(model, layer, head), tracr) == clean, (program, layer, head)
