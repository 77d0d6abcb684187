"""Tests for circuits.tasks.skip_trigrams: the label map, sequence checks, the generator (structure,
statistics, labels vs a plain loop, determinism), bad input, the Bayes constants and the zoo entries
(including the positional causal mask the seed got wrong)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from scipy import stats

from circuits.errors import InputError
from circuits.tasks import skip_trigrams as S

SEED_ANS_MAP = {(1, 1): 0, (1, 2): 1, (1, 3): 2, (1, 4): 3, (2, 2): 4, (2, 3): 5, (2, 4): 6, (3, 3): 7, (3, 4): 8,
                (4, 4): 9}


def loop_sample(rng: random.Random) -> tuple[list[int], int]:
    """The seed's generate_sample (prob = 2, prompt_length = 4), with Python's random module."""
    seq = [rng.randrange(5, 11) for _ in range(4)]
    if rng.randrange(2) == 1:
        a, b = rng.randrange(1, 5), rng.randrange(1, 5)
        seq[0], seq[-2], seq[-1] = a, b, 0
        return seq, SEED_ANS_MAP[tuple(sorted((a, b)))]
    return seq, rng.randrange(0, 11)


# --------------------------------------------------------------------------------------------------
# Labels and sequences
# --------------------------------------------------------------------------------------------------


def test_ans_map_is_the_seeds():
    assert S.ANS_MAP == SEED_ANS_MAP
    assert sorted(S.ANS_MAP.values()) == list(range(10))


def test_pair_label_is_symmetric_and_matches_the_map():
    for a in range(1, 5):
        for b in range(1, 5):
            assert S.pair_label(a, b) == S.pair_label(b, a) == SEED_ANS_MAP[tuple(sorted((a, b)))]


@pytest.mark.parametrize("a, b", [(0, 1), (1, 5), (5, 5), (1.0, 2), (True, 2), ("1", 2)])
def test_pair_label_rejects_bad_tokens(a, b):
    with pytest.raises(InputError, match="must be an int in"):
        S.pair_label(a, b)


@pytest.mark.parametrize("seq, signal, label", [
    ([2, 7, 3, 0], True, 5), ([3, 9, 2, 0], True, 5), ([1, 5, 1, 0], True, 0), ([4, 10, 4, 0], True, 9),
    ([5, 6, 7, 8], False, None), ([10, 10, 10, 10], False, None), (torch.tensor([1, 8, 4, 0]), True, 3),
])
def test_is_signal_and_sequence_label(seq, signal, label):
    assert S.is_signal(seq) is signal
    assert S.sequence_label(seq) == label


@pytest.mark.parametrize("seq, match", [
    ([1, 2, 3], "4 tokens"),
    ([1, 7, 3, 0, 0], "4 tokens"),
    ([1, 7, 3, 11], "token 3 must be"),
    ([1, 7, 3, -1], "token 3 must be"),
    ([1, 2, 3, 0], "neither a signal sequence"),
    ([5, 7, 3, 0], "neither a signal sequence"),
    ([1, 7, 3, 5], "neither a signal sequence"),
    ("1730", "list of 4 token ids"),
    (1730, "list of 4 token ids"),
])
def test_bad_sequences_are_rejected(seq, match):
    with pytest.raises(InputError, match=match):
        S.is_signal(seq)


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big():
    return S.generate(200_000, seed=0)


def test_generate_is_deterministic_and_seed_dependent():
    a, b, c = S.generate(5000, 3), S.generate(5000, 3), S.generate(5000, 4)
    assert torch.equal(a.toks, b.toks) and torch.equal(a.labels, b.labels) and torch.equal(a.signal, b.signal)
    assert not torch.equal(a.toks, c.toks)
    assert len(S.generate(0, 0)) == 0


def test_structure_and_labels_match_a_plain_loop(big):
    d = big.subset(torch.arange(20_000))
    for seq, label, sig in zip(d.toks.tolist(), d.labels.tolist(), d.signal.tolist()):
        assert S.is_signal(seq) is sig  # also checks the layout of every row
        if sig:
            assert label == SEED_ANS_MAP[tuple(sorted((seq[0], seq[2])))]
        else:
            assert 0 <= label <= 10
    assert torch.equal(d.pair[d.signal], d.labels[d.signal])
    assert bool((d.pair[~d.signal] == -1).all())


def test_generation_statistics(big):
    n = len(big)
    frac = float(big.signal.double().mean())
    assert abs(frac - 0.5) < 4 * (0.25 / n) ** 0.5
    noise = big.subset(~big.signal)
    signal = big.subset(big.signal)
    # noise labels uniform over all 11 values; noise tokens uniform over 5..10
    assert stats.chisquare(torch.bincount(noise.labels, minlength=11).numpy()).pvalue > 1e-4
    assert stats.chisquare(torch.bincount(noise.toks.reshape(-1) - 5, minlength=6).numpy()).pvalue > 1e-4
    # signal classes: a == b pairs have probability 1/16, the others 2/16
    expected = torch.tensor([2.0 if a != b else 1.0 for (a, b) in sorted(S.ANS_MAP, key=S.ANS_MAP.get)]) / 16
    counts = torch.bincount(signal.labels, minlength=10).double()
    assert stats.chisquare(counts.numpy(), (expected * len(signal)).numpy()).pvalue > 1e-4
    assert bool((signal.toks[:, 1] >= 5).all()) and bool((signal.toks[:, 3] == 0).all())


def test_distribution_matches_the_seed_procedure(big):
    """Joint (signal, label) frequencies agree with the seed's per-sample loop (other RNG)."""
    rng = random.Random(0)
    loop = Counter()
    for _ in range(40_000):
        seq, label = loop_sample(rng)
        loop[(seq[-1] == 0, label)] += 1
    ours = Counter(zip(big.signal.tolist(), big.labels.tolist()))
    keys = sorted(set(loop) | set(ours))
    table = [[loop.get(k, 0) for k in keys], [ours.get(k, 0) for k in keys]]
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_bayes_constants():
    assert S.BAYES_ACCURACY == pytest.approx(0.5 + 0.5 / 11)
    assert S.BAYES_LOSS == pytest.approx(0.5 * math.log(11))
    assert round(S.BAYES_ACCURACY, 3) == 0.545 and round(S.BAYES_LOSS, 3) == 1.199


