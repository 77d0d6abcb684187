"""The associative-memory experiments as ordinary zoo entries (one registry, one loader: `zoo.load`).

Each entry is a model of the family (`AssocConfig`) trained on a law (its spec is the entry's
`data_recipe`) with an `AssocRecipe`; `train_fn` is `train_assoc`, `build_model` the AoT, and
`spec_fn` keeps the store keys the experiments had before they joined the zoo. The card's
`metrics.accuracy` is the accuracy the paper measures: on the training law (for the paper's sweeps,
the fixed sampled training set, whose pairs weigh by their counts: their `acc` is the mean training
accuracy of the last 100 batches, experiments.ipynb / train.py `compute_acc`).

The paper's experiments (Dana, Pydi & Chevaleyre, AISTATS 2025; `experiments.ipynb` of
leodana2000/Transformer_Attentional_Memory, its cells "Experiment 1" ... "Experiment 6", and the
`Scaling laws/Data_exp_*.csv` files for their numbers, means of 5 runs, 20 for experiment 6):
  exp 1  N = 50, d = d_h = 10, H = 1..31 step 5            assoc_exp1_d10_H01 ... H31
  exp 2  N = 50, d = 10, H = 20, d_h = 1..10               assoc_exp2_dh01 ... dh10
  exp 3  N = 50, H = 20, d_h = 10, d = 5..15               assoc_exp3_d05 ... d15
  exp 5  N = 70, d = d_h = 10: H heads (H = 1..31 step 5)  assoc_exp5_attn_H01 ... H31
         against 1 head + an MLP of width 2 d (H - 1)      assoc_exp5_mlp_H01 ... H31
         (the notebook's equal-parameter pairing: 4 d^2 per head ~ 2 d W + W per MLP width)
  exp 6  N = 10, d = d_h = 2, H = 1..21 step 4             assoc_exp6_H01 ... H21
Experiments 1-3 and 6: 16,384 sampled sequences (2^6 batches of 2^8), 64 epochs, Adam with LinearLR
from 1e-2 to 5e-4 (their lr=1e-1 times start_factor=lr, end_factor=lr_low: 1e-2 -> 1e-1 * 5e-3).
Experiment 5: 262,144 sequences (2^8 batches of 2^10), 64 epochs (16,384 steps), the rate falling
to 5% (attention-only) or 1% (MLP: lr_low = lr * 0.01) of 1e-2.
The seed notebook's cells (superposition, freezing, skip connection) and the low-rank optima of
Proposition 1 are entries too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from circuits.tasks.assoc.model import AssocConfig, build_model
from circuits.zoo.registry import REFERENCE_DIR, ZooEntry
from circuits.tasks.assoc.laws import DATA_VERSION, make_law
from circuits.tasks.assoc.lowrank import LowRank, low_rank_optimum
from circuits.tasks.assoc.training import TRAIN_CODE_VERSION, AssocRecipe, train_assoc

FAMILY = "assoc"


def _torch_version() -> str:
    return torch.__version__.split("+")[0]


def _spec(entry: ZooEntry, seed: int) -> dict:
    """The store key's spec (the same dict the experiments used before joining the zoo)."""
    return {
        "kind": "assoc_model",
        "name": entry.name,
        "config": replace(entry.config, seed=seed).to_dict(),
        "law": entry.data_recipe,
        "train": entry.recipe.to_dict(),
        "seed": seed,
        "train_code": TRAIN_CODE_VERSION,
        "torch": _torch_version(),
    }


def _build(config: AssocConfig, seed: int):
    return build_model(replace(config, seed=seed))


def _train(entry: ZooEntry, seed: int, progress=None):
    law = make_law(entry.data_recipe)
    model = _build(entry.config, seed)
    result = train_assoc(model, law, entry.recipe, seed=seed, progress=progress)
    card = {"metrics": result.final, "history": result.history, "steps": result.steps,
            "wall_time": round(result.wall_time, 3), "description": entry.description}
    return model, card


def assoc_entry(name: str, config: AssocConfig, law: dict, recipe: AssocRecipe, description: str = "",
                reference_seeds: tuple = (), extra: Optional[dict] = None) -> ZooEntry:
    """A zoo entry of the family: `config` trained on the law `law` (a spec) with `recipe`."""
    return ZooEntry(name=name, description=description, config=config, recipe=recipe, data_recipe=law,
                    build_model=_build, train_fn=_train, spec_fn=_spec, family=FAMILY,
                    reference_seeds=tuple(reference_seeds), extra=dict(extra or {}))


