"""Subjects for the bracket hypotheses (hypotheses/test_brackets*.py, tests/test_reparametrisation.py):
the published ARENA checkpoint and our own trained models, as pytest fixture mixins.

A subject bundles a model (after the test's control or mutation), the heads bound to the roles the
hypotheses talk about, the evaluation strings, and a note saying how the binding was made.

Bindings. On the ARENA checkpoint the roles are pinned to the seed's heads 2.0 and 2.1 (nothing is
searched). On our models `find_roles` searches on the SEARCH split (`search_data()`: the first
N_SEARCH distinct published strings that are not among the 5,000 evaluation strings) and the claims
score the binding on the evaluation strings, a disjoint held-out split; claims that decide whether
the bound head does its job use a Bonferroni-corrected interval (level 1 - 0.05 / k, k = the heads
the role's search scanned). The search always runs on the unmutated model (session-scoped memo,
`head_roles` built from the zoo's own model), so a control or mutation run is scored under the
binding of the model it breaks. The ARENA checkpoint and strings come from `circuits.tasks.brackets.reference`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Optional

import numpy as np
import pytest
import torch

from circuits.analysis import interventions as I
from circuits.analysis import measures as A
from circuits.analysis import roles as R
from circuits.claims.controls import register_control
from circuits.model.transformer import HookedTransformer
from circuits.tasks.brackets import data as B
from circuits.tasks.brackets.reference import ARENA_ROLES, N_EVAL, arena_data


def reference_data(n: Optional[int] = N_EVAL) -> B.BracketData:
    return arena_data(n)


# rows per length bucket for a model without hooks (Analysis.batch_size, predictions_on_all): a
# block's activations then stay in cache (ARENA checkpoint, one thread, glibc keeping freed memory as
# the main job does: the 50k distinct strings 3.56 s at 500 rows, 3.30 at 250, 3.21 at 128)
BUCKET_ROWS = 128


class Analysis:
    """Everything the claims read about one model on the evaluation strings, each computed on first
    use and then kept: a control that only needs logits never pays for the activation cache."""

    def __init__(self, model: HookedTransformer, data: B.BracketData):
        self.model, self.data = model, data

    @cached_property
    def batch_size(self) -> int:
        """Rows per run. A model with a hook on it runs all evaluation strings in one batch: a
        mean-ablation mutation's batch mean is then the mean over all of them, not over length-sorted
        chunks (which would keep length, hence imbalance, in it). A model without one computes each
        row on its own, so it runs in length buckets of BUCKET_ROWS: the 5,000 strings average 18 of
        42 positions, and the buckets skip the padding and keep a block's activations in cache (ARENA
        checkpoint, one thread, at 500 rows: logits 1.17 -> 0.26 s, the decomposition's cache 1.58 ->
        0.42 s; the values agree to 2.3e-6, float rounding of GEMMs over other widths)."""
        return len(self.data) if A.has_hooks(self.model) else BUCKET_ROWS

    @cached_property
    def logits(self) -> torch.Tensor:  # [batch, 2]
        return A.predict(self.model, self.data.toks, lengths=self.data.lengths + 2, batch_size=self.batch_size)

    @cached_property
    def cache(self):
        """The decomposition's activations at position 0 (the read-out), which every claim here reads.
        No attention pattern: one claim reads one layer's (`attention_from_query_0`), and caching every
        layer's for every model cost about a third of each such run (ARENA checkpoint, 5,000 strings)."""
        return self._run(A.decomposition_names(self.model))

    def _run(self, names: list):
        return A.run_in_batches(self.model, self.data.toks, names=names, keep=A.at_position(0),
                                lengths=self.data.lengths + 2, batch_size=self.batch_size)

    def attention_from_query_0(self, layer: int, head: int) -> torch.Tensor:
        """Attention probabilities of head (layer, head) from position 0: [batch, key_pos] (a run of its
        own per layer, computing that layer's pattern only; the same forward and pattern function as a
        cache with every layer's)."""
        if layer not in self._patterns:
            self._patterns[layer] = self._run([f"blocks.{layer}.attn.hook_pattern"])
        return A.attention_from(self._patterns[layer], layer, head, query=0)

    @cached_property
    def _patterns(self) -> dict:
        return {}

    @cached_property
    def _fit(self):
        x, y = A.ln_final_io(self.cache, pos=0)
        return A.linear_fit(x, y)

    @property
    def r2(self) -> float:
        return self._fit[1]

    @cached_property
    def direction(self) -> torch.Tensor:
        """The unbalanced-minus-balanced logit direction pulled back through the final-LN fit: [d_model]."""
        return A.pull_back(self._fit[0], A.logit_direction(self.model, 0, 1))

    @cached_property
    def _contributions(self):
        values, labels = A.component_contributions(self.cache, self.direction, pos=0)
        values = values - values[:, self.data.isbal].mean(1, keepdim=True)  # the seed's centring
        return values.float(), labels

    @property
    def contributions(self) -> torch.Tensor:  # [component, batch], balanced mean subtracted
        return self._contributions[0]

    @property
    def labels(self) -> list:
        return self._contributions[1]