@pytest.mark.parametrize("kwargs, match", [
    ({"n": -1, "seed": 0}, "non-negative"), ({"n": 2.0, "seed": 0}, "non-negative"),
    ({"n": 10, "seed": 0, "p_signal": -0.1}, "probability"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        S.generate(**kwargs)


def test_subset_checks(big):
    with pytest.raises(InputError, match="mask has shape"):
        big.subset(torch.ones(3, dtype=torch.bool))
    with pytest.raises(InputError, match="disagree"):
        S.SkipTrigramData(big.toks[:3], big.labels[:2], big.signal[:3])


# --------------------------------------------------------------------------------------------------
# Zoo entries
# --------------------------------------------------------------------------------------------------


def test_sweep_entries_and_names():
    from circuits.zoo import registry as zoo

    assert [S.entry_name(h) for h in S.HEAD_COUNTS] == [
        "skip_trigrams_h1", "skip_trigrams_h2", "skip_trigrams", "skip_trigrams_h4", "skip_trigrams_h5",
        "skip_trigrams_h6"]
    for h in S.HEAD_COUNTS:
        cfg = zoo.get_entry(S.entry_name(h)).config
        assert (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_model, cfg.d_vocab) == (1, h, 1, 0, 11, 11)
        assert (cfg.embed, cfg.unembed, cfg.positional, cfg.normalization) == ("one_hot", "one_hot", "none", None)
        assert (cfg.attention, cfg.readout, cfg.d_vocab_out) == ("causal", "last", 11)
    for bad in (0, 7, "3"):
        with pytest.raises(InputError, match="sweep covers"):
            S.entry_name(bad)


def test_model_reads_the_last_position_with_a_positional_causal_mask():
    from circuits.zoo import registry as zoo

    model = zoo.build_model(zoo.get_entry("skip_trigrams"), 0)
    toks = S.generate(8, 0).toks
    assert model(toks).shape == (8, 11)
    # with all-zero scores the seed's mask (triu(scores).bool()) masked nothing; ours masks by position
    with torch.no_grad():
        model.blocks[0].attn.W_Q.zero_()
        _, cache = model.run_with_cache(toks, names=["blocks.0.attn.hook_pattern"])
    pattern = cache["blocks.0.attn.hook_pattern"][0, 0]
    expected = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5)[:, None]
    assert torch.allclose(pattern, expected)
    # the embed and unembed are frozen identities
    assert torch.equal(model.embed.W_E, torch.eye(11)) and not model.embed.W_E.requires_grad
    assert torch.equal(model.unembed.W_U, torch.eye(11)) and not model.unembed.W_U.requires_grad
