"""``dualtune sweep``: hyperparameter search over a recipe with Optuna.

A space file (YAML) names the metric, its direction and a distribution for each recipe key it
searches::

    metric: f1_macro
    direction: maximize
    params:
      peft.lora.r: {choices: [4, 8, 16, 32]}            # categorical
      peft.lora.dropout: {type: float, low: 0.0, high: 0.1}
      optim.lr: {type: float, low: 1.0e-5, high: 2.0e-4, log: true}
      train.batch_size: {type: int, low: 8, high: 32, step: 8}
    pruner: {n_startup_trials: 5, n_warmup_steps: 0}    # median pruner (Optuna's defaults); or: none

Each trial is a ``dualtune run`` in a process of its own (one backend per process), into
``SWEEP/trial-NNN``. The parent reads the trial's ``metrics.jsonl`` as the run writes it, feeds
each evaluation to the median pruner, and stops a trial the pruner gives up on with SIGTERM (the
run checkpoints and exits). The study lives in an Optuna storage (SQLite in the sweep directory
by default) under the recipe's name, so the same command continues an interrupted sweep: trials
that finished count toward ``--trials``, and a trial whose sweep process died is run again under
its own number and parameters (from its checkpoint where it has one). ``--jobs J`` runs J worker
processes that share the storage; a lock in the sweep directory makes "count, then ask for a
trial" one step, so no trial is lost or run twice.

This module imports no framework: the trials do.
"""

from __future__ import annotations

import csv
import ctypes
import fcntl
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from dualtune.errors import RecipeError, SweepError, UserError
from dualtune.recipe import TASK_METRICS, Recipe, TrainSpec, load_recipe

DIRECTIONS = ("maximize", "minimize")
KINDS = ("categorical", "int", "float")
PARAM_KEYS = {"type", "choices", "low", "high", "step", "log"}
PRUNER_KEYS = {"n_startup_trials", "n_warmup_steps", "interval_steps"}
OWNER = "dualtune_owner"  # trial user attr: the worker process that runs it (host, pid, start time)
CONFIG = "dualtune_config"  # study user attr: what the sweep searches, checked when it continues
POLL_S = 0.5
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# ---------------------------------------------------------------------------------- the space


