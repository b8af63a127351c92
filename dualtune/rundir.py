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

import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import psutil

from dualtune.errors import RunDirError
from dualtune.recipe import Recipe

log = logging.getLogger("dualtune")

MARKER = ".dualtune-run"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.json"
_PARTIAL = re.compile(r"\.partial-(\d+)$")
TMP_SUFFIX = ".dualtune-tmp"  # write_atomic's files in the making; a resume clears those kill -9 left
# Tests kill a run at a named instant of its finalising: DUALTUNE_FAULT_AT=<name> (see fault_point).
FAULT_ENV = "DUALTUNE_FAULT_AT"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``path`` whole or not at all, with the usual permissions (mkstemp alone gives 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
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


def fault_point(name: str) -> None:
    """A named instant where the fault-injection tests signal this process: ``DUALTUNE_FAULT_AT``
    is ``NAME`` (kill -9) or ``NAME:SIGNAL`` (``model-load:SIGTERM``). The points: model-load,
    step-N (after step N's update), evaluation (in the loop's evaluations), checkpoint-write
    (tensors written, state.json not yet), checkpoint-N (step N's checkpoint in place), and the
    instants of finalising: final-eval, best-swap, final-files, finished-files, rename."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, sig = wanted.partition(":")
    if point == name and name not in _faults_sent:
        _faults_sent.add(name)  # once: a signal that stops the run must not come again as it stops
        os.kill(os.getpid(), signal.Signals[sig] if sig else signal.SIGKILL)


_faults_sent: set[str] = set()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _some(names: list[str]) -> str:
    """The first five of ``names``, and how many more, for a one-line refusal."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


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
    foreign = foreign_files(target, marker)
    if foreign:
        raise RunDirError(
            f"{target}: holds files its run did not write ({_some(foreign)}); --overwrite replaces only a run's "
            f"own files: move them out, or choose a free --output-dir, e.g. {free_name(target)}"
        )


# What a run directory holds besides the files its run wrote (the marker lists those): what the
# commands that read a finished run add to it (dualtune eval's eval/, dualtune export's export/).
ADDED_BY_COMMANDS = ("eval", "export")
# A run finished before the marker listed its files: the names a run writes.
RUN_FILES = (
    "adapter", "adapter_init", "activations.safetensors", "checkpoints", "classification_report.json",
    "confusion_matrix.png", "data.json", "final_metrics.json", "loss_curve.png", "metrics.jsonl",
    "predictions.jsonl", "recipe.yaml", "run.log", "tensorboard", "trainable.json", "wandb",
)  # fmt: skip


def foreign_files(target: Path, marker: dict) -> list[str]:
    """The top-level names in the finished run ``target`` that neither its run nor a dualtune
    command wrote (a user's notes): what ``--overwrite`` must not remove."""
    own = set(marker.get("files") or RUN_FILES) | set(ADDED_BY_COMMANDS) | {MARKER}
    return sorted(p.name for p in target.iterdir() if p.name not in own)


def check_new_file(path: Path, overwrite: bool = False, suffixes: tuple[str, ...] = ()) -> None:
    """A single file a command is about to write (``synthetic-data``, ``report --plot``): one line
    when it would replace a file without ``--overwrite``, when a folder is in the way, or when its
    suffix is not one the command writes. Write it with ``write_atomic``: nothing half-written."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise RunDirError(f"{path}: expected a file ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise RunDirError(f"{path}: a folder is in the way of the file; choose another name")
    if path.exists() and not overwrite:
        raise RunDirError(
            f"{path}: exists; dualtune replaces a file only with --overwrite, or choose another name"
        )


def check_new_folder(path: Path, own_names: set[str], overwrite: bool = False) -> None:
    """A folder a command fills (``tiny``): it must be absent or empty, or, with ``--overwrite``,
    hold nothing but what the command writes (``own_names``); anything else is listed, never removed."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: a file is in the way of the folder; choose another name")
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not names:
        return
    foreign = [n for n in names if n not in own_names]
    if foreign:
        raise RunDirError(
            f"{path}: holds files dualtune did not write ({_some(foreign)}), which it never touches; choose another folder"
        )
    if not overwrite:
        raise RunDirError(
            f"{path}: exists; add --overwrite to replace what dualtune wrote there, or choose another folder"
        )


