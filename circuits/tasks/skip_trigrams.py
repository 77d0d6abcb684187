"""Skip-trigrams with a one-layer attention-only model (seed 002).

Sequences of ``SEQ_LEN`` = 4 tokens from a vocabulary of 11 (0..10):

* with probability 1/2 a *signal* sequence ``[a, noise, b, 0]``: ``a, b`` uniform in 1..4, ``noise``
  uniform in 5..10; its label is the index of the unordered pair ``{a, b}`` in the seed's
  ``ANS_MAP`` (10 classes, 0..9), so ``[2, 7, 3, 0]`` and ``[3, 9, 2, 0]`` are both class 5;
* otherwise a *noise* sequence of four tokens uniform in 5..10, with a label uniform in 0..10
  (11 values, independent of the tokens: nothing can be learnt about it).

Labels and logits. The model's logits are over its 11 output tokens (one-hot unembed,
d_model = d_vocab = d_vocab_out = 11), and, as in the seed (``CrossEntropyLoss(output, y)`` on
``output = model(X)[:, -1]``), a label ``y`` is used directly as the index of its logit: pair class
``c`` (0..9) is logit ``c``, and logit 10 is never a signal class; it is only ever the label of noise
sequences (1/11 of them). Because the unembed is the identity, logit ``c`` is also residual-stream
dimension ``c``, which is what makes the seed's ``get_head_to_logits`` a plain read-off.

The Bayes optimum: signal sequences are classified perfectly and noise sequences at chance, so the
best accuracy is 1/2 + 1/2 * 1/11 = 0.5455 and the best cross-entropy 1/2 * ln 11 = 1.199 nats
(signal: 0; noise: ln 11 for the uniform prediction).

The seed's ``SkipTrigramDataset`` called ``torch.manual_seed`` *after* generating its data (so the
data were never seeded) and built its causal mask from the score values (``triu(scores).bool()``
masks any non-zero score above the diagonal, i.e. it relied on scores never being exactly 0). Here
generation takes an explicit seed and the mask comes from positions (``attention="causal"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from circuits.errors import InputError

__all__ = [
    "VOCAB", "SEQ_LEN", "N_CLASSES", "N_PAIR_CLASSES", "ANS_MAP", "SIGNAL_TOKENS", "NOISE_TOKENS",
    "BAYES_ACCURACY", "BAYES_LOSS", "pair_label", "sequence_label", "is_signal", "SkipTrigramData",
    "generate", "HEAD_COUNTS", "entry_name",
]

VOCAB = 11
SEQ_LEN = 4
N_CLASSES = 11  # logits / label values (noise labels use all 11)
N_PAIR_CLASSES = 10  # signal classes 0..9
SIGNAL_TOKENS = (1, 2, 3, 4)
NOISE_TOKENS = (5, 6, 7, 8, 9, 10)
END = 0  # the last token of a signal sequence
P_SIGNAL = 0.5
# the seed's ans_map, verbatim
ANS_MAP = {(1, 1): 0, (1, 2): 1, (1, 3): 2, (1, 4): 3, (2, 2): 4, (2, 3): 5, (2, 4): 6, (3, 3): 7, (3, 4): 8,
           (4, 4): 9}
BAYES_ACCURACY = P_SIGNAL + (1 - P_SIGNAL) / N_CLASSES  # 0.5455
BAYES_LOSS = (1 - P_SIGNAL) * float(torch.log(torch.tensor(float(N_CLASSES), dtype=torch.float64)))  # 1.199

# [5, 5] lookup table: _PAIR_TABLE[a, b] = ANS_MAP[sorted(a, b)] (-1 where undefined)
_PAIR_TABLE = torch.full((5, 5), -1, dtype=torch.long)
for (_a, _b), _c in ANS_MAP.items():
    _PAIR_TABLE[_a, _b] = _PAIR_TABLE[_b, _a] = _c


def _check_token(x: object, allowed: Sequence[int], what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x not in allowed:
        raise InputError(f"{what} must be an int in {tuple(allowed)}, got {x!r}")
    return x


def pair_label(a: int, b: int) -> int:
    """Class of the unordered pair {a, b} (a, b in 1..4): the seed's ans_map[tuple(sorted((a, b)))]."""
    _check_token(a, SIGNAL_TOKENS, "a")
    _check_token(b, SIGNAL_TOKENS, "b")
    return ANS_MAP[(min(a, b), max(a, b))]


def _check_sequence(seq: object) -> list[int]:
    if isinstance(seq, torch.Tensor):
        seq = seq.tolist()
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
        raise InputError(f"a sequence must be a list of {SEQ_LEN} token ids, got {type(seq).__name__}")
    seq = list(seq)
    if len(seq) != SEQ_LEN:
        raise InputError(f"a sequence must have {SEQ_LEN} tokens, got {len(seq)}: {seq!r}")
    for i, t in enumerate(seq):
        _check_token(t, range(VOCAB), f"token {i}")
    return seq


def is_signal(seq: Sequence[int]) -> bool:
    """True for ``[a, noise, b, 0]`` with a, b in 1..4 and noise in 5..10; False for four noise tokens.
    Anything else is not a sequence of this task (InputError)."""
    seq = _check_sequence(seq)
    if all(t in NOISE_TOKENS for t in seq):
        return False
    if seq[0] in SIGNAL_TOKENS and seq[1] in NOISE_TOKENS and seq[2] in SIGNAL_TOKENS and seq[3] == END:
        return True
    raise InputError(f"{seq!r} is neither a signal sequence [a, noise, b, 0] (a, b in 1..4, noise in 5..10) "
                     "nor four noise tokens (5..10)")


