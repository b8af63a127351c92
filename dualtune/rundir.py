"""The run directory: what dualtune may write, replace or resume, and nothing else.

A run writes into ``<dir>.partial-<pid>`` and moves it into place only when it succeeds. dualtune
marks each run directory it writes (``.dualtune-run``: status, pid, step) and only ever replaces a
directory that is one of its own finished runs, and only when asked (``--overwrite``); a folder with
anything else in it, or a file at the path, is refused before any work. A lock beside the target
makes a second run into the same directory fail at once. A failed or interrupted run is left as
``<dir>.failed`` (its log, its checkpoints), never replacing a good run; a run killed outright
leaves ``<dir>.partial-<pid>``, which the next run reports. Checkpoints (``checkpoints/step-N/``)
are written aside and renamed into place, so one cut by ``kill -9`` is never read.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import psutil

from dualtune.errors import RunDirError

MARKER = ".dualtune-run"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.json"
_PARTIAL = re.compile(r"\.partial-(\d+)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``path`` whole or not at all, with the usual permissions (mkstemp alone gives 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_marker(directory: Path) -> dict | None:
    """The marker of a run directory dualtune wrote, or None (not one of dualtune's)."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def run_status(marker: dict) -> str:
    """What a marker says of its run, for messages: "interrupted at step 12", "failed", "finished"."""
    step = f" at step {marker['step']}" if marker.get("step") else ""
    return f"{marker.get('status')}{step}"


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie has ended). With ``started`` (its
    ``psutil.Process.create_time()`` when it was recorded): whether it is still that process, not a
    later one given the same pid. create_time is boot time plus ticks, and the boot time moves when the
    clock is set: a second's slack."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def free_name(target: Path) -> Path:
    """The first of ``<target>-2``, ``<target>-3``, ... that nothing occupies."""
    n = 2
    while True:
        candidate = target.with_name(f"{target.name}-{n}")
        if not candidate.exists() and not list(target.parent.glob(f"{candidate.name}.partial-*")):
            return candidate
        n += 1


def check_target(target: Path, overwrite: bool = False) -> None:
    """Refuse, in one line, an output path dualtune must not write: a file, a folder with foreign
    files, or one of its own finished runs without ``overwrite``. Reads only; called before work."""
    if target.exists() and not target.is_dir():
        raise RunDirError(
            f"{target}: a file is in the way of the run directory; choose another "
            f"--output-dir, e.g. {free_name(target)}"
        )
    if not target.is_dir() or not any(target.iterdir()):
        return
    marker = read_marker(target)
    if marker is None:
        raise RunDirError(
            f"{target}: exists and holds files dualtune did not write, which it never "
            f"touches; choose a free --output-dir, e.g. {free_name(target)}"
        )
    if marker.get("status") != "finished":
        raise RunDirError(
            f"{target}: holds an unfinished run ({marker.get('status')}); continue it with "
            f"--resume {target}, or choose a free --output-dir, e.g. {free_name(target)}"
        )
    if not overwrite:
        raise RunDirError(
            f"{target}: holds a finished run; add --overwrite to replace it, or choose a free "
            f"--output-dir, e.g. {free_name(target)}"
        )


@dataclass
class Unfinished:
    """A run directory of ``target``'s that did not finish: ``.failed`` or a ``.partial-<pid>``
    whose process is gone."""

    path: Path
    checkpoint: Path | None
    why: str


def unfinished_runs(target: Path) -> list[Unfinished]:
    found = []
    failed = target.with_name(f"{target.name}.failed")
    if failed.is_dir() and read_marker(failed) is not None:
        status = (read_marker(failed) or {}).get("status", "failed")
        found.append(Unfinished(failed, latest_checkpoint(failed), status))
    for partial in sorted(target.parent.glob(f"{target.name}.partial-*")):
        m = _PARTIAL.search(partial.name)
        if m and partial.is_dir() and not pid_alive(int(m.group(1))):
            found.append(
                Unfinished(partial, latest_checkpoint(partial), f"left by process {m.group(1)}, now gone")
            )
    return found


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def checkpoints(run_path: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so with their state) in step order."""
    root = run_path / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / CHECKPOINT_STATE).is_file()]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(run_path: Path) -> Path | None:
    found = checkpoints(run_path)
    return found[-1] if found else None


def save_checkpoint(
    run_path: Path,
    step: int,
    tensors: dict[str, dict[str, np.ndarray]],
    state: dict,
    keep: int | None = None,
    protect: int | None = None,
) -> Path:
    """``checkpoints/step-<step>/``: one safetensors file per entry of ``tensors`` and ``state.json``,
    written aside and renamed into place. Keeps the newest ``keep`` (and step ``protect``)."""
    from safetensors.numpy import save_file

    root = run_path / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    for cut in root.glob(".tmp-step-*"):  # ours, or one a killed run left (the lock keeps others out)
        shutil.rmtree(cut, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arrays in tensors.items():
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / f"{name}.safetensors"))
    write_json(tmp / CHECKPOINT_STATE, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in checkpoints(run_path)[:-keep]:
            if checkpoint_step(old) != protect:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(state, tensors by file) of a checkpoint ``save_checkpoint`` wrote."""
    from safetensors.numpy import load_file

    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
        tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0]})") from None
    return state, tensors


