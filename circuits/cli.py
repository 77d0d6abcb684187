"""`python -m circuits`: list the zoo, train a model, print a card, show the latest report.

  list                              every zoo entry (all model families, one registry) with its
                                    reference / cache status
  train NAME [--seed S] [--device D] [--force] [--update-reference]
                                    train into the model store, or reuse the model it has (or
                                    wait for another process training it); --force retrains;
                                    --update-reference also writes fixtures/models/NAME.* (a reference seed)
  sweep NAME|'PATTERN' --seeds 0-19 [--backend local|ray] [--address A] [--device D] [--workers N]
        [--ensemble K]
                                    train the seeds the store lacks in parallel, reuse the rest
  card NAME [--seed S]              print the JSON card of the reference (reference seeds) or cached model
  (NAME: a zoo entry, or NAME@VARIANT for one of its recipe variants)
  report [RUN] [--markdown] [--open]
                                    print the latest (or named) run as plain text (--markdown: its
                                    report.md); --open also opens its HTML page in a browser
  report [RUN] --promote-baseline   copy the run to reports/baseline/ (what --circuits-compare baseline reads)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from circuits import paths
from circuits.zoo import registry as zoo
from circuits.errors import CircuitsError, InputError


# seeds whose store keys `list` checks against entries with an unreadable card (their card names no seed)
_LIST_SEEDS = range(32)


def _status(name: str, store_cards: Optional[list] = None, unreadable: Optional[dict] = None) -> tuple[str, str]:
    from circuits.zoo.store import ModelStore, load_reference, spec_key

    entry = zoo.get_entry(name)
    if entry.ref_seeds():
        ref = _reference_status(lambda: [load_reference(zoo.REFERENCE_DIR, entry.reference_name(s), entry.spec(s, "single"))
                                         for s in entry.ref_seeds()])
    else:
        ref = "no reference"
    cached, corrupt = set(), set()
    store = ModelStore(_store_root())
    cards = store_cards if store_cards is not None else [card for _, card in store.entries()]
    for card in cards:
        seed = card.get("spec", {}).get("seed")
        # only entries this code would load: trained from the entry's current spec for that seed
        if card.get("spec", {}).get("name") == name and isinstance(seed, int) and seed >= 0 \
                and card.get("key") == spec_key(entry.spec(seed)):
            # verified (weights hash, safetensors, card hash): a truncated entry is not "cached"
            (cached if store.verify(card["key"])[0] == "ok" else corrupt).add(seed)
    unreadable = store.unreadable() if unreadable is None else unreadable
    if unreadable:  # a card that cannot be read names no seed: match the keys of the likely ones
        for seed in {*_LIST_SEEDS, entry.default_seed, *entry.ref_seeds()}:
            if spec_key(entry.spec(seed)) in unreadable:
                corrupt.add(seed)
    text = f"cached seeds {sorted(cached)}" if cached else "not cached"
    return ref, text + (f", corrupt seeds {sorted(corrupt)} (retrained on use)" if corrupt else "")


def _store_root():
    """The CLI's model store: $CIRCUITS_CACHE, else ./.circuits-cache (never the package's folder)."""
    from circuits.zoo.store import default_cache_dir

    return default_cache_dir(Path.cwd())


def _reference_status(load) -> str:
    try:
        load()
        return "reference ok"
    except CircuitsError as e:
        return f"reference {type(e).__name__.replace('CheckpointError', '').lower() or 'error'}"


def cmd_list(args) -> int:
    from circuits.zoo.store import ModelStore

    store = ModelStore(_store_root())
    cards = [card for _, card in store.entries()]  # read the store once for every entry
    unreadable = store.unreadable()
    names = zoo.names()
    width = max(map(len, names), default=18)
    for name in names:
        entry = zoo.get_entry(name)
        ref, cache = _status(name, cards, unreadable)
        print(f"{name:{width}s} {entry.family:14s} {ref:22s} {cache:24s} {entry.description}")
    for key, problem in unreadable.items():  # every corrupt entry is shown, also one no zoo name matches
        print(f"corrupt model store entry {key}: {problem} (removed and rebuilt when its model is next used)")
    return 0


def cmd_train(args) -> int:
    from circuits.zoo.sweep import check_run_settings
    from circuits.zoo.seeds import check_seed
    from circuits.zoo.store import ModelStore

    # everything a training needs is checked before it starts (a typo must not cost a trained model)
    device, root, timeout = check_run_settings(args.device)
    entry = zoo.get_entry(args.name)
    seed = entry.default_seed if args.seed is None else check_seed(args.seed)
    loaded = _train_or_reuse(args.name, seed, device=device, force=args.force, root=root, timeout=timeout)
    if loaded is None:
        return 1
    if args.update_reference:
        if seed not in entry.ref_seeds():
            print(f"--update-reference needs a reference seed of {args.name} ({list(entry.ref_seeds())})",
                  file=sys.stderr)
            return 2
        card = zoo.save_reference(loaded)
        print(f"wrote reference {zoo.REFERENCE_DIR / entry.reference_name(seed)}.* (key {card['key'][:16]})")
    return 0


def _train_or_reuse(name: str, seed: int, *, device: str, force: bool, root, timeout: float):
    """`train`: reuse a stored model, wait for one another process is training, or train it (--force:
    always train). Returns the LoadedModel."""
    from circuits.zoo.store import ModelStore, spec_key
    from circuits.zoo.train import TerminalProgress

    store = ModelStore(root)
    key = spec_key(zoo.get_entry(name).spec(seed))
    if not force and store.verify(key)[0] == "ok":
        print(f"{name} seed {seed} is already in the model store ({store.entry_dir(key)}); reusing it "
              "(--force retrains)", file=sys.stderr)
    else:
        holder = store.holder(key)
        if holder is not None:
            print(f"{name} seed {seed} is being trained by another process ({holder}); waiting up to "
                  f"{timeout:g} s for it, then reusing it", file=sys.stderr)
    progress = TerminalProgress(f"training {name} (seed {seed})")
    loaded = zoo.load(name, seed, retrain=True, force=force, device=device, store=store, progress=progress)
    metrics = json.dumps({k: v for k, v in (loaded.card.get("metrics") or {}).items() if isinstance(v, float)})
    if loaded.source == "trained":
        progress.done(metrics)
    else:
        print(f"{name} seed {seed}: reused from the model store {metrics}", file=sys.stderr)
    return loaded


def cmd_sweep(args) -> int:
    from circuits.zoo.seeds import parse_seeds
    from circuits.zoo.sweep import check_run_settings, run_sweeps

    check_run_settings(args.device)  # before anything starts
    seeds = parse_seeds(args.seeds)
    results = run_sweeps(sweep_names(args.name), seeds, backend=args.backend, address=args.address,
                         device=args.device, workers=args.workers, ensemble=args.ensemble)
    for result in results.values():
        print(f"{result.name}: {len(result.trained)} trained, {len(result.reused)} reused, {len(result.failed)} failed"
              + (f" (seeds {sorted(result.failed)})" if result.failed else ""), file=sys.stderr)
    return 0 if all(r.ok for r in results.values()) else 1


def sweep_names(pattern: str) -> list[str]:
    """A zoo name (``brackets``, ``brackets@label_only``) or a shell pattern over the zoo's names and
    variants (``'assoc_exp2_*'``: a whole grid in one pool); a pattern matching nothing is an error."""
    import fnmatch

    if not any(c in pattern for c in "*?["):
        zoo.get_entry(pattern)  # an unknown name: the zoo's own one-line error
        return [pattern]
    found = [n for n in zoo.names(include_variants=True) if fnmatch.fnmatchcase(n, pattern)]
    if not found:
        raise InputError(f"sweep: no zoo entry matches {pattern!r} (python -m circuits list shows them)")
    return found


def cmd_card(args) -> int:
    from circuits.zoo.seeds import check_seed

    from circuits.zoo.store import ModelStore, spec_key

    entry = zoo.get_entry(args.name)
    seed = entry.default_seed if args.seed is None else check_seed(args.seed)
    store = ModelStore(_store_root())
    if seed not in entry.ref_seeds():
        status, problem = store.verify(spec_key(entry.spec(seed)))
        if status == "corrupt":  # say so (read-only: `card` never deletes the entry)
            print(f"{args.name} seed {seed}: its model store entry is corrupt ({problem}); `python -m circuits "
                  f"train {args.name} --seed {seed}` rebuilds it", file=sys.stderr)
            return 1
    card = zoo.find_card(args.name, seed, store=store)
    if card is None:
        print(f"{args.name} seed {seed} is not in the model store; run `python -m circuits train "
              f"{args.name} --seed {seed}`", file=sys.stderr)
        return 1
    return _print_card(card)


def _print_card(card: dict) -> int:
    from circuits.report.views import held_out

    card = dict(card)
    interval = held_out(card.get("metrics"), zoo.card_n_test(card))
    if interval is not None:  # derived here, not stored: the stored card stays what training wrote
        card["test_acc_wilson95"] = {"n_test": interval["n_test"], "lo": round(interval["lo"], 6),
                                     "hi": round(interval["hi"], 6)}
    if "history" in card:
        card["history"] = f"<{len(card['history'])} rows>"
    print(json.dumps(card, indent=2, sort_keys=True))
    return 0


def cmd_report(args) -> int:
    from circuits.report import load_report, rederive, resolve_report, set_baseline, terminal_lines

    report_dir = Path(args.report_dir) if args.report_dir else paths.reports_dir(Path.cwd())
    path = resolve_report(args.run or "latest", report_dir)
    run_dir = Path(path).parent
    if args.promote_baseline:
        dest = set_baseline(run_dir, report_dir)
        print(f"baseline <- {run_dir.name}: {dest}")
        return 0
    html = run_dir / "report.html"
    if args.markdown:
        md = run_dir / "report.md"
        print(md.read_text() if md.exists() else f"(no report.md in {run_dir})")
    else:  # the terminal summary pytest printed, as plain text
        report = rederive(load_report(path, report_dir))
        report.html_path = str(html)
        print("\n".join(text for text, _ in terminal_lines(report)))
    if args.open:
        _open_in_browser(html)
    elif args.markdown:  # (the plain text's last line already names the page)
        print(f"\nHTML: {html}")
    return 0


def _open_in_browser(html: Path) -> None:
    """Open the page where a browser exists (webbrowser); say where it is either way."""
    import webbrowser

    try:
        opened = webbrowser.open(html.resolve().as_uri())
    except webbrowser.Error:
        opened = False
    print(f"{'opened' if opened else 'no browser found here; open it yourself'}: {html}")


def check_census_args(args) -> None:
    """What a census would find wrong only after its runs: checked first (InputError, exit 2)."""
    import math

    from circuits.paths import check_output_dir

    if args.acc_target is not None and not (math.isfinite(args.acc_target) and 0 <= args.acc_target <= 1):
        raise InputError(f"--acc-target {args.acc_target!r}: expected an accuracy in [0, 1]")
    try:
        check_output_dir(Path(args.out) / args.name, "--out", f"census.json goes to OUT/{args.name}/")
    except ValueError as e:
        raise InputError(str(e)) from None


def cmd_census(args) -> int:
    from circuits.zoo.census import run_census
    from circuits.zoo.seeds import parse_seeds

    check_census_args(args)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    run_census(args.name, recipes, parse_seeds(args.seeds), args.module, out=Path(args.out), workers=args.workers,
               select=args.select, recipe_select=args.recipe_select, reference=not args.no_reference,
               acc_target=args.acc_target, train=not args.no_train, rerun=args.rerun, jobs=args.jobs,
               main_only=not args.with_controls, ensemble=args.ensemble)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="zoo entries and their status").set_defaults(fn=cmd_list)
    train_help = ("train a zoo model into the model store, or reuse the model the store already has for this "
                  "name, seed and spec (or wait for another process training it); --force retrains")
    p = sub.add_parser("train", help=train_help, description=train_help)
    p.add_argument("name", help="zoo entry, or NAME@VARIANT for one of its recipe variants (see `list`)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the entry's reference seed)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N, mps")
    p.add_argument("--update-reference", action="store_true", help="also write fixtures/models/NAME.*")
    p.add_argument("--force", action="store_true", help="retrain even if the model store has the model")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("sweep", help="train many seeds in parallel (what the store lacks)")
    p.add_argument("name", help="zoo name, NAME@recipe, or a quoted pattern such as 'assoc_exp2_*'")
    p.add_argument("--seeds", required=True, help="e.g. 0-19, 1,3 or 2")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: a process pool on this machine (default); ray: one task per model")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray on 127.0.0.1)")
    p.add_argument("--device", default="cpu", help="torch device of every training: cpu (default), cuda, cuda:N")
    p.add_argument("--workers", type=int, default=None, help="parallel trainings (default: the cores)")
    p.add_argument("--ensemble", type=int, default=None, metavar="K",
                   help="stacked trainer: K seeds per stack, one stack per worker (0 = automatic)")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("census", help="claims x recipes x seeds: which claims survive retraining")
    p.add_argument("name", help="zoo name")
    p.add_argument("--recipes", default="default", help="comma-separated: default (the entry's own) and variants")
    p.add_argument("--seeds", required=True, help="e.g. 0-4")
    p.add_argument("--module", default=None, help="hypothesis module (default: hypotheses/test_NAME.py)")
    p.add_argument("--out", default="reports/census", help="census.json/md/png go to OUT/NAME/")
    p.add_argument("--workers", type=int, default=1, help="parallel trainings for what the store lacks")
    p.add_argument("--select", default=None, help="pytest -k of every run")
    p.add_argument("--with-controls", action="store_true", help="also run the claims' controls and mutations")
    p.add_argument("--recipe-select", default=None, help="pytest -k of the recipe runs (default: --select)")
    p.add_argument("--no-reference", action="store_true", help="skip the plain run (reference rows)")
    p.add_argument("--no-train", action="store_true", help="train nothing: each row covers the seeds stored")
    p.add_argument("--acc-target", type=float, default=None, help="count seeds whose test_acc reaches this")
    p.add_argument("--ensemble", type=int, default=None, metavar="K",
                   help="models from the stacked trainer, K seeds per stack (0 = automatic)")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows whose claims run side by side (each its own pytest, the cores shared between them)")
    p.add_argument("--rerun", action="store_true",
                   help="rerun every row's claims (default: reuse a stored run whose module, package, "
                        "arguments and models are unchanged)")
    p.set_defaults(fn=cmd_census)
    p = sub.add_parser("card", help="print a model card")
    p.add_argument("name", help="zoo entry, or NAME@VARIANT")
    p.add_argument("--seed", type=int, default=None, help="the model's training seed (default: the reference seed)")
    p.set_defaults(fn=cmd_card)
    p = sub.add_parser("report", help="print a run's summary as plain text (or its Markdown), open its page")
    p.add_argument("run", nargs="?", default=None, help="run id, path, 'latest' or 'baseline'")
    p.add_argument("--report-dir", default=None,
                   help="where runs are (default: $CIRCUITS_REPORTS, else ./reports of the current directory)")
    p.add_argument("--markdown", action="store_true", help="print the run's report.md instead of plain text")
    p.add_argument("--open", action="store_true", help="open the run's report.html in a browser, where one exists")
    p.add_argument("--promote-baseline", action="store_true",
                   help="copy the run (default: latest) to <report-dir>/baseline/, what pytest's "
                        "--circuits-compare baseline reads")
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
