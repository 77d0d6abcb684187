"""Hypotheses (seed 000, causal scrubbing): Redwood Research's "Causal Scrubbing: Results on a Paren
Balance Checker" (2022), written with `circuits.analysis.scrub` and checked on the published checkpoint (the
write-up's own model) and on our `brackets` model.

The write-up's hypotheses (heads "l.h"; "count" = the count test, as many "(" as ")"; "horizon" = the
right-to-left horizon test, no suffix with more "(" than ")"; every unnamed path reads one random
input):

* 1a: heads 1.0 and 2.0 compute the count test, 2.1 the horizon test: their direct paths to the
  logits read inputs agreeing on those tests.
* 1b: as 1a, with "starts with '('" added to what 1.0 and 2.0 read (count test AND starts open).
* 2a: as 1b, and 1.0 and 2.0 read only their input at position 1, and there only head 0.0's output
  (agreeing on p1 = the open proportion if the string starts with "(", one class otherwise) and the
  token embedding (agreeing on starts-with-"(").
* 2b: as 2a, with head 0.0's output at position 1 written as phi(p) + remainder, phi(p) = v (2p - 1)
  reading an input that agrees on p1 and the remainder unnamed. v is the write-up's "open vector":
  half the difference of head 0.0's OV output on "(" and on ")" (each through its LayerNorm, with the
  positional embeddings of positions 1..40, averaged).
* 3a: as 1b, and 2.1 reads each position i of its input from an input agreeing on the horizon class
  of position i (pad / end after "(" / end after ")" / suffix open proportion > 1/2 / <= 1/2), its
  mask from an input of the same length, and its direct path on "every position passes".
* 3b: as 3a with the *adjusted* open proportion at each position. The write-up's adjustment (an
  attention-weighted proportion from head 0.0's typical attention per input length) is not fully
  public; we use head 0.0's actual attention at that position on that input: the open proportion
  as head 0.0 weighs the brackets there.

Where the write-up leaves an implementation detail open, scrub.py's docstring says what we chose
(one random input per hypothesis node for its unnamed parts; the mask follows the unnamed parts;
the random-logit baseline uses the root's random input). Loss: cross-entropy of the two class
logits at position 0 (the write-up's binary cross-entropy on their difference).

Thresholds come from the write-up's words: its high-level hypotheses (1a-2b) "held up well (88-93%
loss recovered)", so each must recover at least 0.85 (the low end less an allowance for a different
data set); the detailed ones (3a/3b) "did not hold up as well (72%)": at least 0.6, and noticeably
less than 1b (by 0.05 or more).

Specificity and power (issue 30). Recovering the loss is not enough: with 2.0 reading a random
40-class feature a 1b-like story recovered 0.866, above the 0.85 bar. So a hypothesis holds only when
it also beats its best WRONG VARIANT by MARGIN = 0.05 (the write-up's own resolution) on the paired
bootstrap over draws, with separated intervals. Its wrong variants (`scrub.wrong_variants`): each named
path's feature, and each named input's (2a/2b: 0.0 and the embedding at position 1), replaced by an
independent copy of the same distribution (its values permuted across strings), and each named head
replaced by the unnamed heads of the nearest layer at or below it (1.1 here). Each test declares the
paths it is about (`@pytest.mark.about("path:L1H0", ...)`), whose derived mutations (the head dead:
`zero_ablate`; swapped with its sibling: `swap_head`) must fail it: a mutant scrubs only its own
hypothesis and the wrong variants that touch the mutated heads (a subset of the variants, so a mutant
can only look better than with all of them), and each mutant's ScrubData is built once and shared by
the hypotheses that mutate the same head. Hand-written controls as before: the count heads' and the
horizon head's features swapped, and the count heads' feature shuffled.
Known failures: the module's KNOWN_FAILURES table. Resampling draws come from --circuits-draws-seed.

Data: the published 5,000 strings (`bracket_data`, 46% balanced) and 5,000 strings of an
originators'-style distribution (`brackets.generate_originators_style`: 26% balanced, unbalanced
strings uniformly random), where the write-up measured. Our model: the same hypotheses with the
count head of the existing role search (`find_roles`) in place of 2.0 and its negative head in place
of 2.1 (1.0 and 0.0 by index), recorded as they come out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import pytest

from circuits.analysis import measures as A
from circuits.analysis import scrub as S
from circuits.claims.controls import register_control
from circuits.tasks.brackets import data as B
from circuits.tasks.brackets.scrubbing import scrub_hypotheses
from circuits.tasks.brackets.subjects import find_roles

N_DRAWS = 5
HIGH_LEVEL, DETAILED, DETAILED_GAP = 0.85, 0.6, 0.05
# a hypothesis must recover at least this much more than its best wrong variant: the write-up's own
# resolution (it tells its hypotheses apart in steps of ~5 points: 88-93% against 72%), as DETAILED_GAP
MARGIN = 0.05
# each named head is replaced by the unnamed heads of the nearest layer at or below its own (1.1 for every
# named head here): over every unnamed head, on the published data, the nearest was the best replacement
# for each named head of 1a, 1b, 2a and 2b (README), at a quarter of the scrubs
REPLACE_HEADS = "nearest"
HYPOTHESES = ["1a", "1b", "2a", "2b", "3a", "3b"]


@lru_cache(maxsize=1)
def originators_data() -> B.BracketData:
    return B.generate_originators_style(5000, seed=19)


_RESULTS: dict = {}
# the ScrubData kept (least recently used first out): each holds the model's run on 5,000 strings,
# ~0.5 GB; kept all session, the ten of a run held 8.9 GB at the end. Two unmutated (model, data)
# pairs cover this module's order (the published checkpoint's tests on one data set, then the other;
# ours alternating the two), one mutant the tests of one mutation (dropped at the next unmutated
# model's test). A ScrubData dropped and needed
# again is built again: the same numbers (a scrub's results depend on the model, data and seed only)
_DATA: dict = {}
_MUTANT_DATA: dict = {}
KEEP_DATA, KEEP_MUTANT_DATA = 2, 1


def _scrub_data(model, data: B.BracketData, mutant=None) -> S.ScrubData:
    """One ScrubData (the model's run on the data, which every scrub gathers from) per (model function,
    data): the six hypotheses' tests, their controls and their wrong variants share it, and so do the
    tests that mutate the same head the same way (a head swap is one mutant for both heads).
    ``mutant``: the unmutated model, when ``model`` is a mutant of it: the mutant's run takes the
    layers before the mutated one from the unmutated model's (``ScrubData(like=...)``), where kept."""
    store, keep = (_MUTANT_DATA, KEEP_MUTANT_DATA) if mutant is not None else (_DATA, KEEP_DATA)
    if mutant is None:
        _MUTANT_DATA.clear()  # a mutation's tests run one after another: past them, its run is not read again
    key = (A.weights_digest(model), id(data))
    sd = store.pop(key, None)
    if sd is None:
        while len(store) >= keep:
            store.pop(next(iter(store)))  # the least recently used, before the new one's run
        like = None if mutant is None else _DATA.get((A.weights_digest(mutant), id(data)))
        sd = S.ScrubData(model, data.toks, data.isbal.long(), like=like)
    store[key] = sd  # the most recently used
    return sd


