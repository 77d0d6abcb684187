"""Associative memory in attention-only transformers (seed 004), as ordinary zoo entries.

Dana, Pydi & Chevaleyre, "Memorization in Attention-only Transformers" (AISTATS 2025), after Cabannes,
Dohmatob & Bietti, "Scaling Laws for Associative Memories". A model reads a context of S tokens from a
vocabulary of N and predicts the next one; the data is a *law* over sequences of S + 1 tokens.

One job per module:
  laws         the laws and the exact quantities (entropy, divergence, accuracy; Corollary 2's bound)
  lowrank      the low-rank baseline and its optimum (Proposition 1)
  training     `train_assoc` and its `AssocRecipe`
  experiments  the paper's and the seed's experiments as `ZooEntry`s (`zoo_entries()`), the paper's numbers
The model family itself is `circuits.tasks.assoc.model`. Load a trained model with `zoo.load(name, seed)`;
`python -m circuits.tasks.assoc` rewrites the committed references (fixtures/models/assoc_*).
"""

from circuits.tasks.assoc.experiments import *  # noqa: F401,F403
from circuits.tasks.assoc.experiments import zoo_entries  # noqa: F401
from circuits.tasks.assoc.laws import (DATA_VERSION, DTYPE, LAWS, Law, associations, capacity_bound, empirical_law,  # noqa: F401
                   last_position_law, make_law, power_unif_law, rank_d_law)
from circuits.tasks.assoc.lowrank import LowRank, LowRankOptimum, fit_low_rank, low_rank_closed_form, low_rank_optimum  # noqa: F401
from circuits.tasks.assoc.training import (TRAIN_CODE_VERSION, AssocRecipe, context_logits, evaluate, scheduled_lr,  # noqa: F401
                       train_assoc)
