"""Palindrome classification (seed 001).

A string is ``K`` = 5 random lowercase letters followed by their reverse (so 10 letters, a
palindrome); with probability 1/2 it is then perturbed by ``PERTURB_N_TIMES`` = 8 random copies
``s[i] = s[j]`` (i, j uniform over the 10 positions, applied one after the other). The label is
recomputed from the result by ``is_palindrome``, so a perturbed string that is still a palindrome
(e.g. i == j, or the copied letter equals the one at i's mirror position) has label 1.

Tokens: letters ``a..z`` are 0..25, ``[PAD]`` = 26, ``[CLS]`` = 27, ``[SEP]`` = 28; the model reads
``[CLS] + 10 letters + [SEP]`` (12 tokens, no padding: every string has the same length) and
classifies at position 0. Label 1 = palindrome, 0 = not (the seed's ``y`` is a bool, cast to long).

The *palindrome distance* is the number of mirror pairs ``(i, L-1-i)``, ``i < L/2``, whose letters
differ: 0 exactly for palindromes, at most 5 here.

Statistics of ``generate(100_000, seed=0)`` (seeds 0..2 vary by about +-0.003):

====================================  =====================================
palindromes (label 1)                 0.503
perturbed strings                     0.502
perturbed strings still palindromes   0.011
distance 1 / 2 / 3 / 4 / 5            0.040 / 0.123 / 0.182 / 0.125 / 0.027
====================================  =====================================

The hard non-palindromes are the ones at distance 1 (one mismatched pair): 8% of the
non-palindromes. ``generate_training_mix`` over-samples them for training (held-out evaluation always
uses ``generate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from circuits.errors import InputError

__all__ = [
    "ALPHABET", "N_LETTERS", "PAD", "CLS", "SEP", "VOCAB", "K", "SEQ_LEN", "N_CTX", "PERTURB_N_TIMES",
    "P_PERTURB", "is_palindrome", "palindrome_distance", "tokenize", "detokenize", "PalindromeData",
    "generate", "generate_training_mix", "mirror_position", "generate_distinct",
]

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
N_LETTERS = 26
PAD, CLS, SEP = 26, 27, 28
VOCAB = 29
K = 5  # half length
SEQ_LEN = 2 * K  # letters per string
N_CTX = SEQ_LEN + 2  # [CLS] + letters + [SEP]
PERTURB_N_TIMES = 8
P_PERTURB = 0.5


def mirror_position(pos: int, seq_len: int = SEQ_LEN) -> int:
    """Token position of the mirror partner of token position ``pos`` (1..seq_len; 0 is [CLS])."""
    if not 1 <= pos <= seq_len:
        raise InputError(f"position {pos} is not a letter position (1..{seq_len})")
    return seq_len + 1 - pos


# --------------------------------------------------------------------------------------------------
# Plain definitions (the specification the vectorised versions are tested against)
# --------------------------------------------------------------------------------------------------


def _check_string(s: object, what: str = "string") -> str:
    if not isinstance(s, str):
        raise InputError(f"{what} is {type(s).__name__} {s!r}, not a str of lowercase letters")
    for i, c in enumerate(s):
        if c not in ALPHABET:
            raise InputError(f"{what} {s!r} has invalid character {c!r} at index {i}; only 'a'..'z' are allowed")
    return s


def is_palindrome(s: str) -> bool:
    """True when ``s`` reads the same backwards. Raises InputError for non-letters."""
    _check_string(s)
    for i in range(len(s) // 2):
        if s[i] != s[len(s) - 1 - i]:
            return False
    return True


def palindrome_distance(s: str) -> int:
    """Number of mismatched mirror pairs of ``s`` (0 for a palindrome)."""
    _check_string(s)
    return sum(s[i] != s[len(s) - 1 - i] for i in range(len(s) // 2))


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _check_strings(strings: Sequence[str], length: int) -> list[str]:
    if isinstance(strings, str):
        raise InputError(f"expected a sequence of strings, got the str {strings!r}; wrap it in a list")
    strings = list(strings)
    for i, s in enumerate(strings):
        _check_string(s, f"item {i}")
        if len(s) != length:
            raise InputError(f"item {i} {s!r} has length {len(s)}; every string must have length {length}")
    return strings


def tokenize(strings: Sequence[str], length: int = SEQ_LEN) -> torch.Tensor:
    """``[CLS] + letters + [SEP]`` token ids, a LongTensor [batch, length + 2].

    Every string must consist of exactly ``length`` lowercase letters (InputError names the item
    otherwise).
    """
    strings = _check_strings(strings, length)
    toks = torch.empty(len(strings), length + 2, dtype=torch.long)
    toks[:, 0], toks[:, -1] = CLS, SEP
    if strings and length:
        codes = np.frombuffer("".join(strings).encode("ascii"), dtype=np.uint8).reshape(len(strings), length)
        toks[:, 1:-1] = torch.from_numpy(codes.astype(np.int64) - ord("a"))
    return toks


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise InputError(f"expected a token tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputError(f"token tensor must have an integer dtype, got {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise InputError(f"token tensor must be [batch, seq] with seq >= 2, got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        return
    bad = (tokens[:, 0] != CLS) | (tokens[:, -1] != SEP) | ((tokens[:, 1:-1] < 0) | (tokens[:, 1:-1] >= N_LETTERS)).any(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise InputError(f"row {row} is not [CLS] + letters (0..25) + [SEP]: {tokens[row].tolist()}")


def detokenize(tokens: torch.Tensor) -> list[str]:
    """Strings back from ``[CLS] + letters + [SEP]`` token rows (InputError for any other layout)."""
    _check_tokens(tokens)
    if tokens.shape[0] == 0:
        return []
    chars = (tokens[:, 1:-1].cpu().numpy() + ord("a")).astype(np.uint8)
    return [row.tobytes().decode("ascii") for row in chars]


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PalindromeData:
    """Strings with tokens, labels and palindrome distances, row-aligned."""

    toks: torch.Tensor  # [batch, seq_len + 2] long
    labels: torch.Tensor  # [batch] long, 1 = palindrome
    distance: torch.Tensor  # [batch] long, mismatched mirror pairs
    perturbed: torch.Tensor  # [batch] bool, whether the generator perturbed the row (False if unknown)

    def __post_init__(self) -> None:
        n = self.toks.shape[0]
        for f in dataclasses.fields(self)[1:]:
            if getattr(self, f.name).shape[0] != n:
                raise InputError(f"PalindromeData.{f.name} has {getattr(self, f.name).shape[0]} rows, toks has {n}")

    @classmethod
    def from_tokens(cls, toks: torch.Tensor, perturbed: torch.Tensor | None = None) -> "PalindromeData":
        _check_tokens(toks)
        toks = toks.long()
        letters = toks[:, 1:-1]  # [batch, seq_len]
        half = letters.shape[1] // 2
        mismatch = letters[:, :half] != letters.flip(-1)[:, :half]  # [batch, half]
        distance = mismatch.sum(-1)
        if perturbed is None:
            perturbed = torch.zeros(toks.shape[0], dtype=torch.bool)
        return cls(toks, (distance == 0).long(), distance, perturbed)

    @classmethod
    def from_strings(cls, strings: Sequence[str]) -> "PalindromeData":
        strings = list(strings) if not isinstance(strings, str) else strings
        length = len(strings[0]) if strings and isinstance(strings[0], str) else SEQ_LEN
        return cls.from_tokens(tokenize(strings, length))

    @property
    def strs(self) -> list[str]:
        return detokenize(self.toks)

    def __len__(self) -> int:
        return self.toks.shape[0]

    def subset(self, index: torch.Tensor) -> "PalindromeData":
        """Rows at a bool mask or integer indices."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool and index.shape != (len(self),):
            raise InputError(f"mask has shape {tuple(index.shape)}, expected ({len(self)},)")
        return PalindromeData(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    return n


def _perturb(letters: torch.Tensor, rows: torch.Tensor, times: int, g: torch.Generator) -> None:
    """In place: ``times`` copies s[i] = s[j] (i, j uniform) on each of ``rows``, one after another."""
    m, L = len(rows), letters.shape[1]
    for _ in range(times):
        i = torch.randint(L, (m,), generator=g)
        j = torch.randint(L, (m,), generator=g)
        letters[rows, i] = letters[rows, j]


def generate(n: int, seed: int, k: int = K, perturb_n_times: int = PERTURB_N_TIMES,
             p_perturb: float = P_PERTURB) -> PalindromeData:
    """n examples of the seed's distribution (module docstring). Deterministic for a seed."""
    _check_n(n)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K:
        raise InputError(f"k must be an int in 1..{K} (the model's context holds 2k + 2 <= {N_CTX} tokens), got {k!r}")
    if isinstance(perturb_n_times, bool) or not isinstance(perturb_n_times, int) or perturb_n_times < 0:
        raise InputError(f"perturb_n_times must be a non-negative int, got {perturb_n_times!r}")
    if not 0.0 <= p_perturb <= 1.0:
        raise InputError(f"p_perturb must be a probability, got {p_perturb!r}")
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(N_LETTERS, (n, k), generator=g)  # [n, k]
    letters = torch.cat([half, half.flip(-1)], dim=1)  # [n, 2k]
    perturbed = torch.rand(n, generator=g) < p_perturb  # [n]
    _perturb(letters, perturbed.nonzero().squeeze(-1), perturb_n_times, g)
    toks = torch.cat([torch.full((n, 1), CLS), letters, torch.full((n, 1), SEP)], dim=1)
    return PalindromeData.from_tokens(toks, perturbed)


def generate_distinct(n: int, seed: int, length: int = SEQ_LEN) -> PalindromeData:
    """n strings of ``length`` pairwise distinct letters (uniform over such strings; none is a
    palindrome). On them no two positions share a letter, so a head's attention to a position
    cannot come from attending to the same letter: what it prefers there is a position."""
    _check_n(n)
    if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= N_LETTERS:
        raise InputError(f"length must be an int in 2..{N_LETTERS} (letters must be distinct), got {length!r}")
    g = torch.Generator().manual_seed(seed)
    letters = torch.rand(n, N_LETTERS, generator=g).argsort(-1)[:, :length]  # a random injection per row
    toks = torch.cat([torch.full((n, 1), CLS), letters, torch.full((n, 1), SEP)], dim=1)
    return PalindromeData.from_tokens(toks)


def generate_training_mix(n: int, seed: int) -> PalindromeData:
    """Training distribution: half the seed's mixture, a quarter palindromes, a quarter near-misses
    (a palindrome with one to three mirror pairs broken by setting one side to a different letter).
    The near-misses at distance 1 are the hard cases the seed's mixture rarely shows."""
    _check_n(n)
    g = torch.Generator().manual_seed(seed)
    n_ref = n // 2
    n_pal = (n - n_ref) // 2
    n_miss = n - n_ref - n_pal
    ref = generate(n_ref, seed)
    half = torch.randint(N_LETTERS, (n_pal + n_miss, K), generator=g)
    letters = torch.cat([half, half.flip(-1)], dim=1)  # [n_pal + n_miss, 10] palindromes
    rows = torch.arange(n_pal, n_pal + n_miss)
    n_broken = torch.randint(1, 4, (n_miss,), generator=g)  # pairs to break: 1..3
    for b in range(3):
        sel = rows[n_broken > b]
        pair = torch.randint(K, (len(sel),), generator=g)
        side = torch.randint(2, (len(sel),), generator=g)
        pos = torch.where(side == 0, pair, SEQ_LEN - 1 - pair)
        shift = torch.randint(1, N_LETTERS, (len(sel),), generator=g)  # a different letter
        letters[sel, pos] = (letters[sel, SEQ_LEN - 1 - pos] + shift) % N_LETTERS
    toks = torch.cat([torch.full((len(letters), 1), CLS), letters, torch.full((len(letters), 1), SEP)], dim=1)
    toks = torch.cat([ref.toks, toks])
    order = torch.randperm(n, generator=g)
    return PalindromeData.from_tokens(toks[order])


# --- zoo entry -----------------------------------------------------------------------------------------

DATA_VERSION = "palindromes-data-1"  # bump when generate() / generate_training_mix() change what a seed produces


def to_split(data: PalindromeData):
    from circuits.zoo.train import Split

    return Split(data.toks, data.labels)


def make_split(n: int, seed: int):
    return to_split(generate(n, seed))


def make_train_split(n: int, seed: int):
    return to_split(generate_training_mix(n, seed))


def zoo_entries() -> list:
    from circuits.model.transformer import TransformerConfig
    from circuits.zoo.train import TrainRecipe
    from circuits.zoo.registry import ZooEntry

    return [ZooEntry(
        name="palindromes",
        description="palindrome classifier, 3 layers x 2 heads, no LayerNorm (seed 001)",
        # the seed's EasyTransformerConfig: 3 layers, d_model 32, 2 heads of 16, d_mlp 64, ReLU, no
        # LayerNorm, bidirectional, learned positions; a linear head on position 0 ([CLS]) with 2
        # outputs (index 1 = palindrome). Here that head is the unembed (W_U [32, 2], b_U).
        config=TransformerConfig(n_layers=3, d_model=32, n_ctx=N_CTX, n_heads=2, d_head=16, d_mlp=64,
                                 d_vocab=VOCAB, d_vocab_out=2, act_fn="relu", normalization=None,
                                 attention="bidirectional", positional="learned", readout="first",
                                 init_range=0.1414),  # TL's default for d_model 32 (0.8 / sqrt(32)), as the seed's cfg
        recipe=TrainRecipe(steps=3000, batch_size=256, lr=3e-3, warmup_steps=100, weight_decay=0.01,
                           n_train=200_000, n_eval=10_000, eval_every=500, target_metric=None,
                           bucket_by_length=False, threads=1),
        make_split=make_split,
        make_train_split=make_train_split,
        data_recipe={"eval": "circuits.tasks.palindromes.generate", "train": "generate_training_mix",
                     "version": DATA_VERSION, "k": K, "perturb_n_times": PERTURB_N_TIMES,
                     "p_perturb": P_PERTURB},
        variants=recipe_variants(),
    )]


def recipe_variants() -> dict:
    """``palindromes@seed``: the recipe the seed notebook (001) trained its own model with, for the
    census (issue 34). From its training cell: ``PalindromeDataset(1_000_000, k=5, perturb_n_times=8,
    alphabet=string.ascii_lowercase)`` (26 letters: our `generate`, not the over-sampling training
    mix), ``DataLoader(batch_size=32, shuffle=True)`` for one epoch (31,250 steps),
    ``torch.optim.Adam(lr=1e-4)`` (defaults: betas (0.9, 0.999), no weight decay), a constant learning
    rate (no warm-up, no schedule), no gradient clipping; the model config (3 layers, d_model 32, no
    LayerNorm, bidirectional, CLS read-out) is the entry's own. What we chose where the notebook does
    not say or cannot be followed: its classifier head is an nn.Linear (PyTorch's uniform init); ours is
    the unembed with the TL normal init (std 0.1414) like every other weight; its shuffle has no seed,
    ours comes from the model seed; the held-out evaluation (10k strings every 5,000 steps) and a final
    100k test set are ours (the notebook scored 1,000 test strings)."""
    seed_recipe = {"steps": 31_250, "batch_size": 32, "lr": 1e-4, "warmup_steps": 0, "min_lr_frac": 1.0,
                   "weight_decay": 0.0, "betas": (0.9, 0.999), "grad_clip": 0.0, "n_train": 1_000_000,
                   "n_eval": 10_000, "eval_every": 5_000, "n_test": 100_000, "threads": 1}
    return {"seed": {"recipe": seed_recipe, "make_train_split": make_split,
                     "data_recipe": {"eval": "circuits.tasks.palindromes.generate", "train": "generate",
                                     "version": DATA_VERSION, "k": K, "perturb_n_times": PERTURB_N_TIMES,
                                     "p_perturb": P_PERTURB, "recipe_of": "seed 001 notebook"}}}