@dataclass
class Param:
    key: str  # the recipe's dotted key
    kind: str  # categorical | int | float
    choices: list | None = None
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False

    def samples(self) -> list:
        """Values that must each make a valid recipe: every choice, else both ends of the range."""
        return list(self.choices or []) if self.kind == "categorical" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        """The trial's value: drawn now, or the one it already has (a trial run again)."""
        if self.kind == "categorical":
            choices = [json.dumps(c) if isinstance(c, list) else c for c in self.choices or []]
            return self.value(trial.suggest_categorical(self.key, choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def value(self, stored: Any) -> Any:
        """The recipe value of a value Optuna stored: a list choice (``target_modules``) is stored as
        its JSON text, since Optuna's categorical choices are numbers, strings, booleans or null."""
        if isinstance(stored, str) and any(
            isinstance(c, list) and json.dumps(c) == stored for c in self.choices or []
        ):
            return json.loads(stored)
        return stored

    def describe(self) -> dict:
        out: dict[str, Any] = {"type": self.kind}
        out.update(
            {k: getattr(self, k) for k in ("choices", "low", "high", "step") if getattr(self, k) is not None}
        )
        if self.log:
            out["log"] = True
        return out


@dataclass
class Space:
    path: Path
    metric: str
    direction: str
    params: dict[str, Param]
    pruner: dict | None = field(default_factory=dict)  # None: no pruning

    def describe(self) -> dict:
        return {
            "metric": self.metric,
            "direction": self.direction,
            "params": {k: p.describe() for k, p in self.params.items()},
            "pruner": self.pruner,
        }


def override(key: str, value: Any) -> str:
    """``key=value`` as ``dualtune run`` reads it (JSON is YAML: numbers, strings, booleans, null)."""
    return f"{key}={json.dumps(value)}"


def _number(where: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}: got {value!r}, expected a finite number")
    if integer:
        if float(value) != int(value):
            raise RecipeError(f"{where}: got {value!r}, expected an integer")
        return int(value)
    return float(value)


def _param(where: str, key: str, spec: Any) -> Param:
    if isinstance(spec, list):  # shorthand: a list is the choices
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise RecipeError(f"{where}: expected a mapping (choices, or type with low/high), got {spec!r}")
    unknown = sorted(set(spec) - PARAM_KEYS)
    if unknown:
        raise RecipeError(f"{where}.{unknown[0]}: unknown key (expected {', '.join(sorted(PARAM_KEYS))})")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in KINDS:
        raise RecipeError(f"{where}.type: got {kind!r}, expected one of {', '.join(KINDS)}")
    if kind == "categorical":
        extra = sorted(set(spec) & {"low", "high", "step", "log"})
        if extra:
            raise RecipeError(f"{where}.{extra[0]}: not for a categorical parameter (choices only)")
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise RecipeError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        scalar = (bool, int, float, str)
        for c in choices:
            items = c if isinstance(c, list) else [c]
            if not items or any(x is not None and not isinstance(x, scalar) for x in items):
                raise RecipeError(
                    f"{where}.choices: {c!r}: expected numbers, strings, booleans, null, "
                    f"or non-empty lists of them"
                )
        listed = {json.dumps(c) for c in choices if isinstance(c, list)}  # how Optuna stores a list
        if len({json.dumps(c) for c in choices}) != len(choices) or any(
            isinstance(c, str) and c in listed for c in choices
        ):
            raise RecipeError(f"{where}.choices: {choices!r} repeats a value")
        return Param(key, kind, choices=choices)
    if "choices" in spec:
        raise RecipeError(f"{where}.choices: only for type categorical")
    for k in ("low", "high"):
        if k not in spec:
            raise RecipeError(f"{where}.{k}: required for type {kind}")
    integer = kind == "int"
    low, high = _number(f"{where}.low", spec["low"], integer), _number(f"{where}.high", spec["high"], integer)
    if not low < high:
        raise RecipeError(f"{where}: low {low!r} must be below high {high!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise RecipeError(f"{where}.log: got {log!r}, expected true or false")
    if log and low <= 0:
        raise RecipeError(f"{where}.low: {low!r}: a log scale needs low > 0")
    step = spec.get("step")
    if step is not None:
        step = _number(f"{where}.step", step, integer)
        if step <= 0:
            raise RecipeError(f"{where}.step: got {step!r}, expected > 0")
        if log:
            raise RecipeError(f"{where}.step: Optuna takes step or log, not both")
    return Param(key, kind, low=low, high=high, step=step, log=log)


def _pruner(where: str, spec: Any) -> dict | None:
    if spec is None:
        return {}
    if spec in ("none", False):
        return None
    if spec in ("median",):
        return {}
    if not isinstance(spec, dict):
        raise RecipeError(
            f"{where}: expected a mapping ({', '.join(sorted(PRUNER_KEYS))}) or none, got {spec!r}"
        )
    for k, v in spec.items():
        if k not in PRUNER_KEYS:
            raise RecipeError(f"{where}.{k}: unknown key (expected {', '.join(sorted(PRUNER_KEYS))})")
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "interval_steps" else 0):
            raise RecipeError(
                f"{where}.{k}: got {v!r}, expected an integer >= {1 if k == 'interval_steps' else 0}"
            )
    return dict(spec)


def load_space(path: str | Path, recipe: str | Path, overrides: Sequence[str] = ()) -> Space:
    """The space file, checked against the recipe: every distribution's sample values (each
    choice, both ends of a range) are applied to the recipe as overrides and validated, so a key
    the recipe does not have, or a value it rejects, is one line naming the dotted path."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"space {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"space {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"space {path}: expected a mapping with metric, direction and params")
    unknown = sorted(set(raw) - {"metric", "direction", "params", "pruner"})
    if unknown:
        raise RecipeError(
            f"space {path}: {unknown[0]}: unknown key (expected metric, direction, params, pruner)"
        )
    base = load_recipe(recipe, list(overrides))
    task = base.model.task
    metric = raw.get("metric")
    if metric not in TASK_METRICS[task]:
        raise RecipeError(
            f"space {path}: metric: got {metric!r}, expected one of the {task} metrics: "
            f"{', '.join(TASK_METRICS[task])}"
        )
    direction = raw.get("direction", "minimize" if metric == "eval_loss" else "maximize")
    if direction not in DIRECTIONS:
        raise RecipeError(f"space {path}: direction: got {direction!r}, expected maximize or minimize")
    specs = raw.get("params")
    if not isinstance(specs, dict) or not specs:
        raise RecipeError(
            f"space {path}: params: expected a mapping of recipe keys (e.g. optim.lr) to distributions"
        )
    params = {}
    for key, spec in specs.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"space {path}: params: {key!r}: expected a dotted recipe key, e.g. optim.lr")
        params[key] = _param(f"space {path}: params.{key}", key, spec)
    for p in params.values():
        for value in p.samples():
            try:
                load_recipe(recipe, [*overrides, override(p.key, value)])
            except RecipeError as err:
                msg = str(err)
                if not msg.startswith(p.key):
                    msg = f"{p.key}={json.dumps(value)}: {msg}"
                raise RecipeError(f"space {path}: params: {msg}") from None
    return Space(path, metric, direction, params, _pruner(f"space {path}: pruner", raw.get("pruner")))


# ---------------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux), so a sweep killed outright
    leaves no trial running on its own; the trial checkpoints and the next sweep continues it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _stale(trial) -> bool:
    """A RUNNING trial whose worker, on this machine, is gone (another machine's: not ours to judge)."""
    owner = trial.user_attrs.get(OWNER)
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    started = owner.get("started")
    return started is not None and _start_time(pid) != started  # the pid was reused


class _Lock:
    """An exclusive file lock: workers on this machine take turns to count and ask."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _Stop:
    """SIGTERM, SIGINT, SIGHUP: stop the running trial (it checkpoints), leave it to be continued."""

    def __init__(self, on_signal=None):
        self.signum: int | None = None
        self.on_signal = on_signal
        self._previous: dict = {}

    def __enter__(self):
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        if self.on_signal is not None:
            self.on_signal(signum)


def _stop_child(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 600.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class _Evals:
    """The eval lines of a trial's metrics.jsonl, read as the run writes them. The run writes into
    ``trial-NNN.partial-PID`` and renames it when it ends; an open file follows the rename."""

    def __init__(self, target: Path, metric: str):
        self.target, self.metric = target, metric
        self.file: TextIO | None = None
        self.rest = ""

    def _open(self, candidates: list[Path]) -> None:
        for c in candidates:
            try:
                self.file = open(c / "metrics.jsonl")  # noqa: SIM115 - kept open across polls: it follows the rename
                return
            except OSError:
                continue

    def read(self, pid: int | None = None, ended: bool = False) -> list[tuple[int, float]]:
        if self.file is None:
            t = self.target
            candidates = [t.with_name(f"{t.name}.partial-{pid}")] if pid is not None else []
            if ended or pid is None:
                failed = sorted(
                    t.parent.glob(f"{t.name}.failed*"), key=lambda p: p.stat().st_mtime, reverse=True
                )
                candidates += [t, *failed]
            self._open(candidates)
            if self.file is None:
                return []
        text = self.rest + self.file.read()
        lines = text.split("\n")
        self.rest = lines.pop()  # an unfinished line waits for its end
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("split") == "eval" and isinstance(record.get(self.metric), (int, float)):
                out.append((int(record["step"]), float(record[self.metric])))
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    recipe: Path
    overrides: list[str]
    space: Space
    trials: int
    out: Path
    storage_url: str
    study_name: str
    backend: str = "torch"
    device: str = "cpu"
    seed: int = 0
    base: Recipe | None = None

    def config(self) -> dict:
        assert self.base is not None
        base = self.base.model_dump(mode="json")
        base["train"].pop("output_dir", None)
        return {"space": self.space.describe(), "recipe": base, "backend": self.backend}

    def trial_dir(self, number: int) -> Path:
        return self.out / f"trial-{number:03d}"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SweepError("dualtune sweep needs optuna: pip install 'dualtune[sweep]' (or optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _storage(url: str):
    optuna = _optuna()
    if url.startswith("sqlite:"):
        # Several workers write to one SQLite file: wait for the lock instead of failing at once.
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return url


def open_study(sw: Sweep, worker: int = 0, create: bool = False):
    """The study, created (``create``) or loaded; its sampler seeded by (seed, trials so far,
    worker), so a continued sweep or a second worker does not repeat the first draws."""
    import numpy as np

    optuna = _optuna()
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


FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def _count(trials) -> int:
    """Trials that count toward --trials: finished (complete, pruned, failed) or running."""
    return sum(t.state.name in (*FINISHED, "RUNNING") for t in trials)


def _claim(study, sw: Sweep):
    """Under the lock: a RUNNING trial whose worker died (continued under its number), else a new
    trial if fewer than ``sw.trials`` count; None when the sweep has all it needs."""
    optuna = _optuna()
    with _Lock(sw.out / ".sweep.lock"):
        trials = study.get_trials(deepcopy=False)
        resumed = next((t for t in trials if t.state.name == "RUNNING" and _stale(t)), None)
        if resumed is not None:
            trial = optuna.trial.Trial(study, resumed._trial_id)
        elif _count(trials) >= sw.trials:
            return None
        else:
            trial = study.ask()
        trial.set_user_attr(OWNER, _owner())
        trial.set_user_attr("run_dir", sw.trial_dir(trial.number).name)
        params = {p.key: p.suggest(trial) for p in sw.space.params.values()}
    return trial, params, resumed is not None


def _finished_run(target: Path) -> bool:
    from dualtune.rundir import read_marker

    return (target / "final_metrics.json").is_file() and (read_marker(target) or {}).get(
        "status"
    ) == "finished"


def _run_command(sw: Sweep, params: dict, target: Path, resume: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "dualtune.cli",
        "run",
        str(sw.recipe),
        *sw.overrides,
        *(override(k, v) for k, v in params.items()),
        "--backend",
        sw.backend,
        "--device",
        sw.device,
        "--output-dir",
        str(target),
        "--no-progress",
    ]
    return cmd + (["--resume"] if resume else [])  # last: --resume takes an optional value


def _wait_for_previous(target: Path, timeout_s: float = 900.0) -> None:
    """A trial run again: its previous run, stopped with its sweep, may still be writing its
    checkpoint (it holds the run directory's lock); wait for it to end."""
    lock = target.with_name(f".{target.name}.lock")
    deadline, said = time.monotonic() + timeout_s, False
    while time.monotonic() < deadline:
        try:
            pid = int(lock.read_text().strip() or 0)
        except (OSError, ValueError):
            return
        if not pid or not _alive(pid):
            return
        if not said:
            print(f"sweep: {target.name}: waiting for its previous run (pid {pid}) to end", flush=True)
            said = True
        time.sleep(POLL_S)


@dataclass
class Outcome:
    state: str  # COMPLETE | PRUNED | FAIL | INTERRUPTED
    value: float | None = None
    error: str | None = None
    seconds: float = 0.0
    step: int | None = None  # pruned: the evaluation it was judged on


def run_trial(study, sw: Sweep, trial, params: dict, resumed: bool, stop: _Stop) -> Outcome:
    """One trial in a process of its own; its evaluations reach the pruner as they are written."""
    from dualtune.rundir import unfinished_runs

    started = time.perf_counter()
    target = sw.trial_dir(trial.number)
    reported = set(study._storage.get_trial(trial._trial_id).intermediate_values)
    evals = _Evals(target, sw.space.metric)
    pruned, rc = False, 0

    def feed(pairs, check: bool) -> bool:
        for step, value in pairs:
            if step in reported:
                continue
            reported.add(step)
            trial.report(value, step)
            if check and trial.should_prune():
                return True
        return False

    try:
        if resumed and _finished_run(target):  # the run ended, its sweep did not hear it
            feed(evals.read(), check=False)
        else:
            if resumed:
                _wait_for_previous(target)
            resume = resumed and any(u.checkpoint is not None for u in unfinished_runs(target))
            log_path = sw.out / f"{target.name}.log"
            with open(log_path, "ab") as log_file:
                proc = subprocess.Popen(
                    _run_command(sw, params, target, resume),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    # its own session: a Ctrl-C reaches the sweep, which stops the
                    # trial with one SIGTERM (a second signal would stop it at once)
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )  # noqa: PLW1509 - no threads here
            try:
                while proc.poll() is None:
                    if stop.signum is not None:
                        _stop_child(proc)
                        return Outcome("INTERRUPTED", seconds=time.perf_counter() - started)
                    if feed(evals.read(proc.pid), check=True):
                        pruned = True
                        _stop_child(proc)
                        break
                    time.sleep(POLL_S)
            finally:
                if proc.poll() is None:
                    _stop_child(proc)
            rc = proc.returncode
            feed(evals.read(proc.pid, ended=True), check=False)
            if stop.signum is not None and not pruned and rc != 0:
                return Outcome("INTERRUPTED", seconds=time.perf_counter() - started)
    finally:
        evals.close()
    seconds = time.perf_counter() - started
    if pruned:
        failed = sorted(sw.out.glob(f"{target.name}.failed*"), key=lambda p: p.stat().st_mtime)
        trial.set_user_attr("run_dir", failed[-1].name if failed else target.name)
        study.tell(trial, state=_optuna().trial.TrialState.PRUNED)
        step = max(reported) if reported else None
        value = study._storage.get_trial(trial._trial_id).intermediate_values.get(step)
        return Outcome("PRUNED", value=value, seconds=seconds, step=step)
    error = None
    if rc != 0:
        error = _last_line(sw.out / f"{target.name}.log") or f"exit status {rc}"
    else:
        try:
            value = json.loads((target / "final_metrics.json").read_text()).get(sw.space.metric)
        except (OSError, ValueError) as err:
            value, error = None, f"{target}/final_metrics.json: {err}"
        if error is None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            error = f"{target}/final_metrics.json: {sw.space.metric} is {value!r}"
    if error is not None:
        failed = sorted(sw.out.glob(f"{target.name}.failed*"), key=lambda p: p.stat().st_mtime)
        if rc != 0 and failed:
            trial.set_user_attr("run_dir", failed[-1].name)
        trial.set_user_attr("error", error[-500:])
        study.tell(trial, state=_optuna().trial.TrialState.FAIL)
        return Outcome("FAIL", error=error, seconds=seconds)
    study.tell(trial, float(value))
    return Outcome("COMPLETE", value=float(value), seconds=seconds)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _best(study):
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: (t.value, -t.number))


def progress_line(study, sw: Sweep, number: int, params: dict, outcome: Outcome) -> str:
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    if outcome.state == "COMPLETE":
        result = f"{sw.space.metric}={outcome.value:.4f}"
    elif outcome.state == "FAIL":
        result = outcome.error or ""
    elif outcome.state == "PRUNED":
        result = (
            f"at step {outcome.step}, {sw.space.metric}={outcome.value:.4f}"
            if outcome.value is not None
            else ""
        )
    else:
        result = "stopped; the same command continues it"
    best = _best(study)
    best_text = f"best {sw.space.metric}={best.value:.4f} (trial {best.number})" if best else "best: none yet"
    state = {"FAIL": "failed"}.get(outcome.state, outcome.state.lower())
    return f"sweep: trial {number} {state}: {result} | {shown} | {best_text} | {outcome.seconds:.1f} s"


def work(sw: Sweep, worker: int = 0) -> int:
    """Run trials until the study has ``sw.trials``; 0, or 128 + the signal that stopped it."""
    study = open_study(sw, worker)
    with _Stop() as stop:
        while stop.signum is None:
            claimed = _claim(study, sw)
            if claimed is None:
                break
            trial, params, resumed = claimed
            if resumed:
                print(f"sweep: trial {trial.number}: its sweep was stopped; running it again", flush=True)
            outcome = run_trial(study, sw, trial, params, resumed, stop)
            print(progress_line(study, sw, trial.number, params, outcome), flush=True)
    return 0 if stop.signum is None else 128 + stop.signum


# ---------------------------------------------------------------------------------- outputs


def trial_rows(study, sw: Sweep) -> list[dict]:
    from dualtune.report import run_row

    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            **{k: t.params.get(k) for k in sw.space.params},
            "run_dir": t.user_attrs.get("run_dir", ""),
            "error": t.user_attrs.get("error", ""),
        }
        row["seconds"] = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        if t.state.name == "COMPLETE":
            try:
                rep = run_row(sw.out / row["run_dir"])
                row.update(
                    {
                        "main_metric": rep["metric"],
                        "score": rep["score"],
                        "f1_macro": rep["f1_macro"],
                        "train_seconds": rep["train_seconds"],
                        "steps": rep["steps"],
                    }
                )
            except UserError:
                pass
        rows.append(row)
    return rows


CSV_EXTRA = ["main_metric", "score", "f1_macro", "train_seconds", "steps"]


def write_table(rows: list[dict], sw: Sweep) -> None:
    keys = ["number", "state", "value", *sw.space.params, "run_dir", "seconds", *CSV_EXTRA, "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    writer.writerows([["" if row.get(k) is None else row[k] for k in keys] for row in rows])
    (sw.out / "trials.csv").write_text(buf.getvalue())
    headers = ["trial", "state", sw.space.metric, *sw.space.params, "run dir", "note"]
    cells = [
        [
            str(r["number"]),
            r["state"].lower(),
            "-" if r["value"] is None else f"{r['value']:.4f}",
            *("-" if r.get(k) is None else _fmt(r[k]) for k in sw.space.params),
            r["run_dir"],
            r["error"],
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in [headers, *cells]]
    (sw.out / "trials.txt").write_text("\n".join(lines) + "\n")


def best_recipe(sw: Sweep, best) -> Recipe:
    """The recipe with the best trial's parameters applied, resolved; output_dir back to the default."""
    best_values = [override(k, p.value(best.params[k])) for k, p in sw.space.params.items()]
    recipe = load_recipe(sw.recipe, [*sw.overrides, *best_values])
    recipe.train.output_dir = TrainSpec.model_fields["output_dir"].default
    return recipe


def write_plots(study, sw: Sweep) -> list[str]:
    """Optimisation history and parameter importances as PNGs; notes on what was skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = _optuna()
    from optuna.visualization import matplotlib as ovm

    notes = []
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not done:
        return ["history.png, importances.png not written: no completed trial"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ax = ovm.plot_optimization_history(study, target_name=sw.space.metric)
            fig: Any = ax.figure
            fig.savefig(sw.out / "history.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
        except Exception as err:  # noqa: BLE001 - a plot never fails a sweep
            notes.append(f"history.png not written: {str(err).splitlines()[0]}")
        if len(done) < 2:
            notes.append(f"importances.png not written: needs 2 completed trials, the study has {len(done)}")
            return notes
        if len({t.value for t in done}) == 1:
            notes.append(
                f"importances.png not written: every completed trial has {sw.space.metric} {done[0].value:.4f}"
            )
            return notes
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            ax = ovm.plot_param_importances(study, evaluator=evaluator, target_name=sw.space.metric)
            fig = ax.figure
            fig.savefig(sw.out / "importances.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
        except Exception as err:  # noqa: BLE001
            notes.append(f"importances.png not written: {str(err).splitlines()[0]}")
    return notes


def summarize(study, sw: Sweep) -> str | None:
    """trials.txt, trials.csv, best_recipe.yaml, history.png, importances.png; returns the summary."""
    rows = trial_rows(study, sw)
    write_table(rows, sw)
    notes = write_plots(study, sw)
    best = _best(study)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines = [
        f"sweep: {len(rows)} trial{'s' if len(rows) != 1 else ''}: "
        + ", ".join(f"{n} {'failed' if s == 'FAIL' else s.lower()}" for s, n in counts.items() if n)
    ]
    if best is not None:
        recipe = best_recipe(sw, best)
        shown = ", ".join(f"{k}={_fmt(best.params[k])}" for k in sw.space.params)
        header = (
            f"# dualtune sweep {sw.study_name}: best of {len(rows)} trials, trial {best.number} "
            f"({best.user_attrs.get('run_dir', '')}), {sw.space.metric} {best.value:.6g} on {sw.backend}\n"
            f"# {shown}\n"
        )
        from dualtune.rundir import write_atomic

        write_atomic(sw.out / "best_recipe.yaml", header + recipe.to_yaml())
        lines.append(f"sweep: best trial {best.number}: {sw.space.metric}={best.value:.4f} ({shown})")
        lines.append(
            f"sweep: best recipe: {sw.out / 'best_recipe.yaml'} "
            f"(dualtune run {sw.out / 'best_recipe.yaml'} --backend {sw.backend})"
        )
    else:
        lines.append("sweep: no trial completed; no best_recipe.yaml")
    lines += [f"sweep: {n}" for n in notes]
    lines.append(f"sweep: table: {sw.out / 'trials.txt'}, {sw.out / 'trials.csv'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- entry point


def default_out(recipe: Recipe) -> Path:
    return Path(f"runs/sweep-{recipe.name or 'recipe'}")


def make_sweep(
    recipe: str,
    overrides: list[str],
    space: str,
    trials: int,
    backend: str = "torch",
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
        backend,
        device,
        seed,
        base,
    )


def _check_foreign_trials(study, sw: Sweep) -> None:
    """Run directories in the sweep directory that the study does not know: another study's."""
    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    for p in sorted(sw.out.glob("trial-[0-9][0-9][0-9]*")):
        stem = p.name.split(".", 1)[0]
        if stem[6:].isdigit() and int(stem[6:]) not in numbers:
            raise SweepError(
                f"{p}: a trial that study {sw.study_name!r} in {sw.storage_url} does not have; "
                f"the sweep directory belongs to another study: choose another --out"
            )


def sweep(sw: Sweep, jobs: int = 1) -> int:
    """Create or continue the study, run the remaining trials (``jobs`` worker processes), write
    the outputs. Returns the exit status."""
    if jobs < 1:
        raise SweepError(f"--jobs {jobs}: expected 1 or more")
    sw.out.mkdir(parents=True, exist_ok=True)
    study = open_study(sw, create=True)
    _check_foreign_trials(study, sw)
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state.name in FINISHED for t in trials)
    stale = sum(t.state.name == "RUNNING" and _stale(t) for t in trials)
    left = max(sw.trials - _count(trials), 0) + stale
    print(
        f"sweep: study {sw.study_name} ({sw.space.direction} {sw.space.metric}) in {sw.storage_url}: "
        f"{done} of {sw.trials} trials done"
        + (f", {stale} to continue" if stale else "")
        + f"; {left} to run on {sw.backend} ({min(jobs, max(left, 1))} worker{'s' if jobs > 1 else ''}) -> {sw.out}",
        flush=True,
    )
    status = 0
    if left:
        if jobs == 1:
            status = work(sw)
        else:
            status = _spawn_workers(sw, min(jobs, left))
    print(summarize(open_study(sw), sw), flush=True)
    if status:
        print(
            f"sweep: stopped by {signal.Signals(status - 128).name if status > 128 else status}; "
            f"continue with the same command",
            file=sys.stderr,
            flush=True,
        )
        return status
    return 0 if _best(study) is not None else 1


def worker_command(sw: Sweep, worker: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dualtune.cli",
        "sweep",
        str(sw.recipe),
        *sw.overrides,
        "--space",
        str(sw.space.path.resolve()),
        "--trials",
        str(sw.trials),
        "--backend",
        sw.backend,
        "--device",
        sw.device,
        "--storage",
        sw.storage_url,
        "--out",
        str(sw.out),
        "--seed",
        str(sw.seed),
        "--worker",
        str(worker),
    ]


def _spawn_workers(sw: Sweep, jobs: int) -> int:
    procs: list[subprocess.Popen] = []

    def forward(signum):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # J trials side by side: share the cores instead of spin-waiting on them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    with _Stop(forward) as stop:
        for k in range(jobs):
            procs.append(
                subprocess.Popen(
                    worker_command(sw, k),
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # signals reach workers once, through forward()
                    preexec_fn=_die_with_parent,
                )
            )  # noqa: PLW1509
        codes = [p.wait() for p in procs]
    if stop.signum is not None:
        return 128 + stop.signum
    bad = [c for c in codes if c != 0]
    if bad:
        raise SweepError(f"a sweep worker exited with status {bad[0]}; see its lines above")
    return 0
