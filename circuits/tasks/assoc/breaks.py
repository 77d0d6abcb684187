"""Break the part of an associative-memory model that a claim names (the claims' hand-written controls).

The family's claims are about all H heads together (accuracy grows with H, with d_h; the capacity
bound counts H d_h), about the model's width d, or about the table it memorised. The plugin's
mutations (`circuits.claims.mutations`; ``about("attn:L0")``: every head at once) reach `table_logits` (the
exact evaluation on every context, which runs no hooks) through the model's weight edits
(`AssocTransformer.weight_mutation`). The breaks here edit weights too, and are exact under
`table_logits` and the forward alike:

* `ablate_heads`: heads' outputs removed (W_O rows zeroed) or replaced by their mean over every
  context (W_O zeroed, the mean output added to b_O, which is shared by all heads);
* `randomise_ov`: every head's W_V and W_O replaced by Gaussian matrices of the same shapes and the
  same per-head Frobenius norms: the heads still write something of the same size, but nothing learned
  (the storage Corollary 2 counts is gone);
* `truncate_width`: the unembedding restricted to its top d-1 singular directions, so the logits have
  rank <= d-1 (the model no longer uses its whole width);
* `reassign_table`: a law whose contexts keep their probabilities, with every next token renamed by a
  derangement of the vocabulary (a different association table of the same statistics).
Every function returns a new object and leaves its input untouched.
"""

from __future__ import annotations

import copy

import torch

from circuits.errors import InputError
from circuits.tasks.assoc.laws import Law

__all__ = ["ablate_heads", "ablate_mlp", "half_of_heads", "randomise_ov", "truncate_width", "reassign_table", "mean_head_outputs"]


def half_of_heads(n_heads: int) -> list[int]:
    """The first ceil(H / 2) heads (with one head: that head)."""
    return list(range((n_heads + 1) // 2))


def mean_head_outputs(model) -> torch.Tensor:
    """Each head's output at the last position, averaged over every context: [H, d_out]."""
    return model.head_output_means()


def ablate_heads(model, heads, mode: str = "zero"):
    """`heads`' outputs removed ("zero") or replaced by their mean over every context ("mean"): the
    model's own weight edit (`AssocTransformer.without_heads`, also the plugin's mean ablations)."""
    return model.without_heads(heads, mode)


@torch.no_grad()
def randomise_ov(model, seed: int = 0):
    """Every head's W_V and W_O replaced by Gaussian matrices of the same shape and Frobenius norm."""
    new = copy.deepcopy(model)
    attn = new.blocks[0].attn
    gen = torch.Generator().manual_seed(seed)
    W_V = attn.W_QKV[2]  # [H, d_h, d_in]
    for W in (W_V, attn.W_O):
        for h in range(W.shape[0]):
            r = torch.randn(W[h].shape, generator=gen, dtype=W.dtype)
            W[h].copy_(r * (W[h].norm() / r.norm().clamp_min(1e-12)))
    return new


@torch.no_grad()
def truncate_width(model):
    """The unembedding restricted to its top d-1 singular directions: logits of rank <= d - 1."""
    new = copy.deepcopy(model)
    W_U = new.unembed.W_U  # [d, N]
    U, S, Vh = torch.linalg.svd(W_U.double(), full_matrices=False)
    keep = U[:, :-1]  # [d, d-1]
    W_U.copy_((keep @ keep.t() @ W_U.double()).to(W_U.dtype))
    return new


def reassign_table(law: Law, gen: torch.Generator) -> Law:
    """Another association table of the same statistics: every context keeps its probability, and its
    next token y becomes pi(y) for a random derangement pi of the vocabulary, so every memorised pair
    is replaced while how often each next token occurs is the original's up to the names."""
    if not isinstance(law, Law):
        raise InputError(f"reassign_table needs a Law, got {type(law).__name__}")
    if law.N < 2:
        raise InputError("reassign_table: a vocabulary of one token has no other table")
    while True:
        perm = torch.randperm(law.N, generator=gen)
        if bool((perm != torch.arange(law.N)).all()):
            break
    old = law.next_token_probs()  # [N^S, N]
    new = torch.empty_like(old)
    new[:, perm] = old  # new[c, pi(y)] = old[c, y]
    conds = (*law.conditionals[:-1], new.reshape(law.conditionals[-1].shape))
    return Law(conds, name=f"{law.name} (table reassigned)", spec={**law.spec, "reassigned": True})


def ablate_mlp(model, mode: str = "zero"):
    """The MLP's output removed ("zero") or replaced by its mean over every context at the last position
    ("mean"): `AssocTransformer.without_mlp`."""
    return model.without_mlp(mode)
