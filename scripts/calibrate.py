"""The README's calibration table: each decision rule's pass rate with the true value at its
threshold, over many seeds (circuits/claims/calibration.py; tests/test_calibration.py checks fast
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

from circuits.claims import calibration as C  # noqa: E402


def arena_rule(population_draws: int = 40) -> C.Rule:
    """Per-example losses of hypothesis 1b (hypotheses/test_brackets_scrubbing.py) on the committed
    ARENA checkpoint and the published strings, one row per draw: the population of the rule."""
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hypotheses"))
    import test_brackets_scrubbing as H
    from circuits.tasks.brackets import reference
    from circuits.analysis import scrub as S

    torch.set_num_threads(1)
    model, data = reference.arena_model(), reference.arena_data()
    hyp = H.built(model, data, ["1.0", "2.0"], "2.1")["1b"]
    sd = S.ScrubData(model, data.toks, data.isbal.long())
    s_rows, b_rows = [], []
    with torch.no_grad():
        for k in range(population_draws):
            draw = S._Draw(sd, torch.Generator().manual_seed(k))
            rest = draw.random()
            s_rows.append(sd.loss(sd.logits(draw.final_resid(hyp, rest))).numpy())
            b_rows.append(sd.loss(sd.clean_logits[rest]).numpy())
    return C.scrub_on_losses("ARENA checkpoint, hypothesis 1b, published strings (40 draws x 5,000)",
                             np.stack(s_rows), np.stack(b_rows), 1000, 5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1000, help="draw seeds per rule (default 1000)")
    ap.add_argument("--quick", action="store_true", help="only the small-sample rules")
    ap.add_argument("--arena", action="store_true",
                    help="add scrub_claim on the ARENA checkpoint's losses (hypothesis 1b, 40 draws x 5,000 "
                         "published strings as the population)")
    ap.add_argument("--arena-only", action="store_true", help="only that row")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="only the rows whose 'rule n=N' contains TEXT (repeatable), e.g. --only 'scrub_claim n=2000'")
    args = ap.parse_args(argv)
    rules = [] if args.arena_only else C.rules(1 if args.quick else 2) + [C.point_close_to(30)]
    if args.only:
        rules = [r for r in rules if any(t in f"{r.name} n={r.n}" for t in args.only)]
    if args.arena or args.arena_only:
        rules.append(arena_rule())
    print(f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with "
          f"`python scripts/calibrate.py --seeds {args.seeds}{' --quick' if args.quick else ''}"
          f"{''.join(f' --only {t!r}' for t in args.only)}`.\n")
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