def build_law(entry: ZooEntry):
    """The law an entry of the family is trained and scored on."""
    return make_law(entry.data_recipe)


# --- experiment 1 ------------------------------------------------------------------------------------

# Experiment 1 as the authors' code ran it (experiments.ipynb, "Common hyper-parameters (exp 1-4)" and
# "Experiment 1"): each of the N^2 = 2,500 pairs (t1, t2) gets a uniformly random next token; a fixed
# training set of 16,384 sampled sequences; Adam, 64 epochs x 64 batches of 256 (4,096 steps), the
# rate falling linearly from 1e-2 to 5e-4; positions enter the attention inputs only. Their accuracy
# is the *training* accuracy, i.e. under the training set's empirical law (each pair weighted by its
# count; the uniform-law accuracy is ~0.05-0.08 lower in the middle of the curve).
PAPER_EXP1 = {1: 0.1298125, 6: 0.324265625, 11: 0.50625, 16: 0.6851640625, 21: 0.860796875, 26: 0.9633671875,
              31: 0.9973515625}  # Data_exp_1_10.csv (mean of 5 runs)
EXP1_HEADS = tuple(PAPER_EXP1)
EXP1_DEFAULT_SEEDS = (0,)
EXP1_FULL_SEEDS = (0, 1, 2, 3, 4)  # the paper averaged 5 repetitions (same training set, new models)
EXP1_TABLE = {"kind": "associations", "N": 50, "S": 2, "seed": 0, "version": DATA_VERSION}
EXP1_LAW = {"kind": "empirical", "base": EXP1_TABLE, "n": 16_384, "seed": 0, "version": DATA_VERSION}
EXP1_RECIPE = AssocRecipe(steps=4096, lr=1e-2, batch_size=256, loss="next_token", schedule="linear",
                          final_lr_frac=0.05, eval_every=256)
FULL_SEEDS = EXP1_FULL_SEEDS


def aot_config(N: int, d: int, H: int, d_head: int, d_mlp: int = 0) -> AssocConfig:
    """The authors' AoT (models.py): one layer, positions in the attention inputs only, shared maps."""
    return AssocConfig(d_vocab=N, n_ctx=2, d_model=d, n_heads=H, d_head=d_head, d_mlp=d_mlp, pos_in_residual=False)


def exp1_name(H: int, d: int = 10) -> str:
    return f"assoc_exp1_d{d}_H{H:02d}"


def exp1(H: int, d: int = 10, d_head: int = 10) -> ZooEntry:
    return assoc_entry(exp1_name(H, d), aot_config(50, d, H, d_head), EXP1_LAW, EXP1_RECIPE,
                       f"paper experiment 1: N=50 bigram associations (16,384 sampled), d={d}, d_h={d_head}, H={H}",
                       reference_seeds=(0,) if (d, d_head) == (10, 10) and H in EXP1_HEADS else (),
                       extra={"paper_accuracy": PAPER_EXP1.get(H) if d == d_head == 10 else None})


# --- experiment 2: accuracy against d_h (N = 50, d = 10, H = 20) -----------------------------------------

PAPER_EXP2 = {1: 0.081453125, 2: 0.1096484375, 3: 0.1554375, 4: 0.2094375, 5: 0.2878515625, 6: 0.35668750000000005,
              7: 0.4534453125, 8: 0.5456875, 9: 0.639140625, 10: 0.8044218749999998}  # Data_exp_2.csv
EXP2_REFERENCE_POINTS = (1, 5, 10)


def exp2_name(d_head: int) -> str:
    return f"assoc_exp2_dh{d_head:02d}"


def exp2(d_head: int) -> ZooEntry:
    return assoc_entry(exp2_name(d_head), aot_config(50, 10, 20, d_head), EXP1_LAW, EXP1_RECIPE,
                       f"paper experiment 2: N=50 (16,384 sampled), d=10, H=20, d_h={d_head}",
                       reference_seeds=(0,) if d_head in EXP2_REFERENCE_POINTS else (),
                       extra={"paper_accuracy": PAPER_EXP2.get(d_head)})


# --- experiment 3: accuracy against d (N = 50, H = 20, d_h = 10) -----------------------------------------

