"""Balanced-bracket classification (seed 000: ARENA's "balanced bracket classifier").

A string of at most ``MAX_LEN`` = 40 brackets is *balanced* when every prefix has at least as many
"(" as ")" and the whole string has equally many of each. The model reads
``[start] + string + [end]``, right-padded with ``[pad]``, and classifies at position 0.

This module holds everything about the data and nothing about the model:

* the tokenizer (``tokenize`` / ``detokenize``) with the checkpoint's vocabulary;
* the label and the per-string features the seed's analysis is phrased in (``is_balanced_tokens``,
  ``open_proportion``, ``starts_open``, ``total_elevation_failure``, ``negative_failure``,
  ``goes_negative_ltr``), vectorised over token tensors or lists of strings;
* ``BracketData``, a dataset holding strings, tokens, labels and features side by side;
* ``generate``, a vectorised sampler that reproduces the published data set's distribution.

Two notions of "going negative"
-------------------------------
``goes_negative_ltr``: the left-to-right running count of "(" minus ")" drops below 0, i.e. some
*prefix* has more ")" than "(". This is the textbook failure and what ``is_balanced`` checks.

``negative_failure`` (the seed's ``get_negative_failure``): scanning from the *end*, +1 per ")" and
-1 per "(", the counter drops below 0, i.e. some *suffix* has more "(" than ")".

If the counts are equal, a prefix has more ")" exactly when its complementary suffix has more "(",
so the two coincide, and ``balanced == ~total_elevation_failure & ~negative_failure`` (the seed's
four failure classes are therefore well defined). When the counts differ they can disagree: "((("
fails right-to-left only, ")))" fails left-to-right only; but at least one of them fails, since the
whole string is both a prefix and a suffix. So "never negative but wrong count" (the hard kind of
total-elevation failure) means: more ")" than "(" with no suffix in excess of "(", for the seed's
notion, or more "(" than ")" with no prefix in excess of ")", for the left-to-right one.

How the reference data was made (measured, then modelled)
---------------------------------------------------------
The published 100,000 pairs (``brackets_data.json``) have even lengths 2..40 only, 46.0% balanced,
49.4% of rows repeating an earlier row (short strings are few), no order effects. Per length:

* unbalanced strings are uniform random strings conditioned on being unbalanced (their count of "("
  follows the conditioned binomial: chi^2 = 228 on 234 dof), from about 2,800 draws per length;
* balanced strings of a given length are uniform over the Dyck words of that length (e.g. the 14
  words of length 8 each appear 227..262 times), and their length distribution is proportional to
  Catalan(L/2) / 2^L -- what rejection sampling of uniform strings of uniform length gives.

So the file is fit by a one-parameter mixture: with probability ``RANDOM_FRACTION`` = q a uniform
random string of uniform even length in 2..40; otherwise the same draw conditioned on being balanced.
Matching the balanced fraction gives q = (1 - 0.46022) / (1 - mean_L Catalan(L/2)/2^L) = 0.561; the
40 (length, label) cell counts then fit with chi^2 = 43.5 on 38 dof (p = 0.25). ``generate`` samples
exactly this mixture (balanced strings by the cycle lemma, so no rejection loop).

Statistics (fractions of all rows; generated = ``generate(100_000, seed=0)``; over seeds 0..4 the
generated values vary by about +-0.002 in the fractions):

======================================================  =====================  =====================
statistic                                               reference              generated
======================================================  =====================  =====================
balanced                                                0.4602                 0.4612
equal counts, goes negative (the hard "count ok" kind)  0.0949                 0.0969
counts differ, never negative left to right             0.0952                 0.0943
counts differ, never negative right to left (seed's)    0.0955                 0.0951
counts differ and goes negative left to right           0.3496                 0.3476
mean open proportion                                    0.4996                 0.5001
starts with "("                                         0.7190                 0.7190
length: mean / P(=2) / P(<=10) / P(>=30)                15.71/.174/.461/.194   15.74/.173/.460/.195
length: total variation distance to the reference       --                     0.0095
(length, label) joint: total variation to reference     --                     0.0102
odd lengths                                             0                      0
rows repeating an earlier row                           0.4945                 0.4936
mean max depth of balanced rows of length >= 20         5.30                   5.30
======================================================  =====================  =====================
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from circuits.errors import CircuitsError, InputError

__all__ = [
    "START", "PAD", "END", "OPEN", "CLOSE", "VOCAB", "N_CTX", "MAX_LEN", "RANDOM_FRACTION",
    "ReferenceDataError", "tokenize", "detokenize", "is_balanced", "is_balanced_tokens",
    "open_proportion", "starts_open", "total_elevation_failure", "negative_failure",
    "goes_negative_ltr", "BracketData", "generate",
]

START, PAD, END, OPEN, CLOSE = 0, 1, 2, 3, 4
VOCAB = 5
MAX_LEN = 40
N_CTX = MAX_LEN + 2  # [start] + brackets + [end]

# Weight of the uniform-random component of the mixture that reproduces the reference data (see the
# module docstring); the rest are balanced strings.
RANDOM_FRACTION = 0.561

_MAX_HALF = MAX_LEN // 2

StringsOrTokens = Sequence[str] | torch.Tensor


class ReferenceDataError(CircuitsError, ValueError):
    """A reference data file that is malformed or whose labels disagree with ``is_balanced``."""


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _check_strings(strings: Sequence[str]) -> list[str]:
    """Reject what would otherwise tokenize silently into garbage (a bare str iterates to chars)."""
    if isinstance(strings, str):
        raise InputError(f"expected a sequence of strings, got the str {strings!r}; wrap it in a list")
    strings = list(strings)
    for i, s in enumerate(strings):
        if not isinstance(s, str):
            raise InputError(f"item {i} is {type(s).__name__} {s!r}, not a str of brackets")
        if len(s) > MAX_LEN:
            raise InputError(f"string {i} has length {len(s)} > MAX_LEN={MAX_LEN}: {s!r}")
    return strings


def _codepoints(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All characters as one array of code points (UTF-32 is one unit per char), and each length."""
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))  # [batch]
    codes = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32)  # [sum(lengths)]
    return codes, lengths


