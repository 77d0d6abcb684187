"""Tests for circuits.tasks.palindromes: definitions, tokenizer, generator (statistics, labels vs a
plain loop, determinism), bad input, and the zoo entry's configuration."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from scipy import stats

from circuits.errors import InputError
from circuits.tasks import palindromes as P


# --------------------------------------------------------------------------------------------------
# Plain-loop oracles: the seed's dataset, written per string with Python's random module
# --------------------------------------------------------------------------------------------------


def loop_is_palindrome(s: str) -> bool:
    return s == s[::-1]


def loop_distance(s: str) -> int:
    return sum(1 for i in range(len(s) // 2) if s[i] != s[-1 - i])


def loop_sample(rng: random.Random, k: int = 5, times: int = 8) -> tuple[str, bool]:
    half = [rng.choice(P.ALPHABET) for _ in range(k)]
    s = half + half[::-1]
    perturbed = rng.random() < 0.5
    if perturbed:
        for _ in range(times):
            i, j = rng.randrange(2 * k), rng.randrange(2 * k)
            s[i] = s[j]
    return "".join(s), perturbed


# --------------------------------------------------------------------------------------------------
# Definitions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s, pal, dist", [
    ("", True, 0), ("a", True, 0), ("abba", True, 0), ("abcba", True, 0), ("abca", False, 1),
    ("abcdeedcba", True, 0), ("abcdeedcbz", False, 1), ("zbcdeedcba", False, 1), ("bacdeedcab", True, 0),
    ("abcdefghij", False, 5), ("aaaaaaaaab", False, 1),
])
def test_is_palindrome_and_distance(s, pal, dist):
    assert P.is_palindrome(s) is pal
    assert P.palindrome_distance(s) == dist
    assert (P.palindrome_distance(s) == 0) == P.is_palindrome(s)


@pytest.mark.parametrize("bad", ["Abba", "ab ba", "ab1a", "abé", "ab-a"])
def test_bad_characters_are_named(bad):
    with pytest.raises(InputError, match="invalid character"):
        P.is_palindrome(bad)
    with pytest.raises(InputError, match="invalid character"):
        P.palindrome_distance(bad)


@pytest.mark.parametrize("bad", [None, 12, ["abba"], b"abba"])
def test_non_strings_are_rejected(bad):
    with pytest.raises(InputError, match="not a str"):
        P.is_palindrome(bad)


def test_mirror_position():
    assert [P.mirror_position(p) for p in range(1, 11)] == list(range(10, 0, -1))
    for bad in (0, 11, -1):
        with pytest.raises(InputError, match="not a letter position"):
            P.mirror_position(bad)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def test_tokenize_layout_and_roundtrip():
    strings = ["abcdeedcba", "zzzzzzzzzz", "qwertyuiop"]
    toks = P.tokenize(strings)
    assert toks.dtype == torch.long and toks.shape == (3, P.N_CTX)
    assert (toks[:, 0] == P.CLS).all() and (toks[:, -1] == P.SEP).all()
    assert toks[0, 1:-1].tolist() == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]
    assert toks[1, 1:-1].tolist() == [25] * 10
    assert P.detokenize(toks) == strings
    assert P.tokenize([]).shape == (0, P.N_CTX) and P.detokenize(P.tokenize([])) == []
    assert (P.PAD, P.CLS, P.SEP, P.VOCAB) == (26, 27, 28, 29)


@pytest.mark.parametrize("bad, match", [
    ("abcdeedcba", "wrap it in a list"),
    (["abcdeedcb"], "length 9"),
    (["abcdeedcbaa"], "length 11"),
    (["abcdeEdcba"], "invalid character 'E' at index 5"),
    (["abcdeedcba", 7], "item 1 is int"),
])
def test_tokenize_rejects_bad_input(bad, match):
    with pytest.raises(InputError, match=match):
        P.tokenize(bad)


def test_tokenize_other_lengths():
    toks = P.tokenize(["abba", "abca"], length=4)
    assert toks.shape == (2, 6) and P.detokenize(toks) == ["abba", "abca"]


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[27, 0, 0, 29]]), "not \\[CLS\\]"),
    (torch.tensor([[0, 0, 0, 28]]), "not \\[CLS\\]"),
    (torch.tensor([[27, 0, 26, 28]]), "not \\[CLS\\]"),
    (torch.tensor([[27.0, 0, 0, 28]]), "integer dtype"),
    (torch.tensor([27, 0, 0, 28]), "shape"),
    ([[27, 0, 0, 28]], "token tensor"),
])
def test_detokenize_rejects_bad_tokens(bad, match):
    with pytest.raises(InputError, match=match):
        P.detokenize(bad)


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big():
    return P.generate(100_000, seed=0)


def test_generate_is_deterministic_and_seed_dependent():
    a, b, c = P.generate(2000, 7), P.generate(2000, 7), P.generate(2000, 8)
    assert torch.equal(a.toks, b.toks) and torch.equal(a.perturbed, b.perturbed)
    assert not torch.equal(a.toks, c.toks)
    assert P.generate(0, 1).toks.shape == (0, P.N_CTX)


def test_labels_and_distances_match_a_plain_loop(big):
    strings = big.strs[:20_000]
    assert big.labels[:20_000].tolist() == [int(loop_is_palindrome(s)) for s in strings]
    assert big.distance[:20_000].tolist() == [loop_distance(s) for s in strings]


def test_from_strings_recomputes_labels_and_distances(big):
    again = P.PalindromeData.from_strings(big.strs[:1000])
    assert torch.equal(again.labels, big.labels[:1000]) and torch.equal(again.distance, big.distance[:1000])


def test_unperturbed_rows_are_palindromes_of_the_right_form(big):
    clean = big.subset(~big.perturbed)
    assert bool((clean.labels == 1).all())
    letters = big.toks[:, 1:-1]
    assert bool(((letters >= 0) & (letters < 26)).all())


def test_generation_statistics(big):
    n = len(big)
    assert abs(float(big.perturbed.double().mean()) - 0.5) < 4 * (0.25 / n) ** 0.5
    pal = float(big.labels.double().mean())
    # half unperturbed + the perturbed strings that stay palindromes (~1%)
    assert 0.5 < pal < 0.52, pal
    still = float(big.labels[big.perturbed].double().mean())
    assert 0.005 < still < 0.02, still
    # letters are uniform over the alphabet (first half, unperturbed rows)
    counts = torch.bincount(big.toks[~big.perturbed, 1:6].reshape(-1), minlength=26)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4


def test_distance_distribution_matches_the_seed_procedure(big):
    """The vectorised perturbation reproduces the seed's per-string procedure (plain loop, other RNG)."""
    rng = random.Random(0)
    loop = Counter(loop_distance(loop_sample(rng)[0]) for _ in range(30_000))
    ours = Counter(big.distance.tolist())
    table = [[loop.get(k, 0) for k in range(6)], [ours.get(k, 0) for k in range(6)]]
    assert stats.chi2_contingency(table).pvalue > 1e-3, table