PAPER_EXP3 = {5: 0.2639296875, 6: 0.36207031250000005, 7: 0.4599921875, 8: 0.5782421875, 9: 0.6972343750000001,
              10: 0.8087421875, 11: 0.7768984375, 12: 0.789015625, 13: 0.7855000000000001, 14: 0.8117656249999999,
              15: 0.8135859374999999}  # Data_exp_3.csv
EXP3_REFERENCE_POINTS = (5, 15)  # d = 10 is exp 2's d_h = 10 model (same config, law, recipe)


def exp3_name(d: int) -> str:
    return f"assoc_exp3_d{d:02d}"


def exp3(d: int) -> ZooEntry:
    return assoc_entry(exp3_name(d), aot_config(50, d, 20, 10), EXP1_LAW, EXP1_RECIPE,
                       f"paper experiment 3: N=50 (16,384 sampled), H=20, d_h=10, d={d}",
                       reference_seeds=(0,) if d in EXP3_REFERENCE_POINTS else (),
                       extra={"paper_accuracy": PAPER_EXP3.get(d)})


# --- experiment 5: attention-only against one head + an MLP (N = 70, d = d_h = 10) -----------------------

PAPER_EXP5_ATTN = {1: 0.068041015625, 6: 0.151392578125, 11: 0.23009375000000004, 16: 0.30092578125,
                   21: 0.38925976562500003, 26: 0.49005664062499993, 31: 0.59398828125}  # Data_exp_5_10_att.csv
PAPER_EXP5_MLP = {1: 0.069794921875, 6: 0.23648828125, 11: 0.37397265625, 16: 0.4977890625, 21: 0.578044921875,
                  26: 0.589712890625, 31: 0.6934296875}  # Data_exp_5_10_mlp.csv (width 2 d (H - 1))
EXP5_HEADS = tuple(PAPER_EXP5_ATTN)
EXP5_REFERENCE_POINTS = (6, 11)  # 16,384 steps on N = 70: 3.5-5 min per model on a busy core; the full sweep trains the rest
EXP5_TABLE = {"kind": "associations", "N": 70, "S": 2, "seed": 0, "version": DATA_VERSION}
EXP5_LAW = {"kind": "empirical", "base": EXP5_TABLE, "n": 262_144, "seed": 0, "version": DATA_VERSION}
# rows="batch": each step computes the logits of its 1,024 sampled contexts only, as the authors' train.py
# does (the full N^2 = 4,900-context table cost the MLP models 5x more per step, 14 min per model here)
EXP5_ATTN_RECIPE = AssocRecipe(steps=16_384, lr=1e-2, batch_size=1024, loss="next_token", schedule="linear",
                               final_lr_frac=0.05, eval_every=1024, rows="batch")
EXP5_MLP_RECIPE = replace(EXP5_ATTN_RECIPE, final_lr_frac=0.01)


def exp5_width(H: int, d: int = 10) -> int:
    """The notebook's MLP width for the H-head point: 2 d (H - 1) (same parameter count, ~)."""
    return 2 * d * (H - 1)


def exp5_name(kind: str, H: int) -> str:
    return f"assoc_exp5_{kind}_H{H:02d}"


def exp5(kind: str, H: int) -> ZooEntry:
    if kind == "attn":
        return assoc_entry(exp5_name(kind, H), aot_config(70, 10, H, 10), EXP5_LAW, EXP5_ATTN_RECIPE,
                           f"paper experiment 5: N=70 (262,144 sampled), d=d_h=10, attention only, H={H}",
                           reference_seeds=(0,) if H in EXP5_REFERENCE_POINTS else (),
                           extra={"paper_accuracy": PAPER_EXP5_ATTN.get(H)})
    W = exp5_width(H)
    return assoc_entry(exp5_name(kind, H), aot_config(70, 10, 1, 10, d_mlp=W), EXP5_LAW, EXP5_MLP_RECIPE,
                       f"paper experiment 5: N=70 (262,144 sampled), d=d_h=10, 1 head + MLP width {W} (~ {H} heads)",
                       reference_seeds=(0,) if H in EXP5_REFERENCE_POINTS else (),
                       extra={"paper_accuracy": PAPER_EXP5_MLP.get(H), "width": W})


def n_params(entry: ZooEntry) -> int:
    """Trainable parameters of an entry's model (what experiment 5 pairs)."""
    return entry.config.n_params(trainable_only=True)


