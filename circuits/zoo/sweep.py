"""Training many seeds of one zoo model in parallel: a local process pool, or Ray tasks on a cluster.

`run_sweep(name, seeds, backend=...)` trains what the model store lacks and reuses what it has:

* ``local``: a pool of spawned processes (at most one per core), one torch thread each outside
  training, so the pool never oversubscribes the cores; a recipe that trains on more than one thread
  takes the machine-wide training slot (`circuits.zoo.train.training_slot`) as every training does. Each
  worker trains through `ModelStore.get_or_create`, so a model another process is training right now
  is waited for and reused, never trained twice.
* ``ray``: one Ray task per model (``num_cpus=1``, plus ``num_gpus=1`` for a CUDA device) on the
  cluster at ``address``, or on a local Ray started on 127.0.0.1; each task returns the weights as
  safetensors bytes and the card, and the driver writes them into its store (no shared filesystem
  needed). A failed task is retried once, then reported by name.

The same (entry, seed) gives bitwise-identical weights on either backend (the trainer is
deterministic for a seed and a thread count, and the recipe fixes the thread count). Models are
sent to workers as their `ZooEntry` (configuration and data functions, pickled by reference; never
weights), so entries registered at run time (tests, a user's conftest) work in fresh processes too.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from circuits.errors import SettingError

__all__ = ["SweepResult", "default_workers", "run_sweep", "run_sweeps", "train_or_reuse", "check_run_settings"]

BACKENDS = ("local", "ray")


@dataclass
class SweepResult:
    name: str
    trained: list = field(default_factory=list)  # seeds trained by this sweep
    reused: list = field(default_factory=list)  # seeds the store already had (or another process made)
    failed: dict = field(default_factory=dict)  # seed -> one-line reason

    @property
    def ok(self) -> bool:
        return not self.failed


def default_workers() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_run_settings(device: str = "cpu", root: Optional[Path] = None):
    """Device, CIRCUITS_CACHE and CIRCUITS_LOCK_TIMEOUT checked before any training starts;
    returns ``(device, store folder, lock timeout)`` or raises one clear CircuitsError."""
    from circuits.zoo.store import check_environment
    from circuits.devices import check_device

    device = check_device(device)
    folder, timeout = check_environment(root if root is not None else Path.cwd())
    return device, folder, timeout


def _store(root):
    from circuits.zoo.store import ModelStore

    return ModelStore(root)


def _portable(entry):
    """The entry itself when it pickles (by reference to its module's functions), else its name."""
    try:
        pickle.dumps(entry)
        return entry
    except Exception:  # noqa: BLE001 - a lambda or a closure: the worker looks the name up instead
        return entry.name


def _resolve(entry_or_name):
    from circuits.zoo import registry as zoo

    return zoo.get_entry(entry_or_name) if isinstance(entry_or_name, str) else entry_or_name


def _has_reference(entry, seed: int) -> bool:
    """A committed reference checkpoint of the current spec (a stale one is trained like any seed, so
    that `--update-reference` then finds it in the store)."""
    import json

    from circuits.zoo.store import reference_paths, spec_key
    from circuits.zoo.registry import REFERENCE_DIR

    weights, card = reference_paths(REFERENCE_DIR, entry.reference_name(seed))
    if not (weights.is_file() and card.is_file()):
        return False
    try:
        return json.loads(card.read_text()).get("key") == spec_key(entry.spec(seed, "single"))
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: loading it reports the problem; the sweep trains the seed


def _train_entry(entry, seed: int, device: str, progress=None):
    from circuits.zoo import registry as zoo
    from circuits.zoo.train import on_device

    with on_device(device):
        return zoo.train_for_store(entry, seed, progress)


# ---------------------------------------------------------------------------------------------- one model


def train_or_reuse(entry_or_name, seed: int, *, root=None, force: bool = False, device: str = "cpu",
                   progress=None, on_wait: Optional[Callable[[str], None]] = None):
    """Train ``(entry, seed)`` into the store at ``root``, or reuse it: ``(state_dict, card, how)`` with
    ``how`` one of "trained", "reused" (in the store already) or "waited" (another process was
    training it; this one waited, bounded by the lock timeout, and reused its result)."""
    from circuits.zoo.store import spec_key

    entry = _resolve(entry_or_name)
    store = _store(root)
    spec = entry.spec(seed)
    key = spec_key(spec)
    if not force:
        got = store.load(key)
        if got is not None:
            return got[0], got[1], "reused"
    holder = store.holder(key)
    if holder is not None and on_wait is not None:
        on_wait(holder)

    def build():
        model, card = _train_entry(entry, seed, device, progress)
        return model.state_dict(), card

    state, card, created = store.get_or_create(spec, build, force=force and holder is None)
    return state, card, "trained" if created else ("waited" if holder is not None else "reused")


def train_stacks(entry_or_name, seeds: Sequence[int], *, root=None, device: str = "cpu", ensemble: Optional[int] = None,
                 stream=None) -> dict:
    """The seeds of an entry that the store at `root` lacks, trained by the stacked trainer
    (circuits.zoo.ensemble) in stacks of at most `ensemble` seeds, each stored under its own key (the spec
    names the backend) the moment it finishes, so an interrupted run resumes with what is missing.
    Progress: one line per seed per evaluation. Returns seed -> "trained" / "reused"."""
    import safetensors.torch

    from circuits.zoo.ensemble import BACKEND_ENV, stackable, train_many
    from circuits.zoo.store import _prepare_tensors, spec_key

    entry = _resolve(entry_or_name)
    stream = stream or sys.stderr
    store = _store(root)
    old = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "ensemble"  # the keys name the stacked trainer
    try:
        todo, out = [], {}
        for seed in seeds:
            if store.verify(spec_key(entry.spec(seed)))[0] == "ok":
                out[seed] = "reused"
            else:
                todo.append(seed)
        if not todo:
            return out
        if stackable(entry) is not None:  # another family: its own trainer, its own (unchanged) keys
            stream.write(f"    {entry.name}: {stackable(entry)}; trained one seed at a time\n")
            for seed in todo:
                out[seed] = train_or_reuse(entry, seed, root=root, device=device)[2]
            return out
        t0 = time.perf_counter()

        def progress(seed, step, total, metrics):
            _EvalLines(f"{entry.name} seed {seed}", t0, stream)(step, total, metrics)

        def on_done(seed, model, card):
            data = safetensors.torch.save(_prepare_tensors(model.state_dict()), metadata={"format": "pt"})
            store.put(entry.spec(seed), data, card)
            out[seed] = "trained"
            stream.write(f"    {entry.name} seed {seed}: stored after {card.get('steps')} steps, "
                         f"{time.perf_counter() - t0:.1f}s  {_summary(card)}\n")
            stream.flush()

        def say(line):
            stream.write(line + "\n")
            stream.flush()

        # checkpoints beside the store's entries: a rerun after an interruption resumes the stack
        train_many(entry, todo, device=device, progress=progress, on_done=on_done, ensemble=ensemble,
                   checkpoint_root=store.root, say=say)
        return out
    finally:
        if old is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old


def _local_worker(entry_or_name, seed: int, root: str, device: str):
    import torch

    torch.set_num_threads(1)  # data generation and evaluation outside the recipe's training threads
    _exit_with_parent()
    t0 = time.perf_counter()
    name = entry_or_name if isinstance(entry_or_name, str) else entry_or_name.name
    _, card, how = train_or_reuse(entry_or_name, seed, root=root, device=device,
                                  progress=_EvalLines(f"{name} seed {seed}", t0))
    return how, _summary(card), time.perf_counter() - t0


_WATCHING = False


def _exit_with_parent(poll_s: float = 2.0) -> None:
    """A pool worker outlives a killed sweep (nothing tells a spawned child its parent is gone) and
    would train on for minutes: a daemon thread ends it once it has been re-parented."""
    import threading

    global _WATCHING
    if _WATCHING:  # a pool process runs several trainings: one watcher is enough
        return
    _WATCHING = True
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="circuits-exit-with-parent", daemon=True).start()


