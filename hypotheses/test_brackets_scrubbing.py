"""Hypotheses (seed 000, causal scrubbing): Redwood Research's "Causal Scrubbing: Results on a Paren
Balance Checker" (2022), written with `circuits.scrub` and checked on the published checkpoint (the
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
less than 1b (by 0.05 or more). Controls, measured beside each hypothesis: the features of the count
heads and the horizon head swapped, and the count heads' feature replaced by a shuffled copy; the
hypothesis's own claim must FAIL on each (they are the module's `@pytest.mark.controls`, shown in the
power matrix). For direct paths, swapping the two heads' features is the same test as swapping the
heads' weights (the head-swap mutation), so the controls are targeted, not generic; the derived
mutations themselves would rebuild the scrubbing data per mutant (14 s each), so they are not run here.
Known failures: the module's KNOWN_FAILURES table. Resampling draws come from --circuits-draws-seed.

Data: the published 5,000 strings (`bracket_data`, 46% balanced) and 5,000 strings of an
originators'-style distribution (`brackets.generate_originators_style`: 26% balanced, unbalanced
strings uniformly random), where the write-up measured. Our model: the same hypotheses with the
count head of the existing role search (`find_roles`) in place of 2.0 and its negative head in place
of 2.1 (1.0 and 0.0 by index), recorded as they come out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch

from brackets_subjects import find_roles
from circuits import analysis as A
from circuits import scrub as S
from circuits.controls import register_control
from circuits.session import draws_seed_for
from circuits.tasks import brackets as B

N_DRAWS = 5
HIGH_LEVEL, DETAILED, DETAILED_GAP = 0.85, 0.6, 0.05
HYPOTHESES = ["1a", "1b", "2a", "2b", "3a", "3b"]


@lru_cache(maxsize=1)
def originators_data() -> B.BracketData:
    return B.generate_originators_style(5000, seed=19)


def open_vector(model) -> torch.Tensor:
    """Head 0.0's OV output on "(" minus on ")", halved, averaged over positions 1..40: [d_model]."""
    with torch.no_grad():
        blk = model.blocks[0]
        pos = model.pos_embed.W_pos[1:41]
        def through(tok):
            x = blk.ln1(model.embed.W_E[tok] + pos)
            return (x @ blk.attn.W_V[0] + blk.attn.b_V[0]) @ blk.attn.W_O[0]
        return (through(B.OPEN).mean(0) - through(B.CLOSE).mean(0)) / 2


def adjusted_proportion(model, data: B.BracketData) -> torch.Tensor:
    """[n, pos]: at each position, the open proportion weighted by head 0.0's attention from there."""
    cache = A.run_in_batches(model, data.toks, names=["blocks.0.attn.hook_pattern"])
    pattern = cache["blocks.0.attn.hook_pattern"][:, 0].double()  # [n, q, k]
    is_open = (data.toks == B.OPEN).double()
    is_bracket = is_open + (data.toks == B.CLOSE).double()
    return (pattern @ is_open[:, :, None])[..., 0] / (pattern @ is_bracket[:, :, None])[..., 0]


def build(model, data: B.BracketData, count_heads: list, horizon_head: str, seed: int = 0) -> dict:
    """The write-up's hypotheses and their controls on `data` (name -> Hypothesis)."""
    count = B.count_test(data.toks)
    starts = data.starts_open
    horizon = B.horizon_test(data.toks)
    count_open = count & starts
    p1 = torch.where(starts, data.open_proportion, torch.tensor(-1.0))  # one class if it starts with ")"
    phi = (2 * data.open_proportion - 1)[:, None] * open_vector(model)[None, :]  # [n, d_model]

    def top(cf, hf, count_node=None, horizon_node=None):
        paths = {h: S.Path(cf, count_node or {}) for h in count_heads}
        paths[horizon_head] = S.Path(hf, horizon_node or {})
        return paths

    pos1 = lambda approx: {1: S.Path(count_open, {"0.0": S.Path(p1, approx=approx), "embed": S.Path(starts)})}
    per_pos = lambda feats: {**{i: S.Path(feats[:, i]) for i in range(data.toks.shape[1])},
                             "mask": S.Path(data.lengths)}
    feats3a = B.horizon_features(data.toks)
    feats3b = B.horizon_features(data.toks, adjusted_proportion(model, data))
    specs = {
        "1a": (count, horizon, None, None),
        "1b": (count_open, horizon, None, None),
        "2a": (count_open, horizon, pos1(None), None),
        "2b": (count_open, horizon, pos1(S.Approx(phi, p1)), None),
        "3a": (count_open, (feats3a >= 0).all(-1), None, per_pos(feats3a)),
        "3b": (count_open, (feats3b >= 0).all(-1), None, per_pos(feats3b)),
    }
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (cf, hf, cn, hn) in specs.items():
        out[name] = S.Hypothesis(name, top(cf, hf, cn, hn))
        out[name + " swapped"] = S.Hypothesis(name + " swapped", top(hf, cf, cn, hn))
        shuffled = cf[torch.randperm(len(cf), generator=gen)]
        out[name + " shuffled"] = S.Hypothesis(name + " shuffled", top(shuffled, hf, cn, hn))
    return out