# --- experiment 6: capacity against H d_h (N = 10, d = d_h = 2) ------------------------------------------

PAPER_EXP6 = {1: 0.33045312500000007, 5: 0.49689453125, 9: 0.6333925781249999, 13: 0.733966796875,
              17: 0.8567089843750001, 21: 0.8577714843749998}  # Data_exp_6.csv (mean of 20 runs)
EXP6_HEADS = tuple(PAPER_EXP6)
EXP6_REFERENCE_POINTS = (1, 9, 21)
EXP6_TABLE = {"kind": "associations", "N": 10, "S": 2, "seed": 0, "version": DATA_VERSION}
EXP6_LAW = {"kind": "empirical", "base": EXP6_TABLE, "n": 16_384, "seed": 0, "version": DATA_VERSION}


def exp6_name(H: int) -> str:
    return f"assoc_exp6_H{H:02d}"


def exp6(H: int) -> ZooEntry:
    return assoc_entry(exp6_name(H), aot_config(10, 2, H, 2), EXP6_LAW, EXP1_RECIPE,
                       f"paper experiment 6: N=10 (16,384 sampled), d=d_h=2, H={H}",
                       reference_seeds=(0,) if H in EXP6_REFERENCE_POINTS else (),
                       extra={"paper_accuracy": PAPER_EXP6.get(H)})


# --- the seed notebook's cells --------------------------------------------------------------------------

# The superposition / Proposition 1 setting: N = 10, the next token is one chosen token with
# probability 0.95 (last_position_law with k = 0), d = d_h = 5; trained full batch on the exact loss.
SUPER_LAW = {"kind": "last_position", "nb_tokens": [10, 10], "N": 10, "k": 0.0, "p": 0.95, "seed": 0,
             "version": DATA_VERSION}
SUPER_RECIPE = AssocRecipe(steps=5000, lr=1e-3, batch_size=0, loss="next_token", eval_every=250)


def superposition_model(H: int) -> ZooEntry:
    cfg = AssocConfig(d_vocab=10, n_ctx=2, d_model=5, n_heads=H, d_head=5)
    return assoc_entry(f"assoc_super_H{H:02d}", cfg, SUPER_LAW, SUPER_RECIPE,
                       f"last-position law N=10 p=0.95, d=d_h=5, H={H}", reference_seeds=(0,))


# The freezing cell: N = 10 deterministic bigrams (power_unif_law([1,1,1], [N, N, 1])), d = 5, 20 heads
# of width 5; Adam lr 1e-3 on 5,000 batches of 1,024 sequences.
FREEZE_LAW = {"kind": "power_unif", "alphas": [1.0, 1.0, 1.0], "nb_tokens": [10, 10, 1], "N": 10, "seed": 0,
              "version": DATA_VERSION}
FREEZE_RECIPE = AssocRecipe(steps=5000, lr=1e-3, batch_size=1024, loss="next_token", eval_every=250)
FREEZERS = {"none": (), "train_O_only": ("E", "pos", "QKV", "U"), "freeze_O": ("O",),
            "all": ("E", "pos", "QKV", "O", "U")}


def freezing_model(freezer: str) -> ZooEntry:
    cfg = AssocConfig(d_vocab=10, n_ctx=2, d_model=5, n_heads=20, d_head=5, freeze=FREEZERS[freezer])
    return assoc_entry(f"assoc_freeze_{freezer}", cfg, FREEZE_LAW, FREEZE_RECIPE,
                       f"N=10 bigrams, d=5, 20 heads, frozen: {FREEZERS[freezer] or 'nothing'}", reference_seeds=(0,))


# The skip-connection cell: N = 100, 40 x 40 input pairs each with one next token, d = 10, 10 heads of
# width 10, with and without the residual connection; Adam lr 1e-3 on 5,000 batches of 1,024.
SKIP_LAW = {"kind": "power_unif", "alphas": [1.0, 1.0, 1.0], "nb_tokens": [40, 40, 1], "N": 100, "seed": 0,
            "version": DATA_VERSION}
SKIP_RECIPE = AssocRecipe(steps=5000, lr=1e-3, batch_size=1024, loss="next_token", eval_every=250)
SKIP_SEEDS = (0, 1)