class TargetLock:
    """An exclusive lock on the target path (``<parent>/.<name>.lock``), held for the whole run; the
    file holds the holder's pid, for the message a second run gets."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.with_name(f".{target.name}.lock")
        self._lock = filelock.FileLock(
            self.path, blocking=False, thread_local=False, on_acquired=self._write_pid
        )

    @staticmethod
    def _write_pid(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())

    def __enter__(self) -> TargetLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise self._busy() from None
        return self

    def _busy(self) -> RunDirError:
        try:
            holder = self.path.read_text(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        return RunDirError(
            f"{self.target}: another dualtune run (pid {holder}) is writing it; wait for "
            f"it to end or choose another --output-dir"
        )

    def check_free(self) -> None:
        """Refuse at once (before a framework loads) when another run holds the lock; creates nothing."""
        if not self.path.exists():
            return  # no lock file, no run
        try:
            with filelock.FileLock(self.path, blocking=False, thread_local=False):
                pass
        except filelock.Timeout:
            raise self._busy() from None

    def __exit__(self, *exc: object) -> None:
        if self._lock.is_locked:
            try:
                os.unlink(self.path)  # while held: a run that opened it before finds it unlinked and retries
            except OSError:
                pass
            self._lock.release()


class RunDir:
    """``with RunDir(target) as rd: ...`` writes into ``rd.path``; on success it becomes ``target``.

    ``resume_from``: an unfinished run directory to continue (renamed to this run's partial path),
    or a finished one (copied). ``overwrite``: replace ``target`` if it is a finished run."""

    def __init__(self, target: str | Path, overwrite: bool = False, resume_from: Path | None = None):
        self.target = Path(target)
        self.overwrite, self.resume_from = overwrite, resume_from
        self.path = self.target.with_name(f"{self.target.name}.partial-{os.getpid()}")
        self.failed: Path | None = None
        self._lock = TargetLock(self.target)

    def __enter__(self) -> RunDir:
        self._lock.__enter__()
        try:
            if self.resume_from is None or self.resume_from.resolve() != self.target.resolve():
                check_target(self.target, self.overwrite)
            if self.resume_from is None:
                self.path.mkdir(parents=True)
            elif (read_marker(self.resume_from) or {}).get("status") == "finished":
                shutil.copytree(
                    self.resume_from, self.path
                )  # a finished run stays as it is until this one ends
            else:
                os.replace(self.resume_from, self.path)
            self.mark("running")
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def mark(self, status: str, **extra: Any) -> None:
        marker = {**(read_marker(self.path) or {}), "status": status, "pid": os.getpid(), **extra}
        write_json(self.path / MARKER, marker)

    def log_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.mark("finished")
                old = self.target.with_name(f"{self.target.name}.old-{os.getpid()}")
                replacing = self.target.is_dir()
                if replacing:
                    os.replace(self.target, old)  # checked at __enter__: empty, or our finished run
                os.replace(self.path, self.target)
                if replacing:
                    shutil.rmtree(old, ignore_errors=True)
                return
            interrupted = isinstance(exc, (KeyboardInterrupt, RunInterrupted))
            self.mark("interrupted" if interrupted else "failed")
            self.failed = self.target.with_name(f"{self.target.name}.failed")
            if self.failed.exists():
                previous = read_marker(self.failed)
                if previous is not None and latest_checkpoint(self.failed) is None:
                    shutil.rmtree(self.failed)  # our own earlier failure, nothing to resume in it
                else:
                    self.failed = self.target.with_name(f"{self.target.name}.failed-{os.getpid()}")
            os.replace(self.path, self.failed)
        finally:
            self._lock.__exit__()


class RunInterrupted(Exception):
    """A signal stopped the run after a step; a checkpoint was written (``checkpoint``)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (host memory; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