_RESULTS: dict = {}


def results(model, data: B.BracketData, count_heads: list, horizon_head: str, seed: int = 0) -> dict:
    """Every hypothesis and control scrubbed once per (model, data, seed) in a session."""
    key = (A.weights_digest(model), id(data), tuple(count_heads), horizon_head, seed)
    if key not in _RESULTS:
        hyps = build(model, data, count_heads, horizon_head, seed)
        scrubbed = S.scrub(model, data.toks, data.isbal.long(), list(hyps.values()), n_draws=N_DRAWS, seed=seed)
        _RESULTS[key] = {r.name: r for r in scrubbed}
    return _RESULTS[key]


@dataclass(frozen=True)
class Which:
    """Which scrubbed hypothesis a claim reads: the hypothesis itself, or (under this module's two
    controls) the same hypothesis with the heads' features swapped or the count feature shuffled."""

    key: str


register_control("swap_features", kind="data", replace=True, accepts=lambda o: isinstance(o, Which),
                 fn=lambda w, seed=0: Which(f"{w.key} swapped"),
                 description="the count heads read the horizon test and the horizon head the count test")
register_control("shuffle_feature", kind="data", replace=True, accepts=lambda o: isinstance(o, Which),
                 fn=lambda w, seed=0: Which(f"{w.key} shuffled"),
                 description="the count heads' feature replaced by a shuffled copy")


def _check(claim, control, res: dict, name: str, where: str):
    which = control.apply_data(Which(name))
    threshold = DETAILED if name.startswith("3") else HIGH_LEVEL
    S.scrub_claim(claim, f"{name} on {where}", res[which.key], threshold)
    if name.startswith("3") and control.is_main:  # how much less than 1b: a property of 3a/3b themselves
        claim.at_least(f"{name} on {where}: recovered(1b) - recovered({name})",
                       res["1b"].recovered.point - res[name].recovered.point, DETAILED_GAP)


# Measured on the published checkpoint (5 draws x 5,000 strings): the claims that do not hold there.
# The plugin appends this run's measurement to each reason. 3a holds on its own but not against its
# feature-swap control (no teeth): those control runs are the known failures.
KNOWN_FAILURES = {
    "test_arena_scrubbing[2a-originators]": "2a needs >= 0.85 (write-up: 87%); on the originators'-style data it "
                                            "recovers a little less (0.868 on the published data)",
    "test_arena_scrubbing[2b-originators]": "2b needs >= 0.85 (write-up: 88%); on the originators'-style data it "
                                            "recovers a little less (0.868 on the published data)",
    "test_arena_scrubbing[3a-published] control=swap_features": "no teeth: with the count and horizon features "
                                                                 "swapped, 3a still recovers >= 0.6",
    "test_arena_scrubbing[3a-originators] control=swap_features": "no teeth: with the features swapped 3a still "
                                                                   "recovers >= 0.6",
    "test_arena_scrubbing[3b-published]": "3b needs >= 0.6 (write-up: 72% for its detailed hypotheses) with our "
                                          "substitute for the write-up's adjusted proportion (head 0.0's attention)",
    "test_arena_scrubbing[3b-originators]": "3b needs >= 0.6, with our substitute adjusted proportion",
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
    return draws_seed_for(circuits_options.draws_seed, __name__) % 2**31


@pytest.mark.controls("swap_features", "shuffle_feature")
@pytest.mark.parametrize("where", ["published", "originators"])
@pytest.mark.parametrize("name", HYPOTHESES)
def test_arena_scrubbing(arena_model, bracket_data, claim, control, scrub_seed, name, where):
    """The write-up's hypothesis on the published checkpoint. Its power: the two controls break
    exactly what it names (which head reads which feature); for direct paths, swapping the features
    of heads 2.0 and 2.1 is the head-swap mutation of those two heads."""
    res = results(arena_model, _data(bracket_data, where), ["L1H0", "L2H0"], "L2H1", scrub_seed)
    _check(claim, control, res, name, where)


@pytest.mark.controls("swap_features", "shuffle_feature")
@pytest.mark.parametrize("where", ["published", "originators"])
@pytest.mark.parametrize("name", HYPOTHESES)
def test_ours_scrubbing(brackets_model, bracket_data, claim, control, scrub_seed, name, where):
    """The same hypotheses on our model, with the heads bound on the role search's own split."""
    roles = find_roles(brackets_model)
    count = A.head_label(*roles["count_head"])
    heads = ["L1H0"] + ([count] if count != "L1H0" else [])
    res = results(brackets_model, _data(bracket_data, where), heads, A.head_label(*roles["negative_head"]),
                  scrub_seed)
    _check(claim, control, res, name, where)