def skip_model(residual: bool) -> ZooEntry:
    cfg = AssocConfig(d_vocab=100, n_ctx=2, d_model=10, n_heads=10, d_head=10, residual=residual)
    return assoc_entry(f"assoc_skip_{'residual' if residual else 'no_residual'}", cfg, SKIP_LAW, SKIP_RECIPE,
                       f"N=100, 1600 associations, d=10, 10 heads, residual={residual}", reference_seeds=SKIP_SEEDS)


# --- the low-rank optima (Proposition 1's "optimal baseline") --------------------------------------------


@dataclass(frozen=True)
class LowRankConfig:
    N: int
    S: int
    d: int
    restarts: int = 16
    seed: Optional[int] = None  # unused: the optimum is the best of fixed restarts

    def to_dict(self) -> dict:
        return {"N": self.N, "S": self.S, "d": self.d, "restarts": self.restarts}


@dataclass(frozen=True)
class LowRankRecipe:
    steps: int = 2000
    lbfgs_steps: int = 500

    def to_dict(self) -> dict:
        return {"steps": self.steps, "lbfgs_steps": self.lbfgs_steps}


def _low_rank_spec(entry: ZooEntry, seed: int) -> dict:
    c, r = entry.config, entry.recipe
    return {"kind": "low_rank_optimum", "law": entry.data_recipe, "d": c.d, "restarts": c.restarts, "steps": r.steps,
            "lbfgs_steps": r.lbfgs_steps, "train_code": TRAIN_CODE_VERSION, "torch": _torch_version()}


def _low_rank_build(config: LowRankConfig, seed: int) -> LowRank:
    return LowRank(config.N, config.S, config.d)


def _low_rank_train(entry: ZooEntry, seed: int, progress=None):
    t0 = time.perf_counter()
    c, r = entry.config, entry.recipe
    opt = low_rank_optimum(make_law(entry.data_recipe), c.d, seeds=tuple(range(c.restarts)), steps=r.steps,
                           lbfgs_steps=r.lbfgs_steps)
    return opt.model, {"divergence": opt.divergence, "closed_form": opt.closed_form, "trained": opt.trained,
                       "metrics": {"divergence": opt.divergence}, "wall_time": round(time.perf_counter() - t0, 3)}


def low_rank_name(law: dict, d: int) -> str:
    return f"assoc_lowrank_{law['kind']}_d{d}"


def low_rank_entry(law: dict, d: int) -> ZooEntry:
    """The best rank-d factorisation of a law's log-probabilities (16 restarts and the closed form)."""
    base = make_law(law)
    return ZooEntry(name=low_rank_name(law, d), description=f"rank-{d} optimum of the {law['kind']} law (baseline)",
                    config=LowRankConfig(base.N, base.S, d), recipe=LowRankRecipe(), data_recipe=law,
                    build_model=_low_rank_build, train_fn=_low_rank_train, spec_fn=_low_rank_spec,
                    family="assoc-baseline", reference_seeds=(0,))


# --- the registry's view ------------------------------------------------------------------------------------


def zoo_entries() -> list[ZooEntry]:
    """Every associative-memory entry, for the zoo's discovery."""
    out = [exp1(H) for H in EXP1_HEADS]
    out += [exp2(dh) for dh in PAPER_EXP2]
    out += [exp3(d) for d in PAPER_EXP3]
    out += [exp5(kind, H) for kind in ("attn", "mlp") for H in EXP5_HEADS]
    out += [exp6(H) for H in EXP6_HEADS]
    out += [superposition_model(H) for H in (5, 20)]
    out += [freezing_model(f) for f in FREEZERS]
    out += [skip_model(r) for r in (True, False)]
    out += [low_rank_entry(SUPER_LAW, d) for d in (5, 4)]
    return out


def write_references(names: Optional[list] = None, reference_dir: Path = REFERENCE_DIR, log=print) -> None:
    """Train (or take from the store) and write the committed references of the family."""
    from circuits.zoo import registry as zoo
    from circuits.zoo.store import ModelStore

    store = ModelStore()
    entries = {e.name: e for e in zoo_entries()}
    for entry in [entries[n] for n in names] if names else entries.values():
        for seed in entry.ref_seeds():
            loaded = zoo.load(entry.name, seed, retrain=True, store=store)
            zoo.save_reference(loaded, reference_dir)
            metrics = {k: round(v, 4) for k, v in (loaded.card.get("metrics") or {}).items() if isinstance(v, float)}
            log(f"{entry.reference_name(seed)}: {loaded.source}, {loaded.card.get('wall_time')} s, {metrics}")
