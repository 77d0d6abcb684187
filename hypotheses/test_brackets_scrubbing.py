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
hypothesis's own threshold must FAIL on each (at_most on the control's interval upper bound), as
every negative control in this suite.

Data: the published 5,000 strings (`bracket_data`, 46% balanced) and 5,000 strings of an
originators'-style distribution (`brackets.generate_originators_style`: 26% balanced, unbalanced
strings uniformly random), where the write-up measured. Our model: the same hypotheses with the
count head of the existing role search (`find_roles`) in place of 2.0 and its negative head in place
of 2.1 (1.0 and 0.0 by index), recorded as they come out.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from brackets_subjects import find_roles
from circuits import analysis as A
from circuits import scrub as S
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


def build(model, data: B.BracketData, count_heads: list, horizon_head: str) -> dict:
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
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, (cf, hf, cn, hn) in specs.items():
        out[name] = S.Hypothesis(name, top(cf, hf, cn, hn))
        out[name + " swapped"] = S.Hypothesis(name + " swapped", top(hf, cf, cn, hn))
        shuffled = cf[torch.randperm(len(cf), generator=gen)]
        out[name + " shuffled"] = S.Hypothesis(name + " shuffled", top(shuffled, hf, cn, hn))
    return out


_RESULTS: dict = {}


def results(model, data: B.BracketData, count_heads: list, horizon_head: str) -> dict:
    """Every hypothesis and control scrubbed once per (model, data) in a session."""
    key = (A.weights_digest(model), id(data), tuple(count_heads), horizon_head)
    if key not in _RESULTS:
        hyps = build(model, data, count_heads, horizon_head)
        scrubbed = S.scrub(model, data.toks, data.isbal.long(), list(hyps.values()), n_draws=N_DRAWS)
        _RESULTS[key] = {r.name: r for r in scrubbed}
    return _RESULTS[key]


def _check(claim, res: dict, name: str, where: str):
    r = res[name]
    threshold = DETAILED if name.startswith("3") else HIGH_LEVEL
    S.scrub_claim(claim, f"{name} on {where}", r, threshold)
    if name.startswith("3"):
        claim.at_least(f"{name} on {where}: recovered(1b) - recovered({name})",
                       res["1b"].recovered.point - r.recovered.point, DETAILED_GAP)
    # the controls: the same claim must NOT hold with the features swapped or shuffled
    for control in ("swapped", "shuffled"):
        S.scrub_control_claim(claim, f"{name} on {where}, control (features {control})",
                              res[f"{name} {control}"], threshold)


# measured on the published checkpoint (5 draws x 5,000 strings): the claims that do not hold there,
# strict xfails with the numbers
ARENA_REFUTED: dict = {
    ("2a", "originators"): "recovers 0.838 [0.835, 0.841] < 0.85 (0.868 on the published data; write-up: 87%)",
    ("2b", "originators"): "recovers 0.839 [0.837, 0.842] < 0.85 (0.868 on the published data; write-up: 88%)",
    ("3a", "published"): "no teeth: with the count and horizon features swapped 3a still recovers 0.670 "
                         "[0.664, 0.675] >= 0.6 (3a itself: 0.732; write-up: ~72%)",
    ("3a", "originators"): "no teeth: with the features swapped 3a still recovers 0.663 [0.652, 0.673] >= 0.6 "
                           "(3a itself: 0.741)",
    ("3b", "published"): "recovers 0.392 [0.384, 0.400] < 0.6 with our substitute for the write-up's adjusted "
                         "proportion (head 0.0's actual attention per input)",
    ("3b", "originators"): "recovers 0.473 [0.466, 0.480] < 0.6 with our substitute adjusted proportion",
}
# our reference model (roles bound by search: count head L2H0 with 1.0, negative head L2H1): every
# hypothesis refuted, as the head-level bracket claims are (its last MLP carries the decision)
OURS_REFUTED: dict = {
    ("1a", "published"): "recovers 0.426 [0.420, 0.433] < 0.85",
    ("1a", "originators"): "recovers 0.397 [0.394, 0.401] < 0.85",
    ("1b", "published"): "recovers 0.465 [0.459, 0.470] < 0.85",
    ("1b", "originators"): "recovers 0.456 [0.454, 0.458] < 0.85",
    ("2a", "published"): "recovers 0.298 [0.295, 0.300] < 0.85",
    ("2a", "originators"): "recovers 0.276 [0.272, 0.281] < 0.85",
    ("2b", "published"): "recovers 0.299 [0.291, 0.306] < 0.85",
    ("2b", "originators"): "recovers 0.272 [0.266, 0.278] < 0.85",
    ("3a", "published"): "recovers 0.461 [0.456, 0.466] < 0.6",
    ("3a", "originators"): "recovers 0.450 [0.449, 0.452] < 0.6",
    ("3b", "published"): "recovers 0.370 [0.365, 0.375] < 0.6",
    ("3b", "originators"): "recovers 0.348 [0.345, 0.352] < 0.6",
}


def _data(bracket_data, where):
    return bracket_data if where == "published" else originators_data()


@pytest.mark.parametrize("where", ["published", "originators"])
@pytest.mark.parametrize("name", HYPOTHESES)
def test_arena_scrubbing(arena_model, bracket_data, claim, request, name, where):
    reason = ARENA_REFUTED.get((name, where))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    res = results(arena_model, _data(bracket_data, where), ["L1H0", "L2H0"], "L2H1")
    _check(claim, res, name, where)


@pytest.mark.parametrize("where", ["published", "originators"])
@pytest.mark.parametrize("name", HYPOTHESES)
def test_ours_scrubbing(brackets_model, bracket_data, zoo_seed, claim, request, name, where):
    roles = find_roles(brackets_model, bracket_data)
    count = A.head_label(*roles["count_head"])
    heads = ["L1H0"] + ([count] if count != "L1H0" else [])
    reason = OURS_REFUTED.get((name, where))
    if reason and zoo_seed is None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"refuted on our reference model: {reason}"))
    res = results(brackets_model, _data(bracket_data, where), heads, A.head_label(*roles["negative_head"]))
    _check(claim, res, name, where)
