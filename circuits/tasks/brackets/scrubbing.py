"""Causal scrubbing of the balanced-bracket classifier: the hypotheses of Redwood's write-up (1a-3b)
as :class:`circuits.scrub.Hypothesis` trees over the bracket features (the count test, the horizon test,
head 0.0's open proportion and its residual-stream direction), with the controls the claims compare
them to. The claims are hypotheses/test_brackets_scrubbing.py."""

from __future__ import annotations

import torch

from circuits.analysis import measures as A
from circuits.analysis import scrub as S
from circuits.tasks.brackets import data as B

__all__ = ["open_vector", "adjusted_proportion", "scrub_hypotheses"]


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


HYPOTHESES = ("1a", "1b", "2a", "2b", "3a", "3b")


def scrub_hypotheses(model, data: B.BracketData, count_heads: list, horizon_head: str, seed: int = 0,
                     names=None) -> dict:
    """The write-up's hypotheses 1a-3b on `data`, each with its two controls (name -> Hypothesis):
    "<name> swapped" (the count heads read the horizon test and the horizon head the count test) and
    "<name> shuffled" (the count heads' feature replaced by a copy shuffled with generator `seed`).
    `count_heads` (labels like "2.0") read the count test, `horizon_head` the horizon test.
    `names`: only these hypotheses (and their controls); the others' features are not computed (3b's
    runs the model), and each shuffle is the one the full set gives (the generator still draws every
    hypothesis's permutation, in order)."""
    names = HYPOTHESES if names is None else tuple(names)
    unknown = [x for x in names if x not in HYPOTHESES]
    if unknown:
        raise ValueError(f"unknown hypotheses {unknown}; these are {', '.join(HYPOTHESES)}")
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
    def per_horizon(feats):
        return (count_open, (feats >= 0).all(-1), None, per_pos(feats))

    specs = {
        "1a": lambda: (count, horizon, None, None),
        "1b": lambda: (count_open, horizon, None, None),
        "2a": lambda: (count_open, horizon, pos1(None), None),
        "2b": lambda: (count_open, horizon, pos1(S.Approx(phi, p1)), None),
        "3a": lambda: per_horizon(B.horizon_features(data.toks)),
        "3b": lambda: per_horizon(B.horizon_features(data.toks, adjusted_proportion(model, data))),
    }
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in specs.items():
        perm = torch.randperm(len(count), generator=gen)  # drawn for every hypothesis: the same shuffles
        if name not in names:
            continue
        cf, hf, cn, hn = spec()
        out[name] = S.Hypothesis(name, top(cf, hf, cn, hn))
        out[name + " swapped"] = S.Hypothesis(name + " swapped", top(hf, cf, cn, hn))
        shuffled = cf[perm]
        out[name + " shuffled"] = S.Hypothesis(name + " shuffled", top(shuffled, hf, cn, hn))
    return out