_MEMO = A.ModelMemo()  # per model function: the analyses and the 100k predictions


def analyse(model: HookedTransformer, data: B.BracketData) -> Analysis:
    return _MEMO.get(model, ("analysis", id(data), len(data)), lambda: Analysis(model, data))


def mean_ablated_logits(model, data, head: tuple[int, int]) -> torch.Tensor:
    """`A.predict(batch_mean_ablate_head(model, *head), toks, lengths, one batch)`, with the blocks
    before the ablated head (and before any earlier permanent hook: `I._resume_layer`) run once per
    model for all heads of a layer: the mutant resumes there from the model's own residual on the
    same batch (the same rows, order and width as predict's one length bucket; the embedding's pad
    tracker refired). Bitwise where the model has a hook; a hook-free model's residual is captured in
    length buckets, equal to float rounding (tests/test_fast_paths.py).
    (hypotheses/test_brackets.py: the sibling-ablation claims, two heads of a layer per model.)"""
    mutant = I.batch_mean_ablate_head(model, *head)
    layer = I._resume_layer(mutant, [f"blocks.{head[0]}.attn.hook_z"])
    if not layer:
        return A.predict(mutant, data.toks, lengths=data.lengths + 2, batch_size=len(data))
    (rows, width), = A.length_buckets(data.lengths + 2, len(data), len(data))
    x = data.toks[rows, :width]
    name = f"blocks.{layer}.hook_resid_pre"
    key = (A.weights_digest(model), name, id(data))
    if _RESID.get("key") != key:  # one entry (~47 MB for the 5,000 strings): the heads of a layer come together
        # a hook-free model's rows are their own: captured in length buckets (~4x faster; the resumed
        # mutant reads padded positions only as masked keys, and its batch means skip them)
        capture = I.capture_activations if A.has_hooks(model) else I.capture_by_length
        _RESID.update(key=key, resid=capture(model, x, [name])[name])
    resid = _RESID["resid"]
    with torch.no_grad():
        part = mutant(x, start_at_layer=layer, resid=resid)
    out = part.new_empty((len(data), *part.shape[1:]))
    out[rows] = part
    return out


_RESID: dict = {}  # the last model's residual before its mean-ablated layer (mean_ablated_logits)