def scrubbed(model, data: B.BracketData, hyps: dict, seed: int, mutant=None) -> dict:
    """name -> ScrubResult for each hypothesis in ``hyps`` (name -> Hypothesis), each scrubbed once per
    (model function, data, seed) in a session; every name with the same seed sees the same draws."""
    digest = A.weights_digest(model)
    todo = [h for n, h in hyps.items() if (digest, id(data), n, seed) not in _RESULTS]
    if todo:
        for r in S.scrub(model, _scrub_data(model, data, mutant), None, todo, n_draws=N_DRAWS, seed=seed):
            _RESULTS[(digest, id(data), r.name, seed)] = r
    return {n: _RESULTS[(digest, id(data), n, seed)] for n in hyps}


_BUILT: dict = {}


def built(model, data: B.BracketData, count_heads: list, horizon_head: str, seed: int = 0,
          names=HYPOTHESES) -> dict:
    """`scrub_hypotheses` for ``names`` (and their controls), each built once per (model function, data,
    heads, seed): its feature tensors stay the same objects, so the samplers built on them are shared. A
    mutant's test asks for its one hypothesis: the others' features (3b's runs the model) are not built."""
    key = (A.weights_digest(model), id(data), tuple(count_heads), horizon_head, seed)
    have = _BUILT.setdefault(key, {})
    missing = [n for n in names if n not in have]
    if missing:
        have.update(scrub_hypotheses(model, data, count_heads, horizon_head, seed, names=missing))
    return have