class _EvalLines:
    """A worker's progress: one plain line per evaluation (and when it waits for the training slot), so
    a long sweep shows every running model's step and held-out accuracy, not only finished ones."""

    def __init__(self, label: str, t0: float, stream=None):
        self.label, self.t0, self.stream = label, t0, stream or sys.stderr

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in sorted(metrics.items())
                 if k.startswith(("eval_", "waiting")) or k == "accuracy"]  # accuracy: the assoc family's
        if shown:
            self.stream.write(f"    {self.label}: step {step}/{total} {time.perf_counter() - self.t0:6.1f}s "
                              f"{' '.join(shown)}\n")
            self.stream.flush()


def _ray_task(entry_or_name, seed: int, device: str):
    """One model on a Ray worker: (safetensors bytes, card fields, seconds). Nothing touches a store."""
    import safetensors.torch
    import torch

    from circuits.zoo.store import _prepare_tensors

    torch.set_num_threads(1)
    entry = _resolve(entry_or_name)
    t0 = time.perf_counter()
    model, card = _train_entry(entry, seed, device)
    seconds = time.perf_counter() - t0
    card = {**card, "build_seconds": round(seconds, 3)}
    data = safetensors.torch.save(_prepare_tensors(model.state_dict()), metadata={"format": "pt"})
    return data, card, seconds