def predictions_on_all(model: HookedTransformer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted is-balanced, label, count) per distinct string of the full 100k file: half the
    file repeats earlier rows, so each distinct string is classified once and weighted by its count."""
    def compute():
        strs, labels, counts = distinct_reference_strings()
        toks = B.tokenize(strs)
        lengths = torch.tensor([len(s) + 2 for s in strs])
        rows = 500 if A.has_hooks(model) else BUCKET_ROWS  # a hooked model's batches as they always were
        return A.predict(model, toks, lengths=lengths, batch_size=rows).argmax(-1).bool(), labels, counts

    return _MEMO.get(model, "predictions_on_all", compute)


@lru_cache(maxsize=1)
def distinct_reference_strings() -> tuple[list, torch.Tensor, torch.Tensor]:
    data = reference_data(None)
    counts: dict[str, int] = {}
    label: dict[str, bool] = {}
    for s, b in zip(data.strs, data.isbal.tolist()):
        counts[s] = counts.get(s, 0) + 1
        label[s] = b
    strs = list(counts)
    return strs, torch.tensor([label[s] for s in strs]), torch.tensor([counts[s] for s in strs], dtype=torch.float64)


def head_contribution(analysis: Analysis, head: tuple[int, int]) -> torch.Tensor:
    return analysis.contributions[analysis.labels.index(A.head_label(*head))]


N_SEARCH = 5000  # strings of the search split


@lru_cache(maxsize=1)
def search_data() -> B.BracketData:
    """The role search's split: the first N_SEARCH distinct published strings that are not among the
    evaluation strings (held out from every claim)."""
    return B.distinct_rows(reference_data(None), exclude=reference_data().strs, n=N_SEARCH)


def find_roles(model: HookedTransformer, data: Optional[B.BracketData] = None) -> dict:
    """Bind roles by search on `data` (default: the search split, disjoint from the evaluation
    strings): the count head is the head whose contribution best separates total-elevation
    failures (AUROC among strings starting with "("); the negative head is the other head that best
    separates negative failures. Searched once per model (every test asks)."""
    return R.search(model, search_data() if data is None else data, bracket_role_scores)


def candidates_scanned(model: HookedTransformer) -> dict:
    """role -> how many heads its (greedy) search chose among: all heads for the first role, one
    fewer for each role after it."""
    n = len(R.heads(model))
    return {"count_head": n, "negative_head": n - 1}


def bracket_role_scores(model: HookedTransformer, data: B.BracketData) -> dict:
    """role -> head -> AUROC of the head's contribution along the unbalanced direction."""
    an = analyse(model, data)
    values = {hd: head_contribution(an, hd) for hd in R.heads(model)}
    targets = {"count_head": data.total_elevation_failure, "negative_head": data.negative_failure}
    return R.separation_scores(values, targets, where=data.starts_open)


@dataclass
class BracketSubject:
    name: str
    model: HookedTransformer  # after the negative control / mutation
    roles: dict  # role -> (layer, head), bound on the uncontrolled model
    data: B.BracketData = field(repr=False)  # the held-out evaluation strings
    binding: str = ""  # how the roles were bound (for claim notes)
    candidates: dict = field(default_factory=dict)  # role -> heads its search scanned (1: pinned)

    def head(self, role: str) -> tuple[int, int]:
        return self.roles[role]

    def role_label(self, role: str) -> str:
        return f"{role}={A.head_label(*self.roles[role])}"

    def level(self, role: str, alpha: float = 0.05) -> float:
        """Interval level for deciding a claim about a searched role: Bonferroni over the heads
        scanned (picking the best of k must not pass for an effect)."""
        return 1 - alpha / self.candidates.get(role, 1)


class ArenaSubject:
    """Mixin: hypotheses on the published ARENA checkpoint, roles pinned to the seed's heads."""

    @pytest.fixture
    def head_roles(self):
        return dict(ARENA_ROLES)

    @pytest.fixture
    def subject(self, arena_model, bracket_data, head_roles, control):
        roles = control.apply_data(dict(head_roles))  # the swap_roles control rebinds them
        binding = (f"pinned to the seed's heads ({R.describe(head_roles)}); no search; scored on the "
                   f"published evaluation strings (n={len(bracket_data)})")
        return BracketSubject("arena", control.apply_model(arena_model), roles, bracket_data, binding,
                              {role: 1 for role in head_roles})


