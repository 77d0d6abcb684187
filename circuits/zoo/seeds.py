"""One source of truth for training seeds: what a seed may be, and the `--seeds` syntax.

A seed is an integer in [0, 2**63): torch.Generator.manual_seed takes a signed 64-bit value, and a
larger one used to crash deep inside torch (or, through pytest's option parsing, as an
INTERNALERROR). A seed list ("0-4", "1,3", "2", or any comma-separated mix) is parsed in time
linear in its length and capped at MAX_SEEDS seeds, so a typo such as "0-20000000" is a clear
error instead of a minute of parsing and a sweep nobody meant to start.
"""

from __future__ import annotations

import re

from circuits.errors import InputError

__all__ = ["MAX_SEED", "MAX_SEEDS", "SEEDS_USAGE", "check_seed", "parse_seeds"]

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's limit (a signed 64-bit integer)
MAX_SEEDS = 100_000  # more models than any sweep here trains; bounds the work of a typo
SEEDS_USAGE = "use e.g. 0-4, 1,3 or 2 (integers from 0 to 2**63-1)"

_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")
_SINGLE = re.compile(r"\d+")


def check_seed(seed) -> int:
    """``seed`` itself if it is an int in [0, 2**63), else :class:`InputError` saying why."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be a non-negative integer, got {seed!r} ({type(seed).__name__})")
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed}")
    if seed > MAX_SEED:
        raise InputError(f"seed {seed} is too large: seeds go up to 2**63-1 = {MAX_SEED}")
    return seed


def _bounded(text: str, spec: str) -> int:
    # digits only (the regexes say so); a 4,000-digit number would cost int() quadratic time, so the
    # length is checked before converting
    if len(text.lstrip("0")) > len(str(MAX_SEED)):
        raise InputError(f"seeds {spec!r}: {text[:25]}{'...' if len(text) > 25 else ''} is too large: "
                         f"seeds go up to 2**63-1; {SEEDS_USAGE}")
    value = int(text)
    if value > MAX_SEED:
        raise InputError(f"seeds {spec!r}: {value} is too large: seeds go up to 2**63-1; {SEEDS_USAGE}")
    return value


def parse_seeds(spec: str, max_count: int = MAX_SEEDS) -> tuple[int, ...]:
    """``"0-4"`` -> (0, 1, 2, 3, 4); ``"1,3"`` -> (1, 3); ``"2"`` -> (2,); order kept.

    Raises :class:`InputError` (a ValueError) naming the problem: empty, not a seed or range, a
    reversed range, a seed above 2**63-1, a seed given twice, or more than ``max_count`` seeds.
    Linear time: ranges are counted before they are expanded, duplicates found with a set.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"seeds: a value is needed; {SEEDS_USAGE}")
    parts: list[tuple[int, int]] = []
    count = 0
    for tok in spec.split(","):
        tok = tok.strip()
        m = _RANGE.fullmatch(tok)
        if m:
            a, b = _bounded(m.group(1), spec), _bounded(m.group(2), spec)
            if b < a:
                raise InputError(f"seeds {spec!r}: range end {b} is before its start {a}; {SEEDS_USAGE}")
        elif _SINGLE.fullmatch(tok):
            a = b = _bounded(tok, spec)
        else:
            raise InputError(f"seeds {spec!r}: {tok[:40]!r} is not a seed or a range of seeds; {SEEDS_USAGE}")
        count += b - a + 1
        if count > max_count:  # checked before expanding, so a huge range costs nothing
            raise InputError(f"seeds {spec!r}: {count} or more seeds; at most {max_count} at once")
        parts.append((a, b))
    seeds: list[int] = []
    seen: set[int] = set()
    for a, b in parts:
        for s in range(a, b + 1):
            if s in seen:
                raise InputError(f"seeds {spec!r}: seed {s} is given twice; {SEEDS_USAGE}")
            seen.add(s)
            seeds.append(s)
    return tuple(seeds)
