"""The sweep's processes. Each trial is a ``dualtune run`` in a process of its own (one backend per
process), into ``SWEEP/trial-NNN``: the worker reads the trial's ``metrics.jsonl`` as the run writes
it, feeds each evaluation to the pruner, and stops a trial the pruner gives up on with SIGTERM (the
run checkpoints and exits). ``--jobs J`` runs J worker processes (``dualtune sweep ... --worker K``)
that share the study's storage. A stop signal stops the running trial, which the same command
continues; a sweep killed outright takes its trials with it (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dualtune import signals
from dualtune.errors import SweepError
from dualtune.rundir import pid_alive, read_marker, unfinished_runs
from dualtune.sweep.outputs import fmt, summarize
from dualtune.sweep.space import override
from dualtune.sweep.study import (
    FINISHED,
    Sweep,
    best_trial,
    check_foreign_trials,
    claim,
    count_trials,
    import_optuna,
    open_study,
    stale,
)

POLL_S = 0.5


class Stop:
    """The stop signal this process got, if any; ``signals.handling`` calls it."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int) -> None:
        self.signum = signum


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux), so a sweep killed outright
    leaves no trial running on its own; the trial checkpoints and the next sweep continues it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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


def _finished_run(target: Path) -> bool:
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
        if not pid_alive(pid):
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


def run_trial(study, sw: Sweep, trial, params: dict, resumed: bool, stop: Stop) -> Outcome:
    """One trial in a process of its own; its evaluations reach the pruner as they are written."""
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
        study.tell(trial, state=import_optuna().trial.TrialState.PRUNED)
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
        study.tell(trial, state=import_optuna().trial.TrialState.FAIL)
        return Outcome("FAIL", error=error, seconds=seconds)
    study.tell(trial, float(value))
    return Outcome("COMPLETE", value=float(value), seconds=seconds)


def progress_line(study, sw: Sweep, number: int, params: dict, outcome: Outcome) -> str:
    shown = " ".join(f"{k}={fmt(v)}" for k, v in params.items())
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
    best = best_trial(study)
    best_text = f"best {sw.space.metric}={best.value:.4f} (trial {best.number})" if best else "best: none yet"
    state = {"FAIL": "failed"}.get(outcome.state, outcome.state.lower())
    return f"sweep: trial {number} {state}: {result} | {shown} | {best_text} | {outcome.seconds:.1f} s"


def work(sw: Sweep, worker: int = 0) -> int:
    """Run trials until the study has ``sw.trials``; 0, or 128 + the signal that stopped it."""
    study = open_study(sw, worker)
    stop = Stop()
    with signals.handling(stop):
        while stop.signum is None:
            claimed = claim(study, sw)
            if claimed is None:
                break
            trial, params, resumed = claimed
            if resumed:
                print(f"sweep: trial {trial.number}: its sweep was stopped; running it again", flush=True)
            outcome = run_trial(study, sw, trial, params, resumed, stop)
            print(progress_line(study, sw, trial.number, params, outcome), flush=True)
    return 0 if stop.signum is None else 128 + stop.signum


def sweep(sw: Sweep, jobs: int = 1) -> int:
    """Create or continue the study, run the remaining trials (``jobs`` worker processes), write
    the outputs. Returns the exit status."""
    if jobs < 1:
        raise SweepError(f"--jobs {jobs}: expected 1 or more")
    sw.out.mkdir(parents=True, exist_ok=True)
    study = open_study(sw, create=True)
    check_foreign_trials(study, sw)
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state.name in FINISHED for t in trials)
    to_continue = sum(t.state.name == "RUNNING" and stale(t) for t in trials)
    left = max(sw.trials - count_trials(trials), 0) + to_continue
    print(
        f"sweep: study {sw.study_name} ({sw.space.direction} {sw.space.metric}) in {sw.storage_url}: "
        f"{done} of {sw.trials} trials done"
        + (f", {to_continue} to continue" if to_continue else "")
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
            f"sweep: stopped by {signals.name(status - 128) if status > 128 else status}; "
            f"continue with the same command",
            file=sys.stderr,
            flush=True,
        )
        return status
    return 0 if best_trial(study) is not None else 1


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
    stop = Stop()

    def forward(signum: int) -> None:
        stop(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # J trials side by side: share the cores instead of spin-waiting on them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    with signals.handling(forward):
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
