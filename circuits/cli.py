"""`python -m circuits`: list the zoo, train a model, print a card, show the latest report.

  list                              zoo entries with their reference / cache status, then the
                                    associative-memory experiments of seed 004 (own trainer)
  train NAME [--seed S] [--device D] [--update-reference]
                                    train from scratch (progress bar) into the model store;
                                    --update-reference also writes fixtures/models/NAME.* (default seed)
  card NAME [--seed S]              print the JSON card of the reference (default seed) or cached model
  (NAME: a zoo entry, or an assoc_* experiment; its seed-0 reference is fixtures/models/NAME_s0.*)
  report [RUN] [--open]             print the latest (or named) run's Markdown summary; --open prints
                                    the HTML path
  report [RUN] --promote-baseline   copy the run to reports/baseline/ (what --compare baseline reads)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from . import zoo
from .errors import CircuitsError


def _status(name: str) -> tuple[str, str]:
    from .store import ModelStore, load_reference, spec_key

    entry = zoo.get_entry(name)
    spec = entry.spec(entry.default_seed)
    ref = _reference_status(lambda: load_reference(zoo.REFERENCE_DIR, name, spec))
    cached = set()
    for _, card in ModelStore().entries():
        seed = card.get("spec", {}).get("seed")
        # only entries this code would load: trained from the entry's current spec for that seed
        if card.get("spec", {}).get("name") == name and isinstance(seed, int) and seed >= 0 \
                and card.get("key") == spec_key(entry.spec(seed)):
            cached.add(seed)
    return ref, f"cached seeds {sorted(cached)}" if cached else "not cached"


def _reference_status(load) -> str:
    try:
        load()
        return "reference ok"
    except CircuitsError as e:
        return f"reference {type(e).__name__.replace('CheckpointError', '').lower() or 'error'}"


def _assoc_experiment(name: str):
    """The seed-004 experiment called `name`, or None for anything that is not an assoc_* name."""
    if not name.startswith("assoc_"):
        return None
    from .tasks import assoc_memory as A

    return A.get_experiment(name)


def cmd_list(args) -> int:
    for name in zoo.names():
        entry = zoo.get_entry(name)
        ref, cache = _status(name)
        print(f"{name:18s} {ref:22s} {cache:24s} {entry.description}")
    from .store import load_reference
    from .tasks import assoc_memory as A

    print("\nassociative memory (seed 004; python -m circuits.tasks.assoc_memory rewrites all references):")
    for name, exp in A.named_experiments().items():
        ref = _reference_status(lambda: load_reference(A.REFERENCE_DIR, exp.reference_name(0), exp.spec(0)))
        print(f"{name:26s} {ref:22s} {exp.description}")
    return 0


def _train_assoc(args, exp) -> int:
    from .store import ModelStore, save_reference
    from .tasks import assoc_memory as A
    from .train import TerminalProgress

    seed = 0 if args.seed is None else zoo.check_seed(args.seed)
    progress = TerminalProgress(f"training {exp.name} (seed {seed})")
    loaded = A.load_experiment(exp, seed, retrain=True, store=ModelStore(), progress=progress)
    progress.done(json.dumps({k: v for k, v in loaded.card["metrics"].items() if isinstance(v, float)}))
    if args.update_reference:
        card = save_reference(A.REFERENCE_DIR, exp.reference_name(seed), loaded.model.state_dict(), loaded.card)
        print(f"wrote reference {A.REFERENCE_DIR / exp.reference_name(seed)}.* (key {card['key'][:16]})")
    return 0


def cmd_train(args) -> int:
    from .store import ModelStore, save_reference
    from .train import TerminalProgress

    exp = _assoc_experiment(args.name)
    if exp is not None:
        return _train_assoc(args, exp)
    entry = zoo.get_entry(args.name)
    seed = entry.default_seed if args.seed is None else zoo.check_seed(args.seed)
    progress = TerminalProgress(f"training {args.name} (seed {seed})")
    loaded = zoo.load(args.name, seed, retrain=True, force=True, device=args.device, store=ModelStore(),
                      progress=progress)
    progress.done(json.dumps(loaded.card.get("metrics", {})))
    if args.update_reference:
        if seed != entry.default_seed:
            print(f"--update-reference needs the default seed {entry.default_seed}", file=sys.stderr)
            return 2
        from .convert import to_tl_state_dict

        card = save_reference(zoo.REFERENCE_DIR, args.name, to_tl_state_dict(loaded.model.cpu()), loaded.card)
        print(f"wrote reference {zoo.REFERENCE_DIR / args.name}.* (key {card['key'][:16]})")
    return 0


def _assoc_card(exp, seed: int) -> Optional[dict]:
    from .store import MissingCheckpointError, ModelStore, load_reference, spec_key
    from .tasks import assoc_memory as A

    try:
        return load_reference(A.REFERENCE_DIR, exp.reference_name(seed), exp.spec(seed))[1]
    except MissingCheckpointError:
        found = ModelStore().load(spec_key(exp.spec(seed)))
        return None if found is None else found[1]


def cmd_card(args) -> int:
    exp = _assoc_experiment(args.name)
    if exp is not None:
        seed = 0 if args.seed is None else zoo.check_seed(args.seed)
        card = _assoc_card(exp, seed)
        if card is None:
            print(f"{args.name} seed {seed} has no reference and is not in the model store; run `python -m "
                  f"circuits train {args.name} --seed {seed}`", file=sys.stderr)
            return 1
        return _print_card(card)
    entry = zoo.get_entry(args.name)
    seed = entry.default_seed if args.seed is None else zoo.check_seed(args.seed)
    if seed == entry.default_seed:
        from .store import load_reference

        _, card = load_reference(zoo.REFERENCE_DIR, args.name, entry.spec(seed))
    else:
        from .store import ModelStore, spec_key

        found = ModelStore().load(spec_key(entry.spec(seed)))
        if found is None:
            print(f"{args.name} seed {seed} is not in the model store; run `python -m circuits train "
                  f"{args.name} --seed {seed}`", file=sys.stderr)
            return 1
        card = found[1]
    return _print_card(card)


def _print_card(card: dict) -> int:
    card = dict(card)
    if "history" in card:
        card["history"] = f"<{len(card['history'])} rows>"
    print(json.dumps(card, indent=2, sort_keys=True))
    return 0


def cmd_report(args) -> int:
    from .report import resolve_report, set_baseline

    path = resolve_report(args.run or "latest", Path(args.report_dir))
    run_dir = Path(path).parent
    if args.promote_baseline:
        dest = set_baseline(run_dir, Path(args.report_dir))
        print(f"baseline <- {run_dir.name}: {dest}")
        return 0
    if args.open:
        print(run_dir / "report.html")
        return 0
    md = run_dir / "report.md"
    print(md.read_text() if md.exists() else f"(no report.md in {run_dir})")
    print(f"\nHTML: {run_dir / 'report.html'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="zoo entries and their status").set_defaults(fn=cmd_list)
    p = sub.add_parser("train", help="train a zoo model from scratch")
    p.add_argument("name")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--update-reference", action="store_true", help="also write fixtures/models/NAME.*")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("card", help="print a model card")
    p.add_argument("name")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=cmd_card)
    p = sub.add_parser("report", help="print the latest report summary")
    p.add_argument("run", nargs="?", default=None, help="run id, path, 'latest' or 'baseline'")
    p.add_argument("--report-dir", default=str(Path(__file__).resolve().parent.parent / "reports"))
    p.add_argument("--open", action="store_true", help="print the HTML report's path")
    p.add_argument("--promote-baseline", action="store_true",
                   help="copy the run (default: latest) to <report-dir>/baseline/, what --compare baseline reads")
    p.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except CircuitsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `python -m circuits list | head`: the reader left; not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