def sequence_label(seq: Sequence[int]) -> int | None:
    """The label a signal sequence determines (its pair class); None for noise (its label is random)."""
    seq = _check_sequence(seq)
    return pair_label(seq[0], seq[2]) if is_signal(seq) else None


@dataclasses.dataclass(eq=False)
class SkipTrigramData:
    toks: torch.Tensor  # [n, 4] long
    labels: torch.Tensor  # [n] long in 0..10 (signal: pair class 0..9; noise: uniform 0..10)
    signal: torch.Tensor  # [n] bool

    def __post_init__(self) -> None:
        n = self.toks.shape[0]
        if self.labels.shape != (n,) or self.signal.shape != (n,):
            raise InputError(f"SkipTrigramData fields disagree on rows: toks {tuple(self.toks.shape)}, "
                             f"labels {tuple(self.labels.shape)}, signal {tuple(self.signal.shape)}")

    def __len__(self) -> int:
        return self.toks.shape[0]

    def subset(self, index: torch.Tensor) -> "SkipTrigramData":
        index = torch.as_tensor(index)
        if index.dtype == torch.bool and index.shape != (len(self),):
            raise InputError(f"mask has shape {tuple(index.shape)}, expected ({len(self)},)")
        return SkipTrigramData(self.toks[index], self.labels[index], self.signal[index])

    @property
    def pair(self) -> torch.Tensor:
        """[n] pair class of signal rows, -1 on noise rows."""
        return torch.where(self.signal, _PAIR_TABLE[self.toks[:, 0].clamp(0, 4), self.toks[:, 2].clamp(0, 4)], -1)


def generate(n: int, seed: int, p_signal: float = P_SIGNAL) -> SkipTrigramData:
    """n sequences of the seed's distribution (module docstring); deterministic for a seed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    if not 0.0 <= p_signal <= 1.0:
        raise InputError(f"p_signal must be a probability, got {p_signal!r}")
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(NOISE_TOKENS[0], NOISE_TOKENS[-1] + 1, (n, SEQ_LEN), generator=g)  # [n, 4]
    signal = torch.rand(n, generator=g) < p_signal  # [n]
    a = torch.randint(1, 5, (n,), generator=g)
    b = torch.randint(1, 5, (n,), generator=g)
    noise_label = torch.randint(0, N_CLASSES, (n,), generator=g)
    toks[signal, 0] = a[signal]
    toks[signal, 2] = b[signal]
    toks[signal, 3] = END
    labels = torch.where(signal, _PAIR_TABLE[a, b], noise_label)
    return SkipTrigramData(toks, labels, signal)


# --- zoo entries: the seed's 3-head model and the head-count sweep --------------------------------------

DATA_VERSION = "skip-trigrams-data-1"
HEAD_COUNTS = (1, 2, 3, 4, 5, 6)
DEFAULT_HEADS = 3  # the seed's model


def entry_name(n_heads: int) -> str:
    """Zoo name of the sweep model with ``n_heads`` heads of d_head 1 (3 is the seed's model)."""
    if n_heads not in HEAD_COUNTS:
        raise InputError(f"the sweep covers n_heads in {HEAD_COUNTS}, got {n_heads!r}")
    return "skip_trigrams" if n_heads == DEFAULT_HEADS else f"skip_trigrams_h{n_heads}"


def make_split(n: int, seed: int):
    from circuits.zoo.train import Split

    d = generate(n, seed)
    return Split(d.toks, d.labels)


def zoo_entries() -> list:
    from circuits.model.transformer import TransformerConfig
    from circuits.zoo.train import TrainRecipe
    from circuits.zoo.registry import ZooEntry

    return [
        ZooEntry(
            name=entry_name(h),
            description=(f"skip-trigram 1-layer attention-only model, {h} head{'s' if h > 1 else ''} of d_head 1"
                         + (" (seed 002)" if h == DEFAULT_HEADS else " (seed 002 head sweep)")),
            # the seed's OneLayerAttnOnly: frozen one-hot embed and unembed (d_model = d_vocab = 11),
            # heads of d_head 1, no positional embedding, no LayerNorm, causal, logits at the last position
            config=TransformerConfig(n_layers=1, d_model=VOCAB, n_ctx=SEQ_LEN, n_heads=h, d_head=1, d_mlp=0,
                                     d_vocab=VOCAB, d_vocab_out=VOCAB, normalization=None, attention="causal",
                                     positional="none", embed="one_hot", unembed="one_hot", readout="last",
                                     init_range=0.3),
            recipe=TrainRecipe(steps=1500, batch_size=512, lr=3e-2, warmup_steps=100, weight_decay=0.0,
                               n_train=100_000, n_eval=20_000, eval_every=250, bucket_by_length=False,
                               threads=1),
            make_split=make_split,
            data_recipe={"eval": "circuits.tasks.skip_trigrams.generate", "version": DATA_VERSION,
                         "p_signal": P_SIGNAL},
            extra={"n_heads": h},
        )
        for h in HEAD_COUNTS
    ]