class OursSubject:
    """Mixin: the same hypotheses on our own brackets zoo model (reference or --circuits-seeds), roles found
    by search on the search split of the uncontrolled model, scored on the held-out strings."""

    @pytest.fixture
    def head_roles(self, zoo_models, zoo_seed, request):
        # the zoo's own (unmutated) model: a mutation run keeps the binding of the model it breaks
        return find_roles(zoo_models.get(request, "brackets", zoo_seed).model)

    @pytest.fixture
    def subject(self, brackets_model, bracket_data, head_roles, zoo_seed, control):
        name = "ours" if zoo_seed is None else f"ours seed {zoo_seed}"
        k = candidates_scanned(brackets_model)
        binding = (f"bound {R.describe(head_roles)} on the search split (n={N_SEARCH} distinct published "
                   f"strings) among {k['count_head']} / {k['negative_head']} heads; scored on the held-out "
                   f"evaluation strings (n={len(bracket_data)})")
        return BracketSubject(name, brackets_model, control.apply_data(dict(head_roles)), bracket_data, binding, k)


# --- the count head's input, resampled from strings that agree on one test ---------------------------


def _sources_in(groups: torch.Tensor, wanted: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each row i, a random source row j with groups[j] == wanted[i] (a cell with no row: error)."""
    source = torch.empty(len(groups), dtype=torch.long)
    for value in wanted.unique():
        targets = torch.nonzero(wanted == value).squeeze(1)
        pool = torch.nonzero(groups == value).squeeze(1)
        if not len(pool):
            raise ValueError(f"no source string in cell {int(value)}")
        source[targets] = pool[torch.randint(len(pool), (len(targets),), generator=gen)]
    return source


def resample_count_head(subject: BracketSubject, control, draws, n_draws: int) -> dict:
    """Resample the count head's key and value at position 1 (strings starting with "(") from: the
    string itself (clean), a random string (baseline), a string agreeing on the count test
    ("count"), one agreeing on the horizon test ("horizon"), and one agreeing on the horizon test but
    not on the count test ("horizon only"). Per-string losses are averaged over n_draws
    draws of sources (streams of `draws`; computed once per model function, head, draws and data
    control: the two resampling tests share them); fractions of the random-resample loss gap
    (:func:`circuits.analysis.loss_recovered`) come with a bootstrap interval over strings
    (:func:`circuits.analysis.loss_recovered_ci`: where the random resample changes no loss, e.g. a
    layer-0 head, whose position-1 key and value are the same in every string starting with "(",
    each is an undefined Estimate naming the losses, which fails its claim). Returns kind ->
    Estimate for "count", "horizon", "horizon only" and "count - horizon", and a "note"."""
    data = subject.data
    rows = torch.nonzero(data.starts_open).squeeze(1)
    toks, labels = data.toks[rows], data.isbal[rows].long()
    count_fails = data.total_elevation_failure[rows].long()
    horizon_fails = data.negative_failure[rows].long()
    own = 2 * count_fails + horizon_fails  # the string's cell
    # the cells sources are drawn by: 2 * (count test fails) + (horizon test fails); shuffle_labels
    # permutes them, which makes 'agreeing' sources random
    cells = control.apply_labels(own)
    layer, head = subject.head("count_head")
    patches = [(f"blocks.{layer}.attn.hook_k", (1, head)), (f"blocks.{layer}.attn.hook_v", (1, head))]
    kinds = ("clean", "random", "count", "horizon", "horizon only")

    def compute():
        # every source set of a draw in ONE forward (the strings repeated once per set): a
        # mean-ablation mutation's batch mean is then the same for all of them, so a mean that moves
        # with the sources cannot pass for the head's input mattering. The clean run is shared by the
        # draws, and each draw's forward resumes at the patched layer (unless the model has hooks)
        groups = []
        for i in range(n_draws):
            gen = draws.child(f"sources {i}").torch()
            groups.append([torch.arange(len(rows)), torch.randint(len(rows), (len(rows),), generator=gen),
                           _sources_in(cells // 2, own // 2, gen),  # same count-test outcome
                           _sources_in(cells % 2, own % 2, gen),  # same horizon-test outcome
                           _sources_in(cells, own ^ 2, gen)])  # same horizon outcome, other count outcome
        losses = {k: [] for k in kinds}
        for outputs in I.resample_together(subject.model, toks, patches, groups):
            for kind, logits in zip(kinds, outputs):
                losses[kind].append(A.cross_entropy_per_example(logits, labels).double().numpy())
        return losses

    # keyed on the cells themselves, not on the control that made them: a data control that leaves the
    # cells alone (swap_roles, a rebind to the same head) shares the computation of the same resampling
    key = ("resampled", (layer, head), draws.seed, n_draws, _tensor_key(cells), id(data))
    losses = _RESAMPLED.get(subject.model, key, compute)  # per model function: a mutant is another model
    per_draw = {k: [float(x.mean()) for x in v] for k, v in losses.items()}
    mean = {k: np.mean(v, 0) for k, v in losses.items()}  # [strings]: mean loss over draws
    seed = draws.child("bootstrap").int()
    out, spread = {}, {}
    # a random resample that changes no loss (the head's position-1 input is the same in every string,
    # e.g. a layer-0 head: position 1 is always "(") leaves no gap: loss_recovered_ci's rule makes each
    # fraction undefined, a failed claim stating the losses (never NaN, never a number)
    gap = dict(clean=mean["clean"], baseline=mean["random"], paired=True, method="percentile", n_resamples=1000,
               seed=seed)
    for kind in ("count", "horizon", "horizon only"):
        out[kind] = A.loss_recovered_ci((mean[kind], mean["clean"], mean["random"]), patched={kind: mean[kind]}, **gap)
        each = [A.loss_recovered(p, c, b) for p, c, b in zip(per_draw[kind], per_draw["clean"], per_draw["random"])]
        ok = [x for x in each if np.isfinite(x)]
        spread[kind] = (f"{min(ok):.3f}..{max(ok):.3f}" if ok else "") + (
            f"{' and ' if ok else ''}undefined (no loss gap) in {len(each) - len(ok)} of {len(each)} draws"
            if len(ok) < len(each) else "")
    out["count - horizon"] = A.loss_recovered_ci((mean["count"], mean["horizon"], mean["clean"], mean["random"]),
                                                 _contrast, patched={k: mean[k] for k in ("count", "horizon")},
                                                 name="recovered(count) - recovered(horizon)", **gap)
    out["note"] = (f"{len(rows)} strings x {n_draws} draws of sources; clean loss "
                   f"{per_draw['clean'][0]:.4g}, random resample {np.mean(per_draw['random']):.4g}; per-draw "
                   f"recovered: count-agreeing {spread['count']}, horizon-agreeing {spread['horizon']}, "
                   f"horizon-only {spread['horizon only']}")
    return out


_RESAMPLED = A.ModelMemo()  # (model function; head, draws, cells, data) -> per-draw losses


def _tensor_key(t: torch.Tensor) -> tuple:
    """A tensor's identity by value (dtype, shape and the sha256 of its bytes), for memo keys."""
    return str(t.dtype), tuple(t.shape), hashlib.sha256(A.tensor_bytes(t)).hexdigest()


def _contrast(count, horizon, clean, baseline, axis=-1):
    return A.loss_recovered(count, clean, baseline, axis=axis) - A.loss_recovered(horizon, clean, baseline, axis=axis)


def _swap_roles(roles: dict, *args, seed: int = 0) -> dict:
    """Rebind the count head to the negative head and vice versa: the 'permuted head' control for
    claims phrased about a role rather than an index."""
    if not isinstance(roles, dict) or {"count_head", "negative_head"} - set(roles):
        raise TypeError("swap_roles applies to a role binding dict with count_head and negative_head")
    return {**roles, "count_head": roles["negative_head"], "negative_head": roles["count_head"]}


register_control("swap_roles", kind="data", fn=_swap_roles,
                 accepts=lambda obj: isinstance(obj, dict) and {"count_head", "negative_head"} <= set(obj),
                 description="exchange the heads bound to the count and negative roles")
