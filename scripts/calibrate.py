"""The README's calibration table: each decision rule's pass rate with the true value at its
threshold, over many seeds (circuits/calibration.py; tests/test_calibration.py checks fast
configurations with 200 seeds).

    CIRCUITS_THREADS=1 python scripts/calibrate.py --seeds 1000 > calibration.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from circuits import calibration as C  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1000, help="draw seeds per rule (default 1000)")
    ap.add_argument("--quick", action="store_true", help="only the small-sample rules")
    args = ap.parse_args(argv)
    rules = C.rules(1 if args.quick else 2) + [C.point_close_to(30)]
    print(f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with "
          f"`python scripts/calibrate.py --seeds {args.seeds}{' --quick' if args.quick else ''}`.\n")
    print("| rule | population (true value = threshold) | n | nominal | pass rate at threshold [95% Wilson] | seeds |")
    print("|---|---|---|---|---|---|")
    for rule in rules:
        t = time.time()
        rate = C.pass_rate(rule, args.seeds)
        flag = "" if rate.lo <= rule.nominal else " **above nominal**"
        print(f"| {rule.name} | {rule.population} | {rule.n} | {rule.nominal:.1%} | "
              f"{rate.rate:.2%} [{rate.lo:.2%}, {rate.hi:.2%}]{flag} | {rate.seeds} |", flush=True)
        print(f"{rule.name} n={rule.n}: {time.time() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
