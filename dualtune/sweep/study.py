"""The sweep and its Optuna study: what is searched, where the study is stored, and which trial a
worker runs next.

The study lives in an Optuna storage (SQLite in the sweep directory by default) under the recipe's
name and remembers what it searches (``CONFIG``), so a continued sweep must search the same thing.
Each trial records the worker process that runs it (``OWNER``); a RUNNING trial whose worker on this
machine is gone was stopped with its sweep and is continued under its own number and parameters.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import filelock
import psutil

from dualtune.backend import default_backend
from dualtune.errors import SweepError
from dualtune.recipe import Recipe, load_recipe
from dualtune.rundir import pid_alive
from dualtune.sweep.space import Space, load_space

OWNER = "dualtune_owner"  # trial user attr: the worker process that runs it (host, pid, start time)
CONFIG = "dualtune_config"  # study user attr: what the sweep searches, checked when it continues
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class Sweep:
    recipe: Path
    overrides: list[str]
    space: Space
    trials: int
    out: Path
    storage_url: str
    study_name: str
    backend: str
    device: str
    seed: int
    base: Recipe

    def config(self) -> dict:
        base = self.base.model_dump(mode="json")
        base["train"].pop("output_dir", None)
        return {"space": self.space.describe(), "recipe": base, "backend": self.backend}

    def trial_dir(self, number: int) -> Path:
        return self.out / f"trial-{number:03d}"


def default_out(recipe: Recipe) -> Path:
    return Path(f"runs/sweep-{recipe.name or 'recipe'}")


def make_sweep(
    recipe: str,
    overrides: list[str],
    space: str,
    trials: int,
    backend: str | None = None,  # None: the default backend ($DUALTUNE_BACKEND, else the first framework)
    device: str = "cpu",
    storage: str | None = None,
    out: str | None = None,
    seed: int = 0,
) -> Sweep:
    if trials < 1:
        raise SweepError(f"--trials {trials}: expected 1 or more")
    base = load_recipe(recipe, list(overrides))
    sp = load_space(space, recipe, list(overrides))
    out_dir = Path(out) if out else default_out(base)
    if out_dir.exists() and not out_dir.is_dir():
        raise SweepError(f"{out_dir}: a file is in the way of the sweep directory; choose another --out")
    url = storage or f"sqlite:///{(out_dir / 'optuna.db').resolve()}"
    return Sweep(
        Path(recipe).resolve(),
        list(overrides),
        sp,
        trials,
        out_dir.resolve(),
        url,
        base.name or Path(recipe).stem,
        backend or default_backend(),
        device,
        seed,
        base,
    )


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise SweepError("dualtune sweep needs optuna: pip install 'dualtune[sweep]' (or optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _storage(url: str):
    optuna = import_optuna()
    if url.startswith("sqlite:"):
        # Several workers write to one SQLite file: wait for the lock instead of failing at once.
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return url


def open_study(sw: Sweep, worker: int = 0, create: bool = False):
    """The study, created (``create``) or loaded; its sampler seeded by (seed, trials so far,
    worker), so a continued sweep or a second worker does not repeat the first draws."""
    import numpy as np

    optuna = import_optuna()
    try:
        storage = _storage(sw.storage_url)
        if create:
            study = optuna.create_study(
                study_name=sw.study_name, storage=storage, load_if_exists=True, direction=sw.space.direction
            )
        else:
            study = optuna.load_study(study_name=sw.study_name, storage=storage)
    except (ValueError, ImportError, KeyError) as err:
        raise SweepError(f"storage {sw.storage_url}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # sqlalchemy's errors (a path that cannot be opened, a server not there)
        if type(err).__module__.startswith("sqlalchemy"):
            raise SweepError(f"storage {sw.storage_url}: {str(err).splitlines()[0]}") from None
        raise
    known = study.user_attrs.get(CONFIG)
    if known is None and create:
        study.set_user_attr(CONFIG, sw.config())
    elif known is not None and known != sw.config():
        now = sw.config()
        what = next(k for k in now if known.get(k) != now[k])
        raise SweepError(
            f"study {sw.study_name!r} in {sw.storage_url} was started with another {what}; continue "
            f"it with the same recipe, overrides, space and backend, or choose another --out"
        )
    if study.direction.name.lower() != sw.space.direction:
        raise SweepError(
            f"study {sw.study_name!r} in {sw.storage_url} is to {study.direction.name.lower()}, "
            f"the space says {sw.space.direction}; choose another --out"
        )
    n = len(study.get_trials(deepcopy=False))
    seed = int(np.random.SeedSequence([sw.seed, n, worker]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if sw.space.pruner is None:
        study.pruner = optuna.pruners.NopPruner()
    else:
        study.pruner = optuna.pruners.MedianPruner(**sw.space.pruner)
    return study


def check_foreign_trials(study, sw: Sweep) -> None:
    """Run directories in the sweep directory that the study does not know: another study's."""
    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    for p in sorted(sw.out.glob("trial-[0-9][0-9][0-9]*")):
        stem = p.name.split(".", 1)[0]
        if stem[6:].isdigit() and int(stem[6:]) not in numbers:
            raise SweepError(
                f"{p}: a trial that study {sw.study_name!r} in {sw.storage_url} does not have; "
                f"the sweep directory belongs to another study: choose another --out"
            )


def best_trial(study):
    """The best completed trial (the earlier one of equals), or None."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: (t.value, -t.number))


def count_trials(trials) -> int:
    """Trials that count toward --trials: finished (complete, pruned, failed) or running."""
    return sum(t.state.name in (*FINISHED, "RUNNING") for t in trials)


# ---------------------------------------------------------------------------------- who runs a trial


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def stale(trial) -> bool:
    """A RUNNING trial whose worker, on this machine, is gone (another machine's: not ours to judge)."""
    owner = trial.user_attrs.get(OWNER)
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid, started = owner.get("pid"), owner.get("started")
    # A float is create_time(); a sweep before psutil stored /proc ticks (a string): pid alone then.
    return not isinstance(pid, int) or not pid_alive(pid, started if isinstance(started, float) else None)


def claim(study, sw: Sweep):
    """Under the sweep directory's lock (so "count, then ask" is one step across workers): a RUNNING
    trial whose worker died (continued under its number), else a new trial if fewer than
    ``sw.trials`` count; None when the sweep has all it needs. Returns (trial, params, resumed)."""
    optuna = import_optuna()
    with filelock.FileLock(sw.out / ".sweep.lock"):
        trials = study.get_trials(deepcopy=False)
        resumed = next((t for t in trials if t.state.name == "RUNNING" and stale(t)), None)
        if resumed is not None:
            trial = optuna.trial.Trial(study, resumed._trial_id)
        elif count_trials(trials) >= sw.trials:
            return None
        else:
            trial = study.ask()
        trial.set_user_attr(OWNER, _owner())
        trial.set_user_attr("run_dir", sw.trial_dir(trial.number).name)
        params = {p.key: p.suggest(trial) for p in sw.space.params.values()}
    return trial, params, resumed is not None