def _raise_bad_char(strings: list[str], codes: np.ndarray, lengths: np.ndarray) -> None:
    """Name the first non-bracket character: which string, which index, which char."""
    flat = int(np.flatnonzero((codes != ord("(")) & (codes != ord(")")))[0])
    ends = np.cumsum(lengths)  # [batch]
    i = int(np.searchsorted(ends, flat, side="right"))
    j = flat - int(ends[i] - lengths[i])
    raise InputError(
        f"string {i} {strings[i]!r} has invalid character {strings[i][j]!r} at index {j}; "
        "only '(' and ')' are allowed"
    )


def _check_pad_to(pad_to: int | None, needed: int) -> int:
    if pad_to is None:
        return needed
    if isinstance(pad_to, bool) or not isinstance(pad_to, int):
        raise InputError(f"pad_to must be an int, got {type(pad_to).__name__} {pad_to!r}")
    if pad_to < needed:
        raise InputError(f"pad_to={pad_to} is shorter than the longest tokenized string ({needed} tokens)")
    if pad_to > N_CTX:
        raise InputError(f"pad_to={pad_to} exceeds the context length N_CTX={N_CTX}")
    return pad_to


def _assemble(body: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Frame bracket tokens as [start] + brackets + [end] + [pad]..., a LongTensor [batch, width].

    body: [batch, >= width - 2] with OPEN/CLOSE in the first `lengths` columns (the rest ignored).
    """
    batch = lengths.shape[0]
    inside = torch.arange(width - 2)[None, :] < lengths[:, None]  # [batch, width - 2]
    tokens = torch.full((batch, width), PAD, dtype=torch.long)  # [batch, width]
    tokens[:, 0] = START
    tokens[:, 1 : width - 1] = torch.where(inside, body[:, : width - 2], PAD)
    tokens[torch.arange(batch), lengths + 1] = END
    return tokens


def tokenize(strings: Sequence[str], *, pad_to: int | None = None) -> torch.Tensor:
    """Token ids ``[start] + string + [end]``, right-padded with ``[pad]``.

    Returns a LongTensor [batch, width], width = longest string + 2 unless ``pad_to`` (total length,
    at most N_CTX) is given. Vectorised: one numpy pass over all characters, no per-char Python.
    Raises InputError (a ValueError) naming the offending item for non-str items, strings longer
    than MAX_LEN, or characters other than "(" and ")".
    """
    return _tokenize(_check_strings(strings), pad_to)[0]


def _tokenize(strings: list[str], pad_to: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [batch, width] and bracket counts [batch] of already type- and length-checked strings."""
    codes, lengths = _codepoints(strings)
    if not np.isin(codes, (ord("("), ord(")"))).all():
        _raise_bad_char(strings, codes, lengths)
    width = _check_pad_to(pad_to, int(lengths.max(initial=0)) + 2)
    rows = np.repeat(np.arange(len(strings)), lengths)  # [sum(lengths)]
    cols = np.arange(codes.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # [sum(lengths)]
    body = np.full((len(strings), width - 2), PAD, dtype=np.int64)  # [batch, width - 2]
    body[rows, cols] = np.where(codes == ord("("), OPEN, CLOSE)
    lengths = torch.from_numpy(lengths)  # [batch]
    return _assemble(torch.from_numpy(body), lengths, width), lengths


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise InputError(f"expected a token tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputError(f"token tensor must have an integer dtype, got {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise InputError(f"token tensor must be [batch, seq] with seq >= 2, got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= VOCAB):
        raise InputError(f"token ids must lie in [0, {VOCAB}), got range [{int(tokens.min())}, {int(tokens.max())}]")


def _token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Bracket count per row [batch], after checking the layout [start] + brackets + [end] + [pad]*.

    A malformed row would detokenize into a different string than was meant, so refuse it.
    """
    is_bracket = (tokens == OPEN) | (tokens == CLOSE)  # [batch, seq]
    lengths = is_bracket.sum(-1)  # [batch]
    cols = torch.arange(tokens.shape[1], device=tokens.device)[None, :]  # [1, seq]
    in_body = (cols >= 1) & (cols <= lengths[:, None])  # [batch, seq]
    frame = torch.where(cols == 0, START, torch.where(cols == lengths[:, None] + 1, END, PAD))  # [batch, seq]
    ok = torch.where(in_body, is_bracket, tokens == frame).all(-1) & (lengths <= tokens.shape[1] - 2)  # [batch]
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0])
        raise InputError(f"row {row} is not [start] + brackets + [end] + [pad]*: {tokens[row].tolist()}")
    return lengths


def _strings_of(tokens: torch.Tensor) -> list[str]:
    """Strings of well-formed token rows, through numpy's fixed-width bytes dtype: the non-bracket
    tokens map to NUL, which that dtype drops at the end of each row."""
    lut = np.zeros(VOCAB, dtype=np.uint8)
    lut[OPEN], lut[CLOSE] = ord("("), ord(")")
    chars = np.ascontiguousarray(lut[tokens[:, 1:].cpu().numpy()])  # [batch, seq - 1]
    if chars.shape[0] == 0:
        return []
    return chars.view(f"S{chars.shape[1]}").ravel().astype(str).tolist()


def detokenize(tokens: torch.Tensor) -> list[str]:
    """Bracket strings back from token ids [batch, seq] laid out as ``tokenize`` makes them.

    Raises InputError for a tensor that is not integer [batch, seq], ids outside the vocabulary, or
    a row that is not [start] + brackets + [end] + [pad]*.
    """
    _check_tokens(tokens)
    _token_lengths(tokens)
    return _strings_of(tokens)


# --------------------------------------------------------------------------------------------------
# Labels and features
# --------------------------------------------------------------------------------------------------


def is_balanced(s: str) -> bool:
    """Plain loop, the specification the vectorised versions are tested against."""
    depth = 0
    for i, c in enumerate(s):
        if c not in "()":
            raise InputError(f"{s!r} has invalid character {c!r} at index {i}; only '(' and ')' are allowed")
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def _steps(x: StringsOrTokens) -> torch.Tensor:
    """+1 per "(", -1 per ")", 0 for [start]/[end]/[pad]: [batch, seq] int8.

    Zeros leave running sums unchanged, so padding never alters any feature. int8 (with int16
    running sums) is ~10x faster than int64 here and cannot overflow below 32,767 tokens.
    """
    tokens = x if isinstance(x, torch.Tensor) else tokenize(x)
    _check_tokens(tokens)
    return _steps_of(tokens)


def _steps_of(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens == OPEN).to(torch.int8) - (tokens == CLOSE).to(torch.int8)  # [batch, seq]


def _ltr_goes_negative(steps: torch.Tensor) -> torch.Tensor:
    return (steps.cumsum(-1, dtype=torch.int16) < 0).any(-1)  # [batch]


def _rtl_goes_negative(steps: torch.Tensor) -> torch.Tensor:
    # The seed's counter from the end is minus the suffix sum of steps.
    return (steps.flip(-1).cumsum(-1, dtype=torch.int16) > 0).any(-1)  # [batch]


def is_balanced_tokens(x: StringsOrTokens) -> torch.Tensor:
    """BoolTensor [batch]: equal counts and no prefix with more ")" than "("."""
    steps = _steps(x)  # [batch, seq]
    return (steps.sum(-1) == 0) & ~_ltr_goes_negative(steps)


def open_proportion(x: StringsOrTokens) -> torch.Tensor:
    """FloatTensor [batch]: fraction of brackets that are "(" (NaN for the empty string)."""
    steps = _steps(x)  # [batch, seq]
    n_open = (steps > 0).sum(-1)  # [batch]
    return n_open.float() / (steps != 0).sum(-1).float()


def starts_open(x: StringsOrTokens) -> torch.Tensor:
    """BoolTensor [batch]: the first bracket is "(" (False for the empty string)."""
    steps = _steps(x)  # [batch, seq]
    first = (steps != 0).long().argmax(-1)  # [batch]  index of the first bracket (0 if none)
    return steps.gather(-1, first[:, None]).squeeze(-1) > 0


def total_elevation_failure(x: StringsOrTokens) -> torch.Tensor:
    """BoolTensor [batch]: the number of "(" differs from the number of ")"."""
    return _steps(x).sum(-1) != 0


def negative_failure(x: StringsOrTokens) -> torch.Tensor:
    """BoolTensor [batch]: the seed's notion -- some suffix has more "(" than ")".

    Scanning from the end with +1 per ")" and -1 per "(", the counter drops below 0. Equals
    ``goes_negative_ltr`` wherever the counts are equal (see the module docstring).
    """
    return _rtl_goes_negative(_steps(x))


def goes_negative_ltr(x: StringsOrTokens) -> torch.Tensor:
    """BoolTensor [batch]: some prefix has more ")" than "(" (left-to-right count drops below 0)."""
    return _ltr_goes_negative(_steps(x))


# The causal-scrubbing write-up's names (Redwood Research, "Causal Scrubbing: Results on a Paren
# Balance Checker", 2022): the count test and the right-to-left "horizon" test, and per-position
# features its hypotheses 3a/3b condition on.


def count_test(x: StringsOrTokens) -> torch.Tensor:
    """BoolTensor [batch]: the count test passes (as many "(" as ")")."""
    return _steps(x).sum(-1) == 0


def horizon_test(x: StringsOrTokens) -> torch.Tensor:
    """BoolTensor [batch]: the horizon test passes (no suffix has more "(" than ")"; ~negative_failure)."""
    return ~_rtl_goes_negative(_steps(x))


def suffix_open_proportion(x: StringsOrTokens) -> torch.Tensor:
    """FloatTensor [batch, seq]: at each position, the proportion of "(" among the brackets from there
    to the end (the write-up's p_open_after); NaN where no bracket follows (the end token, padding)."""
    steps = _steps(x)
    opens = (steps > 0).flip(-1).cumsum(-1).flip(-1).float()
    brackets = (steps != 0).flip(-1).cumsum(-1).flip(-1).float()
    return opens / brackets


def horizon_features(x: StringsOrTokens, proportion: torch.Tensor | None = None) -> torch.Tensor:
    """LongTensor [batch, seq]: the write-up's per-position horizon classes, which a position's input
    to the horizon head must agree on: 0 padding; -1 / 1 the end token after "(" / ")"; -2 where the
    (suffix) open proportion at that position is above 1/2 (evidence of imbalance), 2 where it is at
    most 1/2. ``proportion`` [batch, seq] replaces ``suffix_open_proportion`` (e.g. an adjusted one)."""
    tokens = x if isinstance(x, torch.Tensor) else tokenize(x)
    _check_tokens(tokens)
    p = suffix_open_proportion(tokens) if proportion is None else proportion
    if p.shape != tokens.shape:
        raise InputError(f"proportion has shape {tuple(p.shape)}, the tokens {tuple(tokens.shape)}")
    prev = torch.cat([torch.full_like(tokens[:, :1], PAD), tokens[:, :-1]], 1)
    out = torch.where(p > 0.5, -2, 2)
    out = torch.where(tokens == END, torch.where(prev == OPEN, -1, 1), out)
    return torch.where(tokens == PAD, 0, out)


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class BracketData:
    """Strings with their tokens, labels and features, row-aligned. Tensors start on the CPU.

    Build with ``from_strings``, ``from_tokens``, ``from_reference`` or ``generate``; the features
    are computed from the tokens, so they cannot drift from the strings.
    """

    strs: list[str]
    toks: torch.Tensor  # [batch, seq] long, seq = longest string + 2
    isbal: torch.Tensor  # [batch] bool
    lengths: torch.Tensor  # [batch] long, number of brackets
    open_proportion: torch.Tensor  # [batch] float
    starts_open: torch.Tensor  # [batch] bool
    total_elevation_failure: torch.Tensor  # [batch] bool
    negative_failure: torch.Tensor  # [batch] bool, the seed's right-to-left notion
    goes_negative_ltr: torch.Tensor  # [batch] bool

    def __post_init__(self) -> None:
        n = len(self.strs)
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            if value.shape[0] != n:
                raise InputError(f"BracketData.{field.name} has {value.shape[0]} rows, strs has {n}")

    @classmethod
    def from_tokens(cls, toks: torch.Tensor, strs: Sequence[str] | None = None) -> BracketData:
        """Labels and features of a [batch, seq] token tensor (layout checked); ``strs`` is
        recovered from the tokens unless given."""
        _check_tokens(toks)
        toks = toks.long()
        return cls._from_valid(toks, _token_lengths(toks), strs)

    @classmethod
    def from_strings(cls, strs: Sequence[str]) -> BracketData:
        """Tokenize (validating every string) and compute labels and features."""
        strs = _check_strings(strs)
        return cls._from_valid(*_tokenize(strs, None), strs)

    @classmethod
    def _from_valid(cls, toks: torch.Tensor, lengths: torch.Tensor, strs: Sequence[str] | None) -> BracketData:
        """Build from tokens already known to be well formed, with their bracket counts."""
        toks = toks[:, : int(lengths.max()) + 2] if len(toks) else toks[:, :2]
        steps = _steps_of(toks)  # [batch, seq]
        total = steps.sum(-1, dtype=torch.int16).long()  # [batch]  n_open - n_close
        ltr_negative = _ltr_goes_negative(steps)  # [batch]
        return cls(
            strs=_strings_of(toks) if strs is None else list(strs),
            toks=toks,
            isbal=(total == 0) & ~ltr_negative,
            lengths=lengths,
            open_proportion=(lengths + total).float() / (2 * lengths).float(),  # n_open / length
            starts_open=toks[:, 1] == OPEN,
            total_elevation_failure=total != 0,
            negative_failure=_rtl_goes_negative(steps),
            goes_negative_ltr=ltr_negative,
        )

    @classmethod
    def from_reference(cls, path: str | Path, n: int | None = None) -> BracketData:
        """The published JSON list of [string, is_balanced] pairs (the first ``n`` rows if given).

        Every row's stored label is checked against ``is_balanced``: a file that disagrees with our
        definition would make every downstream claim about "balanced" meaningless.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise InputError(f"n must be None or a non-negative int, got {n!r}")
        with open(path) as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ReferenceDataError(f"{path}: expected a JSON list of [string, bool] pairs, got {type(rows).__name__}")
        rows = rows[:n] if n is not None else rows
        bad = next((i for i, r in enumerate(rows) if not _is_pair(r)), None)
        if bad is not None:
            raise ReferenceDataError(f"{path}: row {bad} is {rows[bad]!r}, not a [string, bool] pair")
        data = cls.from_strings([r[0] for r in rows])
        stored = torch.tensor([r[1] for r in rows], dtype=torch.bool)  # [batch]
        wrong = (stored != data.isbal).nonzero().squeeze(-1)
        if wrong.numel():
            shown = ", ".join(f"row {i} {rows[i][0]!r} labelled {rows[i][1]}" for i in wrong[:5].tolist())
            raise ReferenceDataError(f"{path}: {wrong.numel()} label(s) disagree with is_balanced: {shown}")
        return data

    def __len__(self) -> int:
        return len(self.strs)

    @property
    def seq_length(self) -> int:
        return self.toks.shape[-1]

    def __getitem__(self, idx: slice | torch.Tensor | Sequence[int]) -> BracketData:
        """A slice, a BoolTensor mask or integer indices give a new BracketData."""
        if isinstance(idx, int):
            raise TypeError("index BracketData with a slice or a mask; for one row use data[i:i + 1] or data.strs[i]")
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        return self.subset(idx)

    def subset(self, mask: torch.Tensor | Sequence[int]) -> BracketData:
        """Rows where ``mask`` (BoolTensor [batch]) is True, or at the given indices, in that order.

        Tokens are re-trimmed to the subset's longest string, as tokenizing the subset would do.
        """
        index = torch.as_tensor(mask).to("cpu")
        if index.numel() == 0 and index.ndim == 1:  # [] arrives as a float tensor
            index = index.long()
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise InputError(f"mask has shape {tuple(index.shape)}, expected ({len(self)},)")
            index = index.nonzero().squeeze(-1)  # [n_kept]
        elif index.dtype.is_floating_point or index.ndim != 1:
            raise InputError(f"subset needs a bool mask or 1-D integer indices, got {index.dtype} {tuple(index.shape)}")
        strs = [self.strs[i] for i in index.tolist()]
        picked = {f.name: getattr(self, f.name)[index.to(self.toks.device)] for f in dataclasses.fields(self)[1:]}
        width = int(picked["lengths"].max()) + 2 if len(strs) else 2
        picked["toks"] = picked["toks"][:, :width]
        return BracketData(strs=strs, **picked)

    def to(self, device: torch.device | str) -> BracketData:
        """A copy with every tensor on ``device`` (the strings are shared)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)[1:]}
        return BracketData(strs=self.strs, **moved)


def _is_pair(row: object) -> bool:
    return isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and isinstance(row[1], bool)


def distinct_rows(data: BracketData, exclude: Sequence[str] = (), n: int | None = None) -> BracketData:
    """The first ``n`` rows of ``data`` (all, if None) whose string is neither in ``exclude`` nor a
    repeat of an earlier row: a split disjoint from ``exclude`` by string, not just by row (the
    published file repeats strings, so rows beyond an evaluation set's are not held out by
    themselves). Fewer than ``n`` available is an InputError naming both numbers."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise InputError(f"n must be None or a non-negative int, got {n!r}")
    seen = set(exclude)
    index: list[int] = []
    for i, s in enumerate(data.strs):
        if n is not None and len(index) == n:
            break
        if s not in seen:
            seen.add(s)
            index.append(i)
    if n is not None and len(index) < n:
        raise InputError(f"only {len(index)} distinct strings outside `exclude` in {len(data)} rows, asked for {n}")
    return data.subset(torch.tensor(index, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


def _balanced_length_pmf() -> torch.Tensor:
    """P(half-length h) for h = 1..20, proportional to Catalan(h) / 4^h.

    That is the length distribution of balanced strings obtained by rejection from uniform strings
    of uniform even length -- what the reference file's balanced rows follow.
    """
    weights = [math.comb(2 * h, h) / (h + 1) / 4**h for h in range(1, _MAX_HALF + 1)]
    return torch.tensor(weights, dtype=torch.float64)  # [20]


def _random_bodies(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n uniform random strings of uniform even length 2..40: (body [n, 40] int8, lengths [n])."""
    lengths = 2 * torch.randint(1, _MAX_HALF + 1, (n,), generator=g)  # [n]
    body = torch.randint(OPEN, CLOSE + 1, (n, MAX_LEN), generator=g, dtype=torch.int8)  # [n, 40]
    return body, lengths


def _dyck_bodies(n: int, g: torch.Generator, half_pmf: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n balanced strings, lengths from ``_balanced_length_pmf``, uniform among those of their length.

    Cycle lemma: a uniformly random arrangement of h "(" and h + 1 ")" has exactly one rotation that
    is a balanced string followed by ")", namely the one starting just after the first minimum of
    its running sum; each balanced string arises from 2h + 1 arrangements, so it is uniform.
    Returns (body [n, 40] int8, lengths [n]).
    """
    if n == 0:  # multinomial refuses to draw zero samples
        return torch.empty(0, MAX_LEN, dtype=torch.int8), torch.empty(0, dtype=torch.long)
    pmf = _balanced_length_pmf() if half_pmf is None else half_pmf
    half = torch.multinomial(pmf, n, replacement=True, generator=g) + 1  # [n]
    m = 2 * half + 1  # [n]  arrangement length
    cols = torch.arange(MAX_LEN + 1)  # [41]
    outside = cols >= m[:, None]  # [n, 41]
    keys = torch.rand(n, MAX_LEN + 1, generator=g).masked_fill(outside, 2.0)  # [n, 41]
    order = keys.argsort(-1)  # [n, 41]  valid positions first, in uniformly random order
    up = torch.zeros(n, MAX_LEN + 1, dtype=torch.bool).scatter_(1, order, cols < half[:, None])  # [n, 41]
    steps = (2 * up.to(torch.int8) - 1).masked_fill(outside, 0)  # [n, 41]  +1 "(", -1 ")"
    running = steps.cumsum(-1, dtype=torch.int16).masked_fill(outside, MAX_LEN)  # [n, 41]
    first_min = running.argmin(-1)  # [n]  torch returns the first index of ties
    source = (first_min[:, None] + 1 + cols[None, :MAX_LEN]) % m[:, None]  # [n, 40]
    body = CLOSE - up.gather(1, source).to(torch.int8)  # [n, 40]  OPEN where up, else CLOSE
    return body, 2 * half


def generate(n: int, seed: int) -> BracketData:
    """n examples from the mixture that reproduces the reference data (module docstring).

    Deterministic for a seed; fully vectorised (no Python loop over examples).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    is_random = torch.rand(n, generator=g) < RANDOM_FRACTION  # [n]
    n_random = int(is_random.sum())
    rand_body, rand_len = _random_bodies(n_random, g)
    dyck_body, dyck_len = _dyck_bodies(n - n_random, g)
    body = torch.empty(n, MAX_LEN, dtype=torch.int8)  # [n, 40]
    lengths = torch.empty(n, dtype=torch.long)  # [n]
    body[is_random], lengths[is_random] = rand_body, rand_len
    body[~is_random], lengths[~is_random] = dyck_body, dyck_len
    width = int(lengths.max()) + 2 if n else 2
    return BracketData._from_valid(_assemble(body, lengths, width), lengths, None)


def _equal_count_bodies(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n uniformly random arrangements of h "(" and h ")" (h uniform in 1..20): the right count, and
    all but a 1/(h + 1) share of them go negative somewhere -- the kind our models miss most.
    Returns (body [n, 40] int8, lengths [n])."""
    half = torch.randint(1, _MAX_HALF + 1, (n,), generator=g)  # [n]
    cols = torch.arange(MAX_LEN)
    keys = torch.rand(n, MAX_LEN, generator=g).masked_fill(cols >= 2 * half[:, None], 2.0)
    order = keys.argsort(1)  # [n, 40]: the first 2h entries are a random permutation of 0..2h-1
    base = torch.where(cols < half[:, None], OPEN, CLOSE).to(torch.int8)  # h "(" then ")"
    return torch.gather(base, 1, order), 2 * half


def generate_training_mix(n: int, seed: int, equal_count_fraction: float = 0.125) -> BracketData:
    """A harder training distribution than the reference's (held-out evaluation still uses
    ``generate``): the reference mixture is dominated by short strings and easy unbalanced ones.
    ``equal_count_fraction`` of the mix are random equal-count strings (``_equal_count_bodies``:
    nearly all go negative, the errors our models make); of the rest, half is the reference
    mixture and half long-ish hard cases -- balanced strings of uniform length, the same with one
    bracket flipped (wrong count, often never negative) and with one "()" pair turned into ")("
    (right count, goes negative). Without the equal-count strings the mix has fewer right-count
    negative strings than the published distribution (7.3% vs 9.7%); with 1/8 it has 17%.
    Measured (one seed each, 24k steps at lr 5e-4): 99.79% on the published 100k without them,
    99.84% with 1/8, 99.82% with 1/4.
    """
    n_equal = int(round(n * equal_count_fraction))
    if n_equal:
        rest = generate_training_mix(n - n_equal, seed, 0.0)
        g = torch.Generator().manual_seed(seed + 99)
        body, lengths = _equal_count_bodies(n_equal, g)
        toks = torch.cat([rest.toks, _assemble(body, lengths, MAX_LEN + 2)])
        all_len = torch.cat([rest.lengths, lengths])
        order = torch.randperm(n, generator=g)
        return BracketData._from_valid(toks[order], all_len[order], None)
    g = torch.Generator().manual_seed(seed)
    n_ref = n // 2
    n_bal = (n - n_ref) // 2
    n_flip = (n - n_ref - n_bal) // 2
    n_swap = n - n_ref - n_bal - n_flip
    ref = generate(n_ref, seed)
    uniform = torch.ones(_MAX_HALF, dtype=torch.float64)
    bal, bal_len = _dyck_bodies(n_bal, g, uniform)
    flip, flip_len = _dyck_bodies(n_flip, g, uniform)
    pos = (torch.rand(n_flip, generator=g) * flip_len).long()  # [n_flip]
    rows = torch.arange(n_flip)
    flip[rows, pos] = (OPEN + CLOSE) - flip[rows, pos]
    swap, swap_len = _dyck_bodies(n_swap, g, uniform)
    # turn the first "()" at or after a random position into ")(": counts stay equal, goes negative
    # exactly when that pair sat at depth 0, which is common; the label is recomputed anyway
    start = (torch.rand(n_swap, generator=g) * (swap_len - 1)).long()  # [n_swap]
    cols = torch.arange(MAX_LEN - 1)
    pair = (swap[:, :-1] == OPEN) & (swap[:, 1:] == CLOSE) & (cols >= start[:, None]) & (cols < swap_len[:, None] - 1)
    has = pair.any(1)
    at = pair.float().argmax(1)  # [n_swap] first such pair
    r = torch.arange(n_swap)[has]
    swap[r, at[has]] = CLOSE
    swap[r, at[has] + 1] = OPEN
    body = torch.cat([bal, flip, swap])  # [n - n_ref, 40]
    lengths = torch.cat([bal_len, flip_len, swap_len])
    extra = _assemble(body, lengths, MAX_LEN + 2)
    toks = torch.full((n, MAX_LEN + 2), PAD, dtype=torch.long)
    toks[:n_ref, : ref.toks.shape[1]] = ref.toks
    toks[n_ref:] = extra
    all_len = torch.cat([ref.lengths, lengths])
    order = torch.randperm(n, generator=g)
    return BracketData._from_valid(toks[order], all_len[order], None)


def generate_originators_style(n: int, seed: int, balanced_fraction: float = 0.26) -> BracketData:
    """A distribution like the one the published checkpoint's originators trained and scrubbed on
    (what is public of it, see issue 17): ``balanced_fraction`` balanced strings (uniform among the
    balanced strings of their length, lengths as in ``generate``: many of length 2), the rest
    uniformly random *unbalanced* strings of uniform even length 2..40. Its exact recipe is not
    public; this matches the stated shares (about a quarter balanced, about half of the unbalanced
    strings start with ")"). Vectorised; deterministic for a seed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    if not 0.0 <= balanced_fraction <= 1.0:
        raise InputError(f"balanced_fraction must be in [0, 1], got {balanced_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    n_bal = int(round(n * balanced_fraction))
    dyck_body, dyck_len = _dyck_bodies(n_bal, g)
    bodies, lens, have = [], [], 0
    while have < n - n_bal:  # random strings, the balanced ones dropped (~6% of a draw)
        body, length = _random_bodies(2 * (n - n_bal - have) + 16, g)
        steps = ((body == OPEN).to(torch.int8) - (body == CLOSE).to(torch.int8))
        steps = steps.masked_fill(torch.arange(MAX_LEN)[None, :] >= length[:, None], 0)
        balanced = (steps.sum(-1) == 0) & ~(steps.cumsum(-1, dtype=torch.int16) < 0).any(-1)
        bodies.append(body[~balanced])
        lens.append(length[~balanced])
        have += int((~balanced).sum())
    body = torch.cat([dyck_body] + bodies)[:n]
    lengths = torch.cat([dyck_len] + lens)[:n]
    order = torch.randperm(n, generator=g)
    toks = _assemble(body[order], lengths[order], MAX_LEN + 2)
    return BracketData._from_valid(toks, lengths[order], None)


# --- zoo entry -----------------------------------------------------------------------------------------

DATA_VERSION = "brackets-data-3"  # bump when generate(), the training mix or its targets change


def to_split(data: BracketData):
    """Tokens, is-balanced labels (1 = balanced) and lengths (for bucketing) as a training Split."""
    from circuits.zoo.train import Split

    return Split(data.toks, data.isbal.long(), data.lengths + 2)


def suffix_targets(data: BracketData) -> torch.Tensor:
    """Per-position training targets [n, pos]: at the read-out position 0 the label (1 = balanced);
    at each bracket, 1 if the suffix starting there has at least as many ")" as "(" (a string is
    balanced iff its counts agree and this holds at every bracket); -1 (no label) elsewhere.

    It is the quantity the seed's mechanism computes at every position (the elevation read from the
    right, as a 0/1 "not negative"): as auxiliary targets (TrainRecipe.aux_weight) it took our models
    from ~99.8% to above 99.9% on fresh strings in the same number of steps.
    """
    steps = _steps_of(data.toks).to(torch.int16)  # [n, pos] +1 "(", -1 ")", 0 otherwise
    from_here = steps.flip(-1).cumsum(-1).flip(-1)  # [n, pos] sum of steps from each position on
    is_bracket = steps != 0
    targets = torch.where(is_bracket, (from_here <= 0).long(), torch.full_like(data.toks, -1))
    targets[:, 0] = data.isbal.long()
    return targets  # [n, pos]


def make_split(n: int, seed: int):
    return to_split(generate(n, seed))


def make_train_split(n: int, seed: int):
    from circuits.zoo.train import Split

    data = generate_training_mix(n, seed)
    return Split(data.toks, suffix_targets(data), data.lengths + 2)


# --- training recipes (issue 17): variants of the zoo entry, each with its own store key ------------------


def make_originators_split(n: int, seed: int):
    """Label-only training split on the originators'-style distribution (generate_originators_style)."""
    return to_split(generate_originators_style(n, seed))


TUTORIAL_DROPOUT = 0.1  # nn.TransformerEncoder tutorial scaffold's default


def _tutorial_training_hooks(model, p: float, embed_scale: float, gen: torch.Generator) -> list:
    """Attach the tutorial scaffold's training-time extras to `model`'s hook points: token embeddings
    times `embed_scale`, and dropout `p` where nn.TransformerEncoderLayer (and the tutorial's
    PositionalEncoding) apply it: on embeddings + positions, on attention probabilities, on each
    sublayer's output and after the MLP's activation. Dropout masks come from `gen` (deterministic for
    a seed) and act only while `model.training`. Returns (hook point, fn) pairs to detach."""

    def dropout(x, hook):
        if not model.training or p == 0.0:
            return None
        keep = torch.empty(x.shape, dtype=x.dtype).bernoulli_(1.0 - p, generator=gen).to(x.device)
        return x * keep / (1.0 - p)

    attached = [(model.hook_embed, lambda x, hook: x * embed_scale)] if embed_scale != 1.0 else []
    for block in model.blocks:
        attached += [(block.hook_resid_pre, dropout)] if block is model.blocks[0] else []
        attached += [(block.attn.hook_pattern, dropout), (block.hook_attn_out, dropout),
                     (block.mlp.hook_post, dropout), (block.hook_mlp_out, dropout)]
    for point, fn in attached:
        point.fns.append(fn)
    return attached


def train_tutorial_style(entry, seed: int, progress=None):
    """A zoo `train_fn`: `entry`'s recipe trained with the tutorial scaffold's dropout and
    sqrt(d_model)-scaled token embeddings (entry.extra["dropout"], ["embed_scale"]). Both are
    training-time only: the embedding scale is folded into W_E afterwards (exact: (W_E s)[t] =
    s W_E[t]) and dropout is off at evaluation, so the stored model is a plain HookedTransformer
    that every claim reads as it reads the others."""
    import contextlib

    from circuits.zoo.registry import train_entry

    p = float(entry.extra.get("dropout", TUTORIAL_DROPOUT))
    scale = math.sqrt(entry.config.d_model) if entry.extra.get("embed_scale") == "sqrt_d_model" else 1.0

    @contextlib.contextmanager
    def tutorial_extras(model):
        gen = torch.Generator().manual_seed(seed + 424_242)
        attached = _tutorial_training_hooks(model, p, scale, gen)
        try:
            yield
        finally:
            for point, fn in attached:
                point.fns.remove(fn)
        with torch.no_grad():
            model.embed.W_E.mul_(scale)

    return train_entry(entry, seed, progress, during=tutorial_extras)


def _tutorial_ensemble_extras(entry) -> dict:
    """The same extras for the stacked trainer (circuits.zoo.ensemble.Extras): embedding scale, dropout,
    and the dropout generator's seed offset (seed + 424_242, as above)."""
    scale = math.sqrt(entry.config.d_model) if entry.extra.get("embed_scale") == "sqrt_d_model" else 1.0
    return {"embed_scale": scale, "p": float(entry.extra.get("dropout", TUTORIAL_DROPOUT)), "seed_offset": 424_242}


train_tutorial_style.ensemble_extras = _tutorial_ensemble_extras


def recipe_variants() -> dict:
    """The census recipes (issue 17), as `brackets@<name>` variants; evaluation and the final test set
    are the published distribution (`generate`) for every recipe, so their accuracies compare.

    * ``label_only``: cross-entropy on the two class logits at position 0 only (no per-position
      suffix targets), trained on the published distribution;
    * ``originators``: the same loss on a distribution like the originators' (about a quarter
      balanced, unbalanced strings uniformly random, even lengths 2..40 with many of length 2);
    * ``arena_like``: ``originators`` plus the tutorial scaffold's dropout 0.1 and sqrt(d_model)-scaled
      token embeddings (train_tutorial_style).
    One thread each (no per-position loss: the last block computes position 0 only), so two
    trainings share the machine's 2 cores instead of taking turns."""
    # Half the default recipe's 20k steps (otherwise its optimiser and early stop): the census trains
    # 15 of these on 2 cores shared with other work, and 20k steps took ~25 min a model there. The
    # census records their held-out accuracy (98.6-99.6% at 10k), so a reader sees they are short of
    # the 99.9% target.
    label = {"aux_weight": 0.0, "threads": 1, "readout_only": True, "fused_adamw": True,
             "steps": 10_000, "eval_every": 2000}
    base_data = {"eval": "circuits.tasks.brackets.generate", "train_targets": "label",
                 "version": DATA_VERSION, "random_fraction": RANDOM_FRACTION, "max_len": MAX_LEN}
    originators = {**base_data, "train": "generate_originators_style", "balanced_fraction": 0.26}
    return {
        "label_only": {"recipe": label, "make_train_split": make_split,
                       "data_recipe": {**base_data, "train": "generate"}},
        "originators": {"recipe": label, "make_train_split": make_originators_split, "data_recipe": originators},
        "arena_like": {"recipe": label, "make_train_split": make_originators_split, "train_fn": train_tutorial_style,
                       "extra": {"dropout": TUTORIAL_DROPOUT, "embed_scale": "sqrt_d_model"},
                       "data_recipe": {**originators, "train_time": {"dropout": TUTORIAL_DROPOUT,
                                                                     "embed_scale": "sqrt_d_model"}}},
    }


def zoo_entries() -> list:
    from circuits.model.transformer import TransformerConfig
    from circuits.zoo.train import TrainRecipe
    from circuits.zoo.registry import ZooEntry

    return [ZooEntry(
        name="brackets",
        description="balanced-bracket classifier, ARENA architecture (seed 000)",
        # SOURCE.md's architecture: pre-LN, 3 layers x 2 heads, d_model 56, sinusoidal positions,
        # [pad] keys masked, class read at position 0 (index 0 = unbalanced, 1 = balanced).
        config=TransformerConfig(n_layers=3, d_model=56, n_ctx=N_CTX, n_heads=2, d_mlp=56, d_vocab=VOCAB,
                                 d_vocab_out=2, act_fn="relu", normalization="LN", pad_token=PAD,
                                 positional="sinusoidal", readout="first"),
        # Small batches, many steps: measured to reach the held-out target sooner on 2 cores than
        # batches of 48-256. lr 5e-4 (1e-3 and 7e-4 were worse). The per-position suffix targets
        # (suffix_targets, weight 0.3) are what crosses 99.9%: without them every knob tried (lr,
        # batch, mixes, clipping, weight averaging, unbucketed batches, 32k steps) plateaued at
        # 99.75-99.86% on fresh strings. They need the whole last block (~5.7-6.4 ms a step on one
        # thread: 20k steps took 118-128 s), so the recipe uses both cores (1.25x faster); two such
        # trainings take turns (train.training_slot: side by side they ran 5x slower). The early
        # stop reads the 10k eval set at 99.95% (at 99.9% it could stop on a model 0.06% worse);
        # test_acc (100k fresh strings, scored once at the end) is the honest number.
        recipe=TrainRecipe(steps=20_000, batch_size=32, lr=5e-4, min_lr_frac=0.02, warmup_steps=300,
                           n_train=100_000, n_eval=10_000, eval_every=4000, target_metric=0.9995, threads=2,
                           fused_adamw=True, n_test=100_000, aux_weight=0.3),
        make_split=make_split,
        make_train_split=make_train_split,
        data_recipe={"eval": "circuits.tasks.brackets.generate", "train": "generate_training_mix",
                     "train_targets": "suffix_targets", "version": DATA_VERSION,
                     "random_fraction": RANDOM_FRACTION, "max_len": MAX_LEN},
        variants=recipe_variants(),
    )]