def replace_folder(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, the old one (checked by ``check_new_folder``)
    renamed aside first and removed after: never a half-replaced folder."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    replacing = path.is_dir()
    if replacing:
        os.replace(path, old)
    os.replace(tmp, path)
    if replacing:
        shutil.rmtree(old, ignore_errors=True)


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
    fault_point("checkpoint-write")
    write_json(tmp / CHECKPOINT_STATE, {**state, "files": file_records(tmp)})  # last: it vouches for the rest
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in checkpoints(run_path)[:-keep]:
            if checkpoint_step(old) != protect:
                shutil.rmtree(old, ignore_errors=True)
    return final


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in a checkpoint folder but its state (whatever wrote them)."""
    return {
        f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != CHECKPOINT_STATE
    }


def damage(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be used (a file cut, changed or missing since it was written),
    or None. A checkpoint from before files were recorded is taken as it is."""
    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
        files = state.get("files", {})
        recorded = {str(name): (int(r["size"]), str(r["sha256"])) for name, r in files.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"{CHECKPOINT_STATE} unreadable"
    for name, (size, digest) in recorded.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} when written"
        if sha256_file(f) != digest:
            return f"{name} changed since it was written (sha256)"
    return None


def discard_checkpoints_after(run_path: Path, step: int) -> None:
    """A resume from ``step`` retrains what comes after: later checkpoints (damaged ones passed
    over) would stand among the new ones."""
    for later in checkpoints(run_path):
        if checkpoint_step(later) > step:
            shutil.rmtree(later)


def load_checkpoint(path: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(state, tensors by file) of a checkpoint ``save_checkpoint`` wrote."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
        tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    except (OSError, ValueError, SafetensorError) as err:
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
        self.foreign: list[str] = []
        self._lock = TargetLock(self.target)

    def __enter__(self) -> RunDir:
        self._lock.__enter__()
        try:
            if self.resume_from is None or self.resume_from.resolve() != self.target.resolve():
                check_target(self.target, self.overwrite)
            source = read_marker(self.resume_from) if self.resume_from is not None else None
            # a user's files in the run continued stay theirs (never listed as the run's own)
            self.foreign = foreign_files(self.resume_from, source) if self.resume_from and source else []
            if self.resume_from is None:
                self.path.mkdir(parents=True)
            elif self.resume_from.resolve() == self.target.resolve():
                shutil.copytree(
                    self.resume_from, self.path
                )  # a finished run stays as it is until this one ends
            else:  # an unfinished run (killed even as it was being moved into place)
                os.replace(self.resume_from, self.path)
            if self.resume_from is not None:  # files a kill -9 cut in the making
                for cut in self.path.rglob(f"*{TMP_SUFFIX}"):
                    cut.unlink()
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

    def metrics_lines(self) -> int:
        try:
            with open(self.path / "metrics.jsonl") as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                # the files this run wrote: --overwrite later replaces these and nothing else
                own = sorted(p.name for p in self.path.iterdir() if p.name not in (MARKER, *self.foreign))
                self.mark("finished", files=own)
                old = self.target.with_name(f"{self.target.name}.old-{os.getpid()}")
                replacing = self.target.is_dir()
                if replacing:
                    os.replace(self.target, old)  # checked at __enter__: empty, or our finished run
                fault_point("rename")
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


# ---------------------------------------------------------------- the plan: where a run writes, what it continues

# What a resumed run must share with its checkpoint, or it would silently be another run. The rest
# (epochs, max_steps, eval and log cadence, optimizer, schedule) may change: more epochs extend a run.
FIXED_KEYS = (
    "model",
    "data",
    "peft",
    "loss",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.seed",
    "train.group_by_length",
    "train.dropout",
)
# Keys whose change says nothing about the training (where it is written, how it is shown).
UNSEEN_KEYS = ("train.output_dir", "train.overwrite")


def output_dir(recipe: Recipe, backend_name: str, override: str | Path | None = None) -> Path:
    """The run directory: ``override``, else ``train.output_dir`` with {recipe} and {backend} filled."""
    if override is not None:
        return Path(override)
    return Path(recipe.train.output_dir.format(recipe=recipe.name or "run", backend=backend_name))


def flat_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as dotted keys and values."""

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else k))
        return out

    return flat(recipe.model_dump(mode="json"))


def _fixed(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FIXED_KEYS) and key != "peft.init_from"


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The recipe's values under FIXED_KEYS, flat (peft.init_from aside: a checkpoint replaces it)."""
    return {k: v for k, v in flat_recipe(recipe).items() if _fixed(k)}


def check_resumable(saved: dict[str, Any], recipe: Recipe, where: Path) -> None:
    now = fingerprint(recipe)
    for key in sorted(set(saved) | set(now)):
        if key not in saved and now[key] == _default(recipe, key):
            continue  # a key a later dualtune added, at the value the checkpoint's run had
        if saved.get(key) != now.get(key):
            raise RunDirError(
                f"--resume {where}: {key} was {saved.get(key)!r} in the checkpoint, now "
                f"{now.get(key)!r}; resuming would mix two runs (start a new run instead)"
            )


def _default(recipe: Recipe, key: str) -> Any:
    """The recipe schema's default for the dotted ``key`` (as ``flat_recipe`` writes values), or a
    marker that equals nothing when it has none."""
    from pydantic import BaseModel

    model: Any = type(recipe)
    value: Any = _NO_DEFAULT
    for part in key.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return _NO_DEFAULT
        value = field.get_default(call_default_factory=True)
        model = field.annotation
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


_NO_DEFAULT = object()


def continuation(recipe: Recipe, data: dict[str, Any], processes: int) -> dict[str, Any]:
    """What determines how a run goes on from a checkpoint besides the recipe's fixed keys: the data
    it trains on (``dualtune.data.fingerprint``), the rows of a step and the schedule's length."""
    from dualtune.trainer import step_batch_size, total_steps

    n_train = sum(data["label_counts"]["train"].values())
    return {
        "data": data,
        "step_batch": {
            "batch_size": recipe.train.batch_size,
            "grad_accum_steps": recipe.train.grad_accum_steps,
            "processes": processes,
            "rows": step_batch_size(recipe, processes),
        },
        "total_steps": total_steps(recipe, n_train, processes),
    }


DATA_FIELDS = {  # the data fingerprint's fields, as a refusal names them
    "source": "data.source",
    "file_sha256": "the file's sha256",
    "rows": "rows",
    "rows_sha256": "the rows' content (sha256)",
    "label_names": "label names",
    "label_counts": "rows per class",
    "train_indices_sha256": "the train split's rows",
    "eval_indices_sha256": "the eval split's rows",
}


def _short(value: Any) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)


def data_change(saved: dict, now: dict) -> str | None:
    """The first field of two data fingerprints (``data.fingerprint``) that differs, as a phrase."""
    for key, name in DATA_FIELDS.items():
        was, new = saved.get(key), now.get(key)
        if was != new:
            return (
                f"{name} {_short(was)} -> {_short(new)}"
                if key != "label_counts"
                else f"{name} {was} -> {new}"
            )
    return None


def check_same_data(run_dir: Path) -> None:
    """``dualtune eval`` reads the run's recipe's data again: refuse, in one line, when it is not the
    data the run trained and evaluated on (data.json), since the eval split would be another one."""
    from dualtune import data as datamap
    from dualtune.recipe import load_recipe

    saved_file = run_dir / "data.json"
    if not saved_file.is_file():
        return  # a run from before data.json
    saved = json.loads(saved_file.read_text())
    recipe = load_recipe(run_dir / "recipe.yaml")
    change = data_change(saved, datamap.fingerprint(datamap.load_rows(recipe.data), recipe.data))
    if change:
        raise RunDirError(
            f"{run_dir}: its data changed since the run ({change}); eval would score another eval "
            f"split: restore {recipe.data.source} as it was, or train a new run on the new data"
        )


def find_resume(target: Path, resume: str | Path | bool) -> Path:
    """The directory ``--resume`` continues: the one named, else the unfinished run of ``target``."""
    if resume is not True:
        path = Path(str(resume))
        if not path.is_dir() or read_marker(path) is None:
            raise RunDirError(f"--resume {path}: not a dualtune run directory")
        if latest_checkpoint(path) is None:
            raise RunDirError(f"--resume {path}: no checkpoint to resume from (set train.save_every)")
        return path
    found = [u for u in unfinished_runs(target) if u.checkpoint is not None]
    if not found and target.is_dir() and latest_checkpoint(target) is not None:
        return target  # a finished run with checkpoints: more epochs extend it
    if not found:
        raise RunDirError(
            f"--resume: no unfinished run of {target} with a checkpoint "
            f"(looked for {target.name}.failed and {target.name}.partial-*); the same command "
            "without --resume starts it afresh"
        )
    return max(found, key=lambda u: u.checkpoint.stat().st_mtime if u.checkpoint else 0).path


def check_leftovers(target: Path) -> None:
    """A new run (not --resume) next to an unfinished one: refuse when that one could be resumed."""
    for u in unfinished_runs(target):
        if u.checkpoint is not None:
            raise RunDirError(
                f"{u.path}: an unfinished run of this output ({u.why}, checkpoint at step "
                f"{checkpoint_step(u.checkpoint)}); continue it with --resume, or "
                f"remove it to start over"
            )
        if u.path.name.endswith(".failed"):
            continue  # dualtune's own failed run, no checkpoint: the next failure replaces it
        log.warning("%s: left by a run that was killed (%s), with no checkpoint; remove it", u.path, u.why)


@dataclass
class RunPlan:
    """A run planned once, before anything loads (``plan_run``): where it writes, and on --resume
    what it continues. ``validate`` and ``run_recipe`` act on the same plan."""

    target: Path
    overwrite: bool
    source: Path | None = None  # the run directory --resume continues
    checkpoint: Path | None = None  # its newest intact checkpoint
    state: dict[str, Any] = field(default_factory=dict)  # that checkpoint's state.json
    notes: list[str] = field(
        default_factory=list
    )  # said when the run starts (a damaged checkpoint passed over)
    data: dict[str, Any] | None = None  # dualtune.data.fingerprint of what the run trains on
    changed: str | None = None  # "changed from step N: ..." (keys a resume may change)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    def _refuse(self, what: str) -> RunDirError:
        assert self.source is not None
        again = (
            "--overwrite or another --output-dir"
            if self.source.resolve() == self.target.resolve()
            else f"another --output-dir, or remove {self.source}"
        )
        return RunDirError(
            f"--resume {self.checkpoint}: {what}; resuming would be another run (start afresh: {again})"
        )

    def check_continuation(self, recipe: Recipe, processes: int | None) -> None:
        """Refuse a resume that would not continue the checkpoint's run: other data, another step
        batch, or fewer steps than it has trained; note the keys that may change and did.
        ``processes`` None: not known yet (a launched process checks again)."""
        if self.checkpoint is None or self.data is None:
            return
        saved = self.state.get("continuation")
        if saved is not None:
            change = data_change(saved["data"], self.data)
            if change:
                raise self._refuse(f"the data changed since step {self.step} ({change})")
        if processes is not None and saved is not None:
            now = continuation(recipe, self.data, processes)
            was_b, new_b = saved["step_batch"], now["step_batch"]
            if was_b["rows"] != new_b["rows"]:
                raise self._refuse(
                    f"a step took {was_b['batch_size']} x {was_b['grad_accum_steps']} x "
                    f"{was_b['processes']} rows (batch_size x grad_accum_steps x processes), now "
                    f"{new_b['batch_size']} x {new_b['grad_accum_steps']} x {new_b['processes']}"
                )
            total = now["total_steps"]
        elif processes is not None:
            from dualtune.trainer import total_steps  # a checkpoint of before continuations were kept

            total = total_steps(recipe, sum(self.data["label_counts"]["train"].values()), processes)
        else:
            total = None
        if total is not None and total < self.step:
            limit = f" and train.max_steps {recipe.train.max_steps}" if recipe.train.max_steps else ""
            raise self._refuse(
                f"train.epochs {recipe.train.epochs}{limit} give{'' if limit else 's'} {total} steps, "
                f"below the checkpoint's {self.step}: train.epochs and train.max_steps may only extend a run"
            )
        self.changed = self._changes(recipe, saved, total)

    def _changes(self, recipe: Recipe, saved: dict | None, total: int | None) -> str | None:
        before = self.state.get("recipe") or {}
        now = flat_recipe(recipe)
        said = [
            f"{k} {before.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(before) | set(now))
            if before and not _fixed(k) and k not in UNSEEN_KEYS and before.get(k) != now.get(k)
        ]
        was_total = saved.get("total_steps") if saved else None
        if total is not None and was_total is not None and total != was_total:
            linear = recipe.schedule.name != "constant" or recipe.schedule.warmup_ratio is not None
            said.append(
                f"total steps {was_total} -> {total}"
                + (" (the schedule's learning rate follows the new total)" if linear else "")
            )
        return f"changed from step {self.step}: " + ", ".join(said) if said else None


def intact_checkpoint(source: Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint of ``source`` whose files are as written, its state, and a note for
    the newer ones passed over; none intact: one line."""
    passed: list[tuple[Path, str]] = []
    for path in reversed(checkpoints(source)):
        why = damage(path)
        if why is None:
            state = json.loads((path / CHECKPOINT_STATE).read_text())
            notes = [
                f"{p}: damaged ({w}); resuming from {path.name}, the newest intact checkpoint"
                for p, w in passed
            ]
            return path, state, notes
        passed.append((path, why))
    said = "; ".join(f"{p.name}: {w}" for p, w in passed)
    raise RunDirError(
        f"--resume {source}: no intact checkpoint ({said}); start afresh with another --output-dir"
    )


def plan_run(
    recipe: Recipe,
    backend_name: str,
    output: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | bool | None = None,
) -> RunPlan:
    """Every check of the output a run makes before any work, once: the target is free and may be
    written, or --resume's run and its newest intact checkpoint, whose recipe keys match."""
    target = output_dir(recipe, backend_name, output)
    overwrite = overwrite or recipe.train.overwrite
    TargetLock(target).check_free()
    plan = RunPlan(target, overwrite)
    if not resume:
        check_target(target, overwrite)
        check_leftovers(target)
        return plan
    plan.source = find_resume(target, resume)
    if plan.source.resolve() != target.resolve():
        check_target(target, overwrite)
    plan.checkpoint, plan.state, plan.notes = intact_checkpoint(plan.source)
    if isinstance(plan.state.get("fingerprint"), dict):  # a changed recipe is refused before any work
        check_resumable(plan.state["fingerprint"], recipe, plan.checkpoint)
    return plan