def _summary(card: dict) -> str:
    metrics = card.get("metrics") or {}
    shown = [f"{k}={v:.4g}" for k, v in sorted(metrics.items())
             if isinstance(v, float) and k in ("eval_acc", "test_acc", "eval_mse", "test_mse", "eval_loss")]
    return " ".join(shown)


class _Progress:
    """One line per finished model and a running counter (plain lines: readable in CI logs too)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def line(self, name: str, seed, status: str, detail: str = "") -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"[{self.done}/{self.total} {elapsed:6.1f}s] {name} seed {seed}: {status}"
                          f"{'  ' + detail if detail else ''}\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------- sweeps


def run_sweep(name_or_entry, seeds: Sequence[int], **options) -> SweepResult:
    """Train every seed of ``name_or_entry`` (a zoo name, ``name@recipe``, or a ZooEntry) that the store
    at ``root`` (default: $CIRCUITS_CACHE or ./.circuits-cache) lacks; reuse the others. A seed with a
    committed reference checkpoint is left alone unless ``train_references`` (``pytest --circuits-retrain``).
    Options as `run_sweeps`."""
    return next(iter(run_sweeps([name_or_entry], seeds, **options).values()))


def run_sweeps(names_or_entries: Sequence, seeds: Sequence[int], *, backend: str = "local", root=None,
               device: str = "cpu", workers: Optional[int] = None, address: Optional[str] = None, stream=None,
               retries: int = 1, train_references: bool = False, ensemble: Optional[int] = None) -> dict:
    """`run_sweep` over several entries at once (a grid: ``assoc_exp2_*``), all their trainings in one
    pool so the cores stay busy across entries; returns entry name -> SweepResult, in the given order.

    ``ensemble``: train with the stacked trainer (circuits.zoo.ensemble), at most that many seeds of an
    entry per stack, one stack per pool task (0: automatic, the seeds split evenly over the workers).
    None: the stacked trainer when $CIRCUITS_TRAIN_BACKEND is "ensemble" (automatic stacks), else one
    training per seed. Stacked models are stored under the stacked trainer's keys (the spec names it),
    which is what zoo.load finds under $CIRCUITS_TRAIN_BACKEND=ensemble."""
    if ensemble is None:
        from circuits.zoo.ensemble import backend as train_backend

        ensemble = 0 if train_backend() == "ensemble" else None
    if ensemble is None:
        return _run_sweeps(names_or_entries, seeds, backend, root, device, workers, address, stream, retries,
                           train_references, None)
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 0:
        raise SettingError(f"--ensemble must be a non-negative integer (0 = automatic), got {ensemble!r}")
    from circuits.zoo.ensemble import BACKEND_ENV

    old_env = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "ensemble"  # keys (the store checks below, the workers) name the stacked trainer
    try:
        return _run_sweeps(names_or_entries, seeds, backend, root, device, workers, address, stream, retries,
                           train_references, ensemble)
    finally:
        if old_env is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old_env


def _run_sweeps(names_or_entries, seeds, backend, root, device, workers, address, stream, retries,
                train_references, ensemble) -> dict:
    from circuits.zoo.seeds import check_seed
    from circuits.zoo.store import spec_key

    if backend not in BACKENDS:
        raise SettingError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SettingError(f"workers must be a positive integer, got {workers!r}")
    device, folder, _ = check_run_settings(device, None)
    root = Path(root) if root is not None else folder
    entries = [_resolve(e) for e in names_or_entries]
    seeds = [check_seed(s) for s in seeds]
    store = _store(root)
    results = {e.name: SweepResult(e.name) for e in entries}
    progress = _Progress(len(entries) * len(seeds), stream)
    jobs = []  # (portable entry, name, seed)
    for entry in entries:
        committed = set() if train_references else {s for s in entry.ref_seeds() if _has_reference(entry, s)}
        portable = None
        for seed in seeds:
            if seed in committed:  # every loader serves a reference seed from its committed checkpoint
                results[entry.name].reused.append(seed)
                progress.line(entry.name, seed, "a committed reference checkpoint, not trained")
            elif store.verify(spec_key(entry.spec(seed)))[0] == "ok":
                results[entry.name].reused.append(seed)
                progress.line(entry.name, seed, "in the store, reused")
            else:
                portable = _portable(entry) if portable is None else portable
                jobs.append((portable, entry.name, seed))
    if jobs and ensemble is not None:
        _run_stacks(jobs, root, device, workers, address, results, progress, ensemble, backend, seeds)
    elif jobs:
        runner = _run_local if backend == "local" else _run_ray
        runner(jobs, root, device, workers, address, retries, results, progress)
    return results


def stack_plan(seeds: Sequence[int], workers: int, ensemble: int, todo: Optional[Sequence[int]] = None) -> list:
    """The seeds of one entry in stacks: at most `ensemble` seeds each (0: split evenly over `workers`).
    With `todo`, the stacks are planned over all `seeds` of the run and then cut to those still to
    train, so a rerun after an interruption makes the same stacks (less their stored seeds) and
    resumes their checkpoints (circuits.zoo.stack_checkpoint keys on the seeds being trained)."""
    seeds = list(seeds)
    size = ensemble or max(1, -(-len(seeds) // max(1, workers)))
    stacks = [seeds[i:i + size] for i in range(0, len(seeds), size)]
    if todo is None:
        return stacks
    todo = set(todo)
    return [kept for kept in ([s for s in stack if s in todo] for stack in stacks) if kept]


def _stack_worker(entry_or_name, seeds, root: str, device: str, max_threads: int | None = None):
    import torch

    from circuits.zoo.ensemble import MAX_THREADS_ENV

    torch.set_num_threads(1)
    if max_threads:  # the pool's share of the cores: a recipe's 2 threads in each of 2 workers on 2 cores
        os.environ[MAX_THREADS_ENV] = str(max_threads)  # oversubscribe them (measured 2-5x slower per step)
    _exit_with_parent()
    t0 = time.perf_counter()
    out = train_stacks(entry_or_name, seeds, root=root, device=device)
    return out, time.perf_counter() - t0


def _run_stacks(jobs, root, device, workers, address, results, progress, ensemble, backend, planned=None):
    """Stacked trainings, one stack per task of a local process pool. `planned`: all the run's seeds
    (stack_plan)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    by_entry: dict = {}
    for entry, name, seed in jobs:
        by_entry.setdefault(name, (entry, []))[1].append(seed)
    n = workers or default_workers()
    tasks = [(entry, name, stack) for name, (entry, seeds) in by_entry.items()
             for stack in stack_plan(planned or seeds, n, ensemble, todo=seeds)]
    if backend == "ray":
        return _run_ray_stacks(tasks, root, device, workers, address, results, progress)
    if address is not None:
        raise SettingError("--address is for the ray backend (the local backend runs on this machine)")
    with ProcessPoolExecutor(max_workers=min(n, len(tasks)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        share = max(1, (os.cpu_count() or 1) // min(n, len(tasks)))
        futures = {pool.submit(_stack_worker, entry, stack, str(root), device, share): (name, stack)
                   for entry, name, stack in tasks}
        while futures:
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in finished:
                name, stack = futures.pop(fut)
                result = results[name]
                try:
                    how, seconds = fut.result()
                except Exception as e:  # noqa: BLE001 - seeds stored before the failure stay stored
                    reason = f"{type(e).__name__}: {e}".splitlines()[0]
                    for seed in stack:
                        result.failed[seed] = reason
                        progress.line(name, seed, "FAILED (its stack)", reason)
                    continue
                for seed in stack:
                    (result.trained if how.get(seed) == "trained" else result.reused).append(seed)
                    progress.line(name, seed, f"{how.get(seed, '?')} in a stack of {len(stack)} "
                                              f"({seconds:.1f}s for the stack)")


def _run_local(jobs, root, device, workers, address, retries, results, progress):
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if address is not None:
        raise SettingError("--address is for the ray backend (the local backend runs on this machine)")
    n = min(workers or default_workers(), len(jobs))
    # spawn, not fork: a forked child inherits torch's thread pools mid-state (and can hang in them)
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
        attempts = {job[1:]: 0 for job in jobs}
        futures = {pool.submit(_local_worker, entry, seed, str(root), device): (entry, name, seed)
                   for entry, name, seed in jobs}
        while futures:
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in finished:
                entry, name, seed = futures.pop(fut)
                result = results[name]
                try:
                    how, summary, seconds = fut.result()
                except Exception as e:  # noqa: BLE001 - retried, then reported by name
                    attempts[name, seed] += 1
                    if attempts[name, seed] <= retries:
                        futures[pool.submit(_local_worker, entry, seed, str(root), device)] = (entry, name, seed)
                    else:
                        result.failed[seed] = f"{type(e).__name__}: {e}".splitlines()[0]
                        progress.line(name, seed, f"FAILED after {retries + 1} tries", result.failed[seed])
                    continue
                (result.trained if how == "trained" else result.reused).append(seed)
                label = {"trained": f"trained in {seconds:.1f}s", "reused": "in the store, reused",
                         "waited": "trained by another process, reused"}[how]
                progress.line(name, seed, label, summary)


def _ray_stack_task(entry_or_name, seeds, device: str):
    """One stack on a Ray worker: [(seed, safetensors bytes, card)] and seconds. Nothing touches a store."""
    import safetensors.torch
    import torch

    from circuits.zoo.ensemble import train_many
    from circuits.zoo.store import _prepare_tensors

    torch.set_num_threads(1)
    entry = _resolve(entry_or_name)
    t0 = time.perf_counter()
    out = train_many(entry, seeds, device=device)
    return [(s, safetensors.torch.save(_prepare_tensors(m.state_dict()), metadata={"format": "pt"}), c)
            for s, (m, c) in out.items()], time.perf_counter() - t0


def _ray_start(ray, address, workers, env_vars=None) -> bool:
    """Join the Ray cluster at `address`, or start a private local Ray on the loopback interface only,
    unless this process already has one; True when started here (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    extra = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    if address:
        ray.init(address=address, log_to_driver=False, **extra)
    else:
        ray.init(num_cpus=workers or default_workers(), include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", **extra)
    return True


def _run_ray_stacks(tasks, root, device, workers, address, results, progress):
    """One Ray task per stack (1 CPU, plus 1 GPU with a CUDA device); the driver stores each seed
    under the stacked trainer's key ($CIRCUITS_TRAIN_BACKEND is "ensemble" here)."""
    try:
        import ray
    except ImportError:
        raise SettingError("the ray backend needs Ray: pip install 'pytest-circuits[ray]' (or pip install ray)") from None
    store = _store(root)
    started_here = _ray_start(ray, address, workers, {"CIRCUITS_TRAIN_BACKEND": "ensemble"})
    try:
        resources = {"num_cpus": 1, **({"num_gpus": 1} if device.startswith("cuda") else {})}
        task = ray.remote(max_retries=1, retry_exceptions=True, **resources)(_ray_stack_task)
        pending = {task.remote(entry, stack, device): (entry, name, stack) for entry, name, stack in tasks}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            entry, name, stack = pending.pop(ref)
            result = results[name]
            try:
                trained, seconds = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - already retried by Ray
                cause = getattr(e, "cause", None) or e
                for seed in stack:
                    result.failed[seed] = f"{type(cause).__name__}: {cause}".splitlines()[0]
                    progress.line(name, seed, "FAILED (its stack, ray)", result.failed[seed])
                continue
            for seed, data, card in trained:
                store.put(_resolve(entry).spec(seed), data, card)
                result.trained.append(seed)
                progress.line(name, seed, f"trained in a stack of {len(stack)} ({seconds:.1f}s, ray)", _summary(card))
    finally:
        if started_here:
            ray.shutdown()


def _run_ray(jobs, root, device, workers, address, retries, results, progress):
    try:
        import ray
    except ImportError:
        raise SettingError("the ray backend needs Ray: pip install 'pytest-circuits[ray]' (or pip install ray)") from None
    store = _store(root)
    started_here = _ray_start(ray, address, workers)
    try:
        resources = {"num_cpus": 1}
        if device.startswith("cuda"):
            resources["num_gpus"] = 1
        task = ray.remote(max_retries=retries, retry_exceptions=True, **resources)(_ray_task)
        pending = {task.remote(entry, seed, device): (entry, name, seed) for entry, name, seed in jobs}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            entry, name, seed = pending.pop(ref)
            result = results[name]
            try:
                data, card, seconds = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - already retried by Ray
                cause = getattr(e, "cause", None) or e
                result.failed[seed] = f"{type(cause).__name__}: {cause}".splitlines()[0]
                progress.line(name, seed, f"FAILED after {retries + 1} tries", result.failed[seed])
                continue
            store.put(_resolve(entry).spec(seed), data, card)
            result.trained.append(seed)
            progress.line(name, seed, f"trained in {seconds:.1f}s (ray)", _summary(card))
    finally:
        if started_here:
            ray.shutdown()
