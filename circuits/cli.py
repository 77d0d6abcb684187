"""`python -m circuits`: list the zoo, train a model, print a card, show the latest report.

  list                              every zoo entry (all model families, one registry) with its
                                    reference / cache status
  train NAME [--seed S] [--device D] [--update-reference]
                                    train from scratch (progress bar) into the model store;
                                    --update-reference also writes fixtures/models/NAME.* (a reference seed)
  card NAME [--seed S]              print the JSON card of the reference (reference seeds) or cached model
  (NAME: a zoo entry, or NAME@VARIANT for one of its recipe variants)
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


def _status(name: str, store_cards: Optional[list] = None) -> tuple[str, str]:
    from .store import ModelStore, load_reference, spec_key

    entry = zoo.get_entry(name)
    if entry.ref_seeds():
        ref = _reference_status(lambda: [load_reference(zoo.REFERENCE_DIR, entry.reference_name(s), entry.spec(s))
                                         for s in entry.ref_seeds()])
    else:
        ref = "no reference"
    cached = set()
    cards = store_cards if store_cards is not None else [card for _, card in ModelStore().entries()]
    for card in cards:
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


def cmd_list(args) -> int:
    from .store import ModelStore

    cards = [card for _, card in ModelStore().entries()]  # read the store once for every entry
    names = zoo.names()
    width = max(map(len, names), default=18)
    for name in names:
        entry = zoo.get_entry(name)
        ref, cache = _status(name, cards)
        print(f"{name:{width}s} {entry.family:14s} {ref:22s} {cache:24s} {entry.description}")
    return 0


def cmd_train(args) -> int:
    from .store import ModelStore
    from .train import TerminalProgress

    entry = zoo.get_entry(args.name)
    seed = entry.default_seed if args.seed is None else zoo.check_seed(args.seed)
    progress = TerminalProgress(f"training {args.name} (seed {seed})")
    loaded = zoo.load(args.name, seed, retrain=True, force=True, device=args.device, store=ModelStore(),
                      progress=progress)
    progress.done(json.dumps({k: v for k, v in (loaded.card.get("metrics") or {}).items() if isinstance(v, float)}))
    if args.update_reference:
        if seed not in entry.ref_seeds():
            print(f"--update-reference needs a reference seed of {args.name} ({list(entry.ref_seeds())})",
                  file=sys.stderr)
            return 2
        card = zoo.save_reference(loaded)
        print(f"wrote reference {zoo.REFERENCE_DIR / entry.reference_name(seed)}.* (key {card['key'][:16]})")
    return 0


def cmd_card(args) -> int:
    entry = zoo.get_entry(args.name)
    seed = entry.default_seed if args.seed is None else zoo.check_seed(args.seed)
    card = zoo.find_card(args.name, seed)
    if card is None:
        print(f"{args.name} seed {seed} is not in the model store; run `python -m circuits train "
              f"{args.name} --seed {seed}`", file=sys.stderr)
        return 1
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
