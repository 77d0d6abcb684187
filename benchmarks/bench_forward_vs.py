"""bench_forward's variants of this checkout and of another one (e.g. the commit before a speed change),
side by side in ONE process: every variant of both round-robin, so machine load hits them alike.

    python benchmarks/bench_forward_vs.py --old /path/to/other/checkout [--reps 10] [--batches 1 64 1000]
        [--only cache_all_read cache_all_eager patch_reuse]

The other checkout's `circuits` package and `benchmarks/bench_forward.py` are imported first and set
aside under their own module objects (their code keeps the references it bound at import), then this
checkout's. Both build the bracket model from the same seed; their logits are checked equal (<= 1e-5)
and each side's variants against its own forward (bench_forward.check_variants) before timing.
TransformerLens and nnsight rows are left out (not what a change of ours moves).

Per variant and batch: the min per call over the reps of the wall clock (perf_counter) and of this
thread's CPU time (thread_time; the forward runs on 1 thread), each as a ratio to that side's own
`ours` (and the CPU time to its own `ours_full`), and new / old of the CPU time. CPU time is what a
busy machine disturbs least: preemption does not count, but cache and memory-bandwidth contention
(and the kernel's page-fault work, charged to the thread) still do.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from moment import moment_line
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent


def _load_bench(root: Path, module_name: str):
    """(root's benchmarks/bench_forward.py as `module_name`, its variants): imports root's `circuits`
    and builds the variants (make_variants imports the patching functions) while they are the ones in
    sys.modules; then every `circuits*` / `plain_model` module is taken out of sys.modules so that the
    next load imports anew."""
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(module_name, root / "benchmarks" / "bench_forward.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import circuits

        if Path(circuits.__file__).resolve().parent.parent != root.resolve():
            raise SystemExit(f"{root}: imported circuits from {circuits.__file__}, not from this checkout")
        model = module.bracket_model()
        variants = module.make_variants(model, module.PlainTransformer.from_hooked(model).eval())
    finally:
        sys.path[:] = [p for p in sys.path if p not in (str(root), str(root / "benchmarks"))]
        for name in [m for m in sys.modules if m == "circuits" or m.startswith("circuits.") or m == "plain_model"]:
            del sys.modules[name]
    return module, variants


def _time(fn: Callable, x, calls: int) -> tuple[float, float]:
    w, c = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - w) / calls, (time.thread_time() - c) / calls


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, type=Path, help="the other checkout (its root directory)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1000])
    p.add_argument("--only", nargs="+", default=None, help="only these variants (plus ours, ours_full, plain, patch)")
    p.add_argument("--target-s", type=float, default=0.02, help="seconds of wall clock one timing aims at")
    args = p.parse_args(argv)
    loaded = {"old": _load_bench(args.old.resolve(), "bench_forward_old"),
              "new": _load_bench(HERE.parent, "bench_forward_new")}
    new_bf = loaded["new"][0]
    import torch

    torch.set_num_threads(1)
    sides = {}
    for label, (bf, variants) in loaded.items():
        if args.only:
            keep = {"plain", "ours", "ours_full", "patch", *args.only}
            variants = {k: v for k, v in variants.items() if k in keep}
        sides[label] = (bf, variants)
    names = [n for n in sides["new"][1] if n in sides["old"][1]]
    load = os.getloadavg()
    print(f"torch {torch.__version__}, 1 thread, {args.reps} interleaved reps (old and new together), min per "
          f"call; old = {args.old}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} "
          f"cores; {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC", flush=True)
    with torch.inference_mode():
        x = new_bf.bracket_tokens(64)
        diff = float((sides["old"][1]["ours"](x) - sides["new"][1]["ours"](x)).abs().max())
        if not diff <= 1e-5:
            raise AssertionError(f"old and new logits differ by {diff:.3g}")
        for label, (bf, variants) in sides.items():
            bf.check_variants(variants, x)
        print(f"logits: old vs new {diff:.1e}; each side's variants checked against its own forward", flush=True)
        print(f"{'batch':>6} {'variant':<16} {'old wall':>9} {'new wall':>9} {'old cpu':>8} {'new cpu':>8} "
              f"{'new/old cpu':>11} {'new cpu ms':>10} {'old /full':>9} {'new /full':>9}   (wall, cpu: / that "
              f"side's ours; / full: cpu / that side's ours_full)")
        for batch in args.batches:
            x = new_bf.bracket_tokens(batch)
            runs = [(label, n, sides[label][1][n]) for n in names for label in ("old", "new")]
            for _, _, fn in runs:  # warm-up
                fn(x)
            if any(m == "circuits" or m.startswith("circuits.") for m in sys.modules):
                # a function-level import ran: it got whichever circuits sys.path finds, not its side's
                raise SystemExit("a variant imported circuits at call time (a function-level import): one side "
                                 "would run the other's (or an installed) code; move that import to module level")
            one = _time(sides["new"][1]["ours"], x, 3)[0]
            calls = max(1, int(args.target_s / max(one, 1e-7)))
            best = {(label, n): [float("inf"), float("inf")] for label, n, _ in runs}
            for rep in range(args.reps):
                k = rep % len(runs)
                for label, n, fn in runs[k:] + runs[:k]:
                    w, c = _time(fn, x, calls)
                    b = best[(label, n)]
                    b[0], b[1] = min(b[0], w), min(b[1], c)
            for n in names:
                ow, oc = best[("old", n)]
                nw, nc = best[("new", n)]
                print(f"{batch:>6} {n:<16} {ow / best[('old', 'ours')][0]:>9.2f} {nw / best[('new', 'ours')][0]:>9.2f} "
                      f"{oc / best[('old', 'ours')][1]:>8.2f} {nc / best[('new', 'ours')][1]:>8.2f} {nc / oc:>11.2f} "
                      f"{nc * 1e3:>10.3f} {oc / best[('old', 'ours_full')][1]:>9.2f} "
                      f"{nc / best[('new', 'ours_full')][1]:>9.2f}", flush=True)
    print(moment_line())


if __name__ == "__main__":
    main()