class _Results(Mapping):
    """name -> ScrubResult of each hypothesis and control, each built and scrubbed when first read (once
    per (model, data, seed) in a session, `scrubbed`): a test scrubs what its claims read. A result
    depends on the model, data, hypothesis and seed only (each draw's generator is seeded by the
    seed and the draw), not on which others are scrubbed with it."""

    def __init__(self, model, data, count_heads, horizon_head, seed, mutant):
        self.args = (model, data, count_heads, horizon_head, seed)
        self.mutant = mutant

    def __getitem__(self, name: str):
        model, data, count_heads, horizon_head, seed = self.args
        hyps = built(model, data, count_heads, horizon_head, seed, [name.split(" ")[0]])
        return scrubbed(model, data, {name: hyps[name]}, seed, self.mutant)[name]

    def __iter__(self):
        return (f"{h}{c}" for h in HYPOTHESES for c in ("", " swapped", " shuffled"))

    def __len__(self):
        return 3 * len(HYPOTHESES)


def results(model, data: B.BracketData, count_heads: list, horizon_head: str, seed: int = 0,
            mutant=None) -> Mapping:
    """Every hypothesis and control, each scrubbed when first read, once per (model, data, seed).
    ``mutant``: the unmutated model where the model is a mutation's (its ScrubData is kept only while
    its tests run)."""
    return _Results(model, data, count_heads, horizon_head, seed, mutant)


def variants(model, data: B.BracketData, name: str, count_heads: list, horizon_head: str, seed: int,
             touching: set | None = None, mutant=None) -> dict:
    """The wrong variants of hypothesis ``name`` (scrub.wrong_variants: each named path's feature, and
    each named input's, replaced by an independent copy; each named direct-path head replaced by every
    head the hypothesis does not name, where it can read the named inputs), scrubbed on the same draws.
    ``touching``: only the variants that change the story of one of these heads (a mutation run)."""
    hyp = built(model, data, count_heads, horizon_head, seed, [name])[name]
    chosen = [v for v in S.wrong_variants(hyp, model, seed=seed, replace_heads=REPLACE_HEADS)
              if touching is None or v.touches & touching]
    return scrubbed(model, data, {v.hypothesis.name: v.hypothesis for v in chosen}, seed, mutant)


@dataclass(frozen=True)
class Which:
    """Which scrubbed hypothesis a claim reads: the hypothesis itself, or (under this module's two
    controls) the same hypothesis with the heads' features swapped or the count feature shuffled."""

    key: str


register_control("swap_features", kind="data", accepts=lambda o: isinstance(o, Which),
                 fn=lambda w, seed=0: Which(f"{w.key} swapped"),
                 description="the count heads read the horizon test and the horizon head the count test")
register_control("shuffle_feature", kind="data", accepts=lambda o: isinstance(o, Which),
                 fn=lambda w, seed=0: Which(f"{w.key} shuffled"),
                 description="the count heads' feature replaced by a shuffled copy")


def _check(claim, control, res: dict, name: str, where: str, wrong):
    """The hypothesis recovers what the write-up says it should AND beats its best wrong variant
    (``wrong()``: their results) by MARGIN, with separated intervals."""
    which = control.apply_data(Which(name))
    threshold = DETAILED if name.startswith("3") else HIGH_LEVEL
    # under a data control: the relabelled hypothesis, against the true one's wrong variants
    S.scrub_holds_claim(claim, f"{name} on {where}", res[which.key], threshold, lambda: list(wrong().values()),
                        MARGIN)
    if name.startswith("3") and control.is_main:  # how much less than 1b: a property of 3a/3b themselves
        claim.at_least(f"{name} on {where}: recovered(1b) - recovered({name})",
                       res["1b"].recovered.point - res[name].recovered.point, DETAILED_GAP)