def test_training_mix_has_more_near_misses():
    mix = P.generate_training_mix(20_000, 3)
    ref = P.generate(20_000, 3)
    assert torch.equal(mix.labels, (mix.distance == 0).long())
    assert float((mix.distance == 1).double().mean()) > 3 * float((ref.distance == 1).double().mean())
    assert 0.45 < float(mix.labels.double().mean()) < 0.55
    assert torch.equal(mix.toks, P.generate_training_mix(20_000, 3).toks)


@pytest.mark.parametrize("kwargs, match", [
    ({"n": -1, "seed": 0}, "non-negative"),
    ({"n": 1.5, "seed": 0}, "non-negative"),
    ({"n": True, "seed": 0}, "non-negative"),
    ({"n": 10, "seed": 0, "k": 6}, "k must be"),
    ({"n": 10, "seed": 0, "k": 0}, "k must be"),
    ({"n": 10, "seed": 0, "perturb_n_times": -1}, "perturb_n_times"),
    ({"n": 10, "seed": 0, "p_perturb": 1.5}, "probability"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        P.generate(**kwargs)


def test_smaller_k_and_no_perturbation():
    d = P.generate(500, 1, k=3, p_perturb=0.0)
    assert d.toks.shape == (500, 8) and bool((d.labels == 1).all())
    d = P.generate(500, 1, perturb_n_times=0, p_perturb=1.0)
    assert bool((d.labels == 1).all())


def test_generate_distinct_letters():
    d = P.generate_distinct(3000, 4)
    assert d.toks.shape == (3000, P.N_CTX) and bool((d.toks[:, 0] == P.CLS).all()) and bool((d.toks[:, -1] == P.SEP).all())
    assert all(len(set(s)) == P.SEQ_LEN for s in d.strs)  # ten distinct letters each
    assert bool((d.labels == 0).all()) and bool((d.distance == P.K).all())  # never a palindrome, every pair broken
    assert torch.equal(d.toks, P.generate_distinct(3000, 4).toks)
    assert not torch.equal(d.toks, P.generate_distinct(3000, 5).toks)
    counts = Counter(d.toks[:, 1:-1].reshape(-1).tolist())  # every letter about equally often at every position
    assert stats.chisquare([counts[i] for i in range(P.N_LETTERS)]).pvalue > 1e-4
    first = Counter(d.toks[:, 1].tolist())
    assert stats.chisquare([first[i] for i in range(P.N_LETTERS)]).pvalue > 1e-4
    assert P.generate_distinct(5, 0, length=3).toks.shape == (5, 5)


@pytest.mark.parametrize("kwargs, match", [
    ({"n": -1, "seed": 0}, "non-negative"),
    ({"n": 3, "seed": 0, "length": 27}, "distinct"),
    ({"n": 3, "seed": 0, "length": 1}, "distinct"),
])
def test_generate_distinct_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        P.generate_distinct(**kwargs)


def test_subset_and_row_checks(big):
    sub = big.subset(torch.tensor([0, 5, 9]))
    assert sub.strs == [big.strs[i] for i in (0, 5, 9)]
    with pytest.raises(InputError, match="mask has shape"):
        big.subset(torch.ones(3, dtype=torch.bool))
    with pytest.raises(InputError, match="rows"):
        P.PalindromeData(big.toks[:3], big.labels[:2], big.distance[:3], big.perturbed[:3])


# --------------------------------------------------------------------------------------------------
# Zoo entry
# --------------------------------------------------------------------------------------------------


def test_zoo_entry_is_the_seed_architecture():
    from circuits.zoo import registry as zoo

    entry = zoo.get_entry("palindromes")
    cfg = entry.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (3, 32, 2, 16, 64)
    assert (cfg.act_fn, cfg.normalization, cfg.attention, cfg.readout) == ("relu", None, "bidirectional", "first")
    assert (cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx) == (29, 2, 12)
    model = zoo.build_model(entry, 0)
    out = model(P.generate(4, 0).toks)
    assert out.shape == (4, 2)
    split = entry.make_split(100, 5)
    assert split.inputs.shape == (100, 12) and split.targets.dtype == torch.long


def test_the_seed_recipe_is_the_notebooks():
    """palindromes@seed (issue 34): the seed notebook's training cell: Adam lr 1e-4 (no weight decay,
    default betas), batch 32, one epoch over 1M strings of the plain distribution, constant lr, no clipping."""
    from circuits.zoo import registry as zoo
    from circuits.zoo.train import lr_at

    entry = zoo.get_entry("palindromes@seed")
    r = entry.recipe
    assert (r.lr, r.batch_size, r.n_train, r.weight_decay, tuple(r.betas), r.grad_clip) == (1e-4, 32, 1_000_000, 0.0, (0.9, 0.999), 0.0)
    assert r.steps * r.batch_size == r.n_train  # one epoch
    assert {lr_at(s, r) for s in (0, 1, 5_000, r.steps - 1)} == {1e-4}
    assert entry.make_train_split is P.make_split and entry.config == zoo.get_entry("palindromes").config
    cfg = entry.config
    assert (cfg.d_model, cfg.normalization, cfg.attention, cfg.n_layers, cfg.n_heads, cfg.d_mlp) == (32, None, "bidirectional", 3, 2, 64)
