"""What every data-parallel launcher shares, framework-free: a log folder with one log per process,
their lines copied to this process's stderr as they come (tracebacks kept in the logs only), signals
passed on, and one line when a process fails. Each framework's own launcher
(``dualtune/backends/<name>/launch.py``) starts its tool (torchrun, msrun) and finds its processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import TextIO

from dualtune.rundir import read_marker

RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")
# Set by a launcher for its workers: each writes its stdout and stderr to <dir>/worker_<rank>.log.
WORKER_LOGS = "DUALTUNE_WORKER_LOGS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_folder() -> Path:
    """A temporary folder for the job's logs, with ``bin/python`` naming this interpreter (tools
    that start workers as ``python ...`` from PATH then run this one)."""
    log_dir = Path(tempfile.mkdtemp(prefix="dualtune-workers-"))
    bin_dir = log_dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return log_dir


def worker_env(log_dir: Path, nproc: int) -> dict[str, str]:
    """The workers' environment: ``python`` on PATH is this interpreter; the cores are shared, so each
    process's kernels take their share of threads (as torchrun does)."""
    env = {**os.environ, "PATH": f"{log_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    return env


def redirect_worker_output(rank: int) -> None:
    """In a worker whose launcher asked for it: stdout and stderr into its own log file."""
    folder = os.environ.get(WORKER_LOGS)
    if not folder:
        return
    fd = os.open(Path(folder) / f"worker_{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class LineCopier:
    """Copies each worker log's lines to stderr as they are written (a thread), leaving out Python
    tracebacks (they stay in the log, which the failure line names) and launcher noise."""

    def __init__(self, log_dir: Path, nproc: int, skip_prefixes: tuple[str, ...] = ()):
        self.log_dir, self.nproc, self.skip = log_dir, nproc, skip_prefixes
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._copy, daemon=True)

    def __enter__(self) -> LineCopier:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _copy(self) -> None:
        files: dict[int, TextIO] = {}
        pending = {rank: "" for rank in range(self.nproc)}
        in_traceback = dict.fromkeys(range(self.nproc), False)
        while True:
            finished = self.done.is_set()
            for rank in range(self.nproc):
                if rank not in files:
                    path = self.log_dir / f"worker_{rank}.log"
                    if not path.exists():
                        continue
                    files[rank] = path.open(errors="replace")
                text = pending[rank] + files[rank].read()
                *lines, pending[rank] = text.split("\n")
                if finished and pending[rank]:
                    lines.append(pending[rank])
                    pending[rank] = ""
                for line in lines:
                    bare = RANK_PREFIX.sub("", line)  # torch.distributed prefixes a worker's error lines
                    if bare.startswith("Traceback (most recent call last):"):
                        in_traceback[rank] = True
                        continue
                    if in_traceback[rank]:
                        # the traceback's last line is the first one not indented: the exception
                        in_traceback[rank] = bare.startswith((" ", "\t")) or not bare
                        continue
                    if not line.startswith(self.skip):
                        sys.stderr.write(line + "\n")
            sys.stderr.flush()
            if finished:
                for f in files.values():
                    f.close()
                return
            self.done.wait(0.2)


def finished_by(output: Path, pid: int | None) -> bool:
    """Whether the run directory ``output`` is a finished run that process ``pid`` wrote."""
    marker = read_marker(output)
    return (
        pid is not None
        and marker is not None
        and (marker.get("status"), marker.get("pid")) == ("finished", pid)
    )


def how_it_ended(code: int) -> str:
    """'was killed by SIGKILL' for -9, 'exited with status 1' for 1."""
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def failure_line(rank: int | None, nproc: int, code: int, log_dir: Path, pid: int | None = None) -> str:
    """The one line a failed data-parallel job ends with."""
    how = how_it_ended(code)
    if rank is None:  # it ended before the launcher saw it start
        who = f"a process (pid {pid})" if pid is not None else "a process"
        return f"dualtune: error: {who} {how}; logs in {log_dir}"
    return f"dualtune: error: process {rank} of {nproc} {how}; its log: {log_dir}/worker_{rank}.log"


def forget(log_dir: Path) -> None:
    """The job went as it should: its logs are not kept."""
    shutil.rmtree(log_dir, ignore_errors=True)