def _mutated_heads(control) -> set | None:
    """The heads a path mutation changes (None on the main run: every variant counts). A swap moves
    both heads of the pair."""
    if control.kind != "model" or control.is_main:
        return None
    heads = {a for a in control.args if a.startswith("L")}
    if control.name == "swap_head":
        heads |= {f"L{a[1:a.index('H')]}H{(int(a[a.index('H') + 1:]) + 1) % 2}" for a in heads}
    return heads


# Measured on the published checkpoint (5 draws x 5,000 strings): the claims that do not hold there.
# The plugin appends this run's measurement to each reason. 3a holds on its own but not against its
# feature-swap control (no teeth): those control runs are the known failures.
def _weak(name: str, where: str, value: str, best: str, margin: str) -> str:
    return (f"{name} recovers {value} on the {where} data, but beats its best wrong variant ({best}) by only "
            f"{margin} < {MARGIN}: that path's story is not told apart from an independent feature of the same "
            "distribution (or another head) at the write-up's resolution")


KNOWN_FAILURES = {
    # the wrong variants (seed of this module's draws, 5 draws x 5,000 strings; README has every variant)
    "test_arena_scrubbing_published[1a]": _weak("1a", "published", "0.921 [0.918, 0.924]",
                                                "1.0 reads an independent feature, 0.876", "0.045 [0.044, 0.047]"),
    "test_arena_scrubbing_published[3a]": _weak("3a", "published", "0.738 [0.732, 0.744]",
                                                "1.0 replaced by 1.1, 0.696", "0.042 [0.040, 0.044]"),
    "test_arena_scrubbing_published_pos1[2a]": _weak("2a", "published", "0.868 [0.864, 0.872]",
                                                     "0.0 read by 2.0 at position 1 is an independent feature, 0.862",
                                                     "0.006 [0.005, 0.006]"),
    "test_arena_scrubbing_published_pos1[2b]": _weak("2b", "published", "0.870 [0.868, 0.874]",
                                                     "0.0 read by 2.0 at position 1 is an independent feature, 0.863",
                                                     "0.007 [0.006, 0.008]"),
    "test_arena_scrubbing_originators[1a]": _weak("1a", "originators'-style", "0.884 [0.881, 0.888]",
                                                  "1.0 replaced by 1.1, 0.851", "0.033 [0.031, 0.036]"),
    "test_arena_scrubbing_originators[1b]": _weak("1b", "originators'-style", "0.931 [0.928, 0.934]",
                                                  "1.0 reads an independent feature, 0.883", "0.048 [0.046, 0.050]"),
    "test_arena_scrubbing_originators[3a]": _weak("3a", "originators'-style", "0.740 [0.737, 0.743]",
                                                  "1.0 replaced by 1.1, 0.705", "0.035 [0.033, 0.037]"),
    "test_arena_scrubbing_originators_pos1[2a]": "2a needs >= 0.85 (write-up: 87%); on the originators'-style "
                                                 "data it recovers a little less (0.837 [0.833, 0.839]), and its best "
                                                 "wrong variant 0.832",
    "test_arena_scrubbing_originators_pos1[2b]": "2b needs >= 0.85 (write-up: 88%); on the originators'-style "
                                                 "data it recovers a little less (0.840 [0.838, 0.842]), and its best "
                                                 "wrong variant 0.835",
    "test_arena_scrubbing_published[3b]": "3b needs >= 0.6 (write-up: 72% for its detailed hypotheses) with our "
                                          "substitute for the write-up's adjusted proportion (head 0.0's attention): "
                                          "0.391 [0.383, 0.399], below its own wrong variant 2.1 replaced by 1.1 (0.579)",
    "test_arena_scrubbing_originators[3b]": "3b needs >= 0.6, with our substitute adjusted proportion",
    # our reference model (roles bound on the search split: count head L2H0 with 1.0, negative head L2H1):
    # every hypothesis refuted, as the head-level bracket claims are (its last MLP carries the decision)
    **{f"test_ours_scrubbing[{name}-{where}]": f"{name} on our model: its last MLP carries the decision, not "
                                               "the seed's heads"
       for name in HYPOTHESES for where in ("published", "originators")},
}


