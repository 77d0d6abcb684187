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


def scrub_hypotheses(model, data: B.BracketData, count_heads: list, horizon_head: str, seed: int = 0) -> dict:
    """The write-up's hypotheses 1a-3b on `data`, each with its two controls (name -> Hypothesis):
    "<name> swapped" (the count heads read the horizon test and the horizon head the count test) and
    "<name> shuffled" (the count heads' feature replaced by a copy shuffled with generator `seed`).
    `count_heads` (labels like "2.0") read the count test, `horizon_head` the horizon test."""
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
