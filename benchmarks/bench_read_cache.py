"""The read cache of every hook point against our forward, as a caller calling it in a loop sees it.

    python benchmarks/bench_read_cache.py [--root CHECKOUT] [--batches 64 1000] [--reps 3] [--calls 4]
    python benchmarks/bench_read_cache.py [--root CHECKOUT] --rss {default,eager,deferred} [--batch 1000]

Timing mode: the bracket model of bench_forward, 1 thread, this thread's CPU time. Each variant runs
`--calls` times in a row per rep (variants round-robin, rotated each rep); a call's cost depends on
what the previous call left in the C allocator (glibc hands freed memory back to the system, and a
cache of batch 1000, ~480 MiB, then comes back as fresh pages whose first touch is a page fault), so
the first call after another variant is reported apart from the later ones, which are what a loop
of the same call pays. Minor page faults per call are counted (getrusage). `full+write` is
`ours_full` followed by filling fresh tensors of the cache's storage sizes: what writing the cache's
bytes into new memory adds to the forward that computes every position, a floor for caching them.
bench_forward_vs.py runs both trees in one process, so one side's frees move the other's faults:
this script runs one checkout per process (`--root`, default this one).

RSS mode: one process, one cache of every hook point at `--batch` with every entry read (default:
run_with_cache's choice; eager: defer=False; deferred: defer=True), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from moment import moment_line


def _load(root: Path):
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "benchmarks"))
    import bench_forward as bf
    import circuits

    if Path(circuits.__file__).resolve().parent.parent != root.resolve():
        raise SystemExit(f"{root}: imported circuits from {circuits.__file__}, not from this checkout")
    return bf


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 1000])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--rss", choices=["default", "eager", "deferred"])
    p.add_argument("--batch", type=int, default=1000)
    args = p.parse_args(argv)
    bf = _load(args.root)
    import torch

    torch.set_num_threads(1)
    model = bf.bracket_model()
    if args.rss:
        x = bf.bracket_tokens(args.batch)
        kwargs = {} if args.rss == "default" else {"defer": args.rss == "deferred"}
        with torch.inference_mode():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            bf._read_all(*model.run_with_cache(x, **kwargs))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{args.root}: {args.rss} cache read at batch {args.batch}: peak RSS {peak / 1024:.1f} MiB "
              f"(before caching {before / 1024:.1f} MiB)")
        return
    load = os.getloadavg()
    print(f"{args.root}; torch {torch.__version__}, 1 thread, CPU time; {args.reps} reps x {args.calls} calls in a "
          f"row; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    with torch.inference_mode():
        for batch in args.batches:
            x = bf.bracket_tokens(batch)
            _, cache = model.run_with_cache(x, defer=False)
            storages = {}
            for name in cache:
                s = cache[name].untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            del cache, s
            sizes = list(storages.values())

            def write_floor():
                out = model(x, readout_only=False)
                return out, [torch.empty(n // 4).fill_(1.0) for n in sizes]

            variants = {
                "ours": lambda: model(x),
                "ours_full": lambda: model(x, readout_only=False),
                "default, unread": lambda: model.run_with_cache(x),
                "default, read": lambda: bf._read_all(*model.run_with_cache(x)),
                "eager, read": lambda: bf._read_all(*model.run_with_cache(x, defer=False)),
                "deferred, unread": lambda: model.run_with_cache(x, defer=True),
                "deferred, read": lambda: bf._read_all(*model.run_with_cache(x, defer=True)),
                "full+write": write_floor,
            }
            for fn in variants.values():
                fn()
            first = {n: [] for n in variants}
            later = {n: [] for n in variants}
            faults = {n: [] for n in variants}
            names = list(variants)
            for rep in range(args.reps):
                k = rep % len(names)
                for n in names[k:] + names[:k]:
                    for i in range(args.calls):
                        f0, t0 = _faults(), time.thread_time()
                        variants[n]()
                        dt, df = time.thread_time() - t0, _faults() - f0
                        (first if i == 0 else later)[n].append(dt)
                        if i:
                            faults[n].append(df)
            ours, full = min(later["ours"]), min(later["ours_full"])
            print(f"batch {batch}: the cache holds {sum(sizes) / 2**20:.1f} MiB in {len(sizes)} storages; "
                  f"ours {ours * 1e3:.3f} ms")
            print(f"  {'variant':<17} {'first / ours':>12} {'later / ours':>12} {'later / full':>12} "
                  f"{'median / ours':>13} {'faults / call':>13}")
            for n in names:
                med = sorted(later[n])[len(later[n]) // 2]
                fl = sorted(faults[n])[len(faults[n]) // 2]
                print(f"  {n:<17} {min(first[n]) / ours:>12.2f} {min(later[n]) / ours:>12.2f} "
                      f"{min(later[n]) / full:>12.2f} {med / ours:>13.2f} {fl:>13d}", flush=True)
    print(moment_line())


if __name__ == "__main__":
    main()