def _data(bracket_data, where):
    return bracket_data if where == "published" else originators_data()


@pytest.fixture(scope="module")
def scrub_seed(circuits_options):
    """The resampling seed of this module's scrubs: one per run, changed by --circuits-draws-seed."""
    return circuits_options.shared_draws(__name__).int()


ARENA_HEADS = (["L1H0", "L2H0"], "L2H1")  # the write-up's count heads 1.0 and 2.0, horizon head 2.1


def _arena_test(names: list, where: str, paths: tuple):
    """A test of the write-up's hypotheses ``names`` on the published checkpoint and data set
    ``where``, about the heads whose paths they name: each must fail with a named head dead or
    swapped with its sibling (the derived mutations), against the wrong variants that touch it."""
    @pytest.mark.about(*(f"path:{h}" for h in paths))
    @pytest.mark.controls("swap_features", "shuffle_feature")
    @pytest.mark.parametrize("name", names)
    def test(arena_model, bracket_data, claim, control, scrub_seed, name):
        model, data = control.apply_model(arena_model), _data(bracket_data, where)
        touching = _mutated_heads(control)
        # a mutant scrubs only this hypothesis (and the variants touching the mutated heads)
        mutant = arena_model if touching is not None else None
        res = results(model, data, *ARENA_HEADS, scrub_seed, mutant=mutant)
        _check(claim, control, res, name, where,
               lambda: variants(model, data, name, *ARENA_HEADS, scrub_seed, touching, mutant))

    test.__doc__ = (f"The write-up's hypotheses {', '.join(names)} on the published checkpoint, {where} data: "
                    f"recovered >= the write-up's bar, and >= {MARGIN} above the best wrong variant, intervals "
                    f"separated. About the paths of {', '.join(paths)}.")
    return test


# 1a, 1b, 3a, 3b name the direct paths of 1.0, 2.0 and 2.1; 2a and 2b also head 0.0's output at position 1
test_arena_scrubbing_published = _arena_test(["1a", "1b", "3a", "3b"], "published", ("L1H0", "L2H0", "L2H1"))
test_arena_scrubbing_published_pos1 = _arena_test(["2a", "2b"], "published", ("L0H0", "L1H0", "L2H0", "L2H1"))
test_arena_scrubbing_originators = _arena_test(["1a", "1b", "3a", "3b"], "originators", ("L1H0", "L2H0", "L2H1"))
test_arena_scrubbing_originators_pos1 = _arena_test(["2a", "2b"], "originators",
                                                    ("L0H0", "L1H0", "L2H0", "L2H1"))


@pytest.fixture
def head_roles(brackets_model):
    """Our model's roles, bound on the unmutated model (the role search's own split): what the
    mutations of ``path:count_head`` / ``path:negative_head`` name."""
    return find_roles(brackets_model)


@pytest.mark.about("path:L1H0", "path:count_head", "path:negative_head")
@pytest.mark.controls("swap_features", "shuffle_feature")
@pytest.mark.parametrize("where", ["published", "originators"])
@pytest.mark.parametrize("name", HYPOTHESES)
def test_ours_scrubbing(brackets_model, bracket_data, claim, control, scrub_seed, name, where):
    """The same hypotheses on our model, with the heads bound on the role search's own split."""
    roles = find_roles(brackets_model)
    mutant = brackets_model if control.kind == "model" and not control.is_main else None
    brackets_model = control.apply_model(brackets_model)  # a path's mutation; roles stay the unmutated model's
    count = A.head_label(*roles["count_head"])
    heads = ["L1H0"] + ([count] if count != "L1H0" else [])
    horizon = A.head_label(*roles["negative_head"])
    data = _data(bracket_data, where)
    res = results(brackets_model, data, heads, horizon, scrub_seed, mutant=mutant)
    _check(claim, control, res, name, where,
           lambda: variants(brackets_model, data, name, heads, horizon, scrub_seed, mutant=mutant))
