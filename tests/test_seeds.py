"""circuits.zoo.seeds: the one parser and check for training seeds (bounded, linear, capped)."""

from __future__ import annotations

import pytest

from circuits.zoo import seeds as S
from circuits.errors import CircuitsError, InputError


@pytest.mark.parametrize("spec, expected", [
    ("0-4", (0, 1, 2, 3, 4)), ("1,3", (1, 3)), ("2", (2,)), (" 5 - 6 , 0 ", (5, 6, 0)), ("7-7", (7,)),
    ("9223372036854775807", (2**63 - 1,)), ("007", (7,)),
])
def test_parse_seeds(spec, expected):
    assert S.parse_seeds(spec) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("", "a value is needed"), ("  ", "a value is needed"), ("a", "is not a seed"), ("1,,2", "is not a seed"),
    ("-1", "is not a seed"), ("4-2", "range end 2 is before its start 4"), ("1,2,1", "seed 1 is given twice"),
    ("0-3,2-5", "seed 2 is given twice"), ("9223372036854775808", "too large"),
    ("0-99999999999999999999", "too large"), ("1" * 5000, "too large"), ("0-100000", "at most 100000"),
    ("0-99999,100000", "at most 100000"),
])
def test_parse_seeds_rejects_with_one_clear_message(spec, fragment):
    with pytest.raises(InputError, match=fragment) as exc:
        S.parse_seeds(spec)
    assert isinstance(exc.value, (CircuitsError, ValueError)) and "\n" not in str(exc.value)


def test_parse_seeds_is_linear(monkeypatch):
    """0-20000 used to take 9 s (a list.count per seed). Count the membership tests instead of timing:
    the duplicate check must do O(n) work, not O(n^2)."""
    calls = {"n": 0}

    class CountingSet(set):
        def __contains__(self, item):
            calls["n"] += 1
            return super().__contains__(item)

    monkeypatch.setattr(S, "set", CountingSet, raising=False)
    seeds = S.parse_seeds("0-20000")
    assert seeds == tuple(range(20001))
    assert calls["n"] == 20001, "one membership test per seed"


def test_huge_range_is_refused_before_it_is_expanded(monkeypatch):
    """The cap is checked on the range's bounds: expanding 10**18 seeds would never end."""
    monkeypatch.setattr(S, "range", lambda *a: pytest.fail("expanded a range over the cap"), raising=False)
    with pytest.raises(InputError, match="at most"):
        S.parse_seeds("0-1000000000000000000")


@pytest.mark.parametrize("bad, fragment", [(-1, "non-negative"), (2**63, "too large"), (True, "non-negative"),
                                           (1.0, "non-negative"), ("3", "non-negative")])
def test_check_seed(bad, fragment):
    assert S.check_seed(0) == 0 and S.check_seed(2**63 - 1) == 2**63 - 1
    with pytest.raises(InputError, match=fragment):
        S.check_seed(bad)


def test_every_accepted_seed_seeds_torch():
    import torch

    for s in (0, S.MAX_SEED):
        torch.Generator().manual_seed(S.check_seed(s))


def test_the_largest_seed_trains(monkeypatch):
    """Seeds up to 2**63-1 are accepted, so the data seeds derived from them must fit torch's seed
    type (they overflowed: 1_000_003 * 2**63); small seeds keep their data seeds (and store keys)."""
    import sys
    from pathlib import Path

    from circuits.zoo import train as T
    from circuits.zoo import registry as zoo

    assert T.data_seeds(0) == (1_000_003, 2_000_010) and T.final_test_seed(4) == 15_000_096
    for s in (2**40, S.MAX_SEED):
        derived = (*T.data_seeds(s), T.final_test_seed(s))
        assert all(0 <= d < 2**62 for d in derived) and len(set(derived)) == 3
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_zoo import tiny_entry

    _, card = zoo.train_entry(tiny_entry(), seed=S.MAX_SEED)
    assert card["steps"] == 40
