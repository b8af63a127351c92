"""``dualtune run --nproc N --backend mindspore``: the same command under MindSpore's msrun.

msrun starts a scheduler process and N worker processes, each running the command (the scheduler
only serves the cluster: ``backends.mindspore.serve_msrun_scheduler``). It writes every process's
output to a log file of its own and, when one fails, kills the others. Here its log folder is a
temporary one (kept, and named, only when a process failed); the workers' lines are copied to this
process's stderr as they come; signals go to the workers themselves (msrun answers SIGINT by
killing them, and SIGTERM would end msrun alone), so they finish the step and checkpoint as one
process does. No framework is imported here: msrun and its workers are separate processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

from dualtune.errors import UserError
from dualtune.rundir import read_marker

# msrun's line for a worker that exited with a non-zero status (mindspore 2.7's process manager)
FAILED_WORKER = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_command(nproc: int, port: int, log_dir: Path, argv: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mindspore.parallel.cluster.run",  # msrun
        f"--worker_num={nproc}",
        f"--local_worker_num={nproc}",
        f"--master_port={port}",
        f"--log_dir={log_dir}",
        "--join=True",
        f"--tail_worker_log={nproc}",  # a rank that does not exist: no `tail -f` of any worker log
        "python",
        "-m",
        "dualtune.cli",
        *argv,
    ]


class Workers:
    """msrun's worker processes (pid -> rank) and its scheduler, found among its children by their
    ``MS_ROLE``."""

    def __init__(self, msrun_pid: int):
        import psutil  # msrun's own dependency

        self.msrun = psutil.Process(msrun_pid)
        self.ranks: dict[int, int] = {}
        self.scheduler: int | None = None

    def refresh(self) -> dict[int, int]:
        import psutil

        try:
            children = self.msrun.children()
        except psutil.Error:
            return self.ranks
        for child in children:
            if child.pid in self.ranks:
                continue
            try:
                env = child.environ()
            except psutil.Error:
                continue
            if env.get("MS_ROLE") == "MS_WORKER" and "RANK_ID" in env:
                self.ranks[child.pid] = int(env["RANK_ID"])
            elif env.get("MS_ROLE") == "MS_SCHED":
                self.scheduler = child.pid
        return self.ranks

    def signal(self, signum: int) -> None:
        for pid in self.refresh():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def copy_lines(log_dir: Path, nproc: int, done: threading.Event) -> None:
    """Copy each worker log's lines to stderr as they are written, until ``done``, then the rest."""
    files: dict[int, TextIO] = {}
    pending = {rank: "" for rank in range(nproc)}
    while True:
        finished = done.is_set()
        for rank in range(nproc):
            if rank not in files:
                path = log_dir / f"worker_{rank}.log"
                if not path.exists():
                    continue
                files[rank] = path.open(errors="replace")
            text = pending[rank] + files[rank].read()
            *lines, pending[rank] = text.split("\n")
            for line in lines:
                if not line.startswith("[INFO] PS("):  # MindSpore's cluster start, whatever GLOG_v says
                    sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if finished:
            for rest in pending.values():
                if rest:
                    sys.stderr.write(rest + "\n")
            for f in files.values():
                f.close()
            return
        done.wait(0.2)


def finished_by(output: Path, pid: int | None) -> bool:
    """Whether the run directory ``output`` is a finished run that process ``pid`` wrote."""
    marker = read_marker(output)
    return (
        pid is not None
        and marker is not None
        and (marker.get("status"), marker.get("pid")) == ("finished", pid)
    )


def launch(nproc: int, argv: list[str], log, output: Path) -> int:
    """Run ``dualtune <argv>`` on ``nproc`` worker processes under msrun, writing the run directory
    ``output``; the exit status of the job: 0, 128 + a signal this process received and passed on,
    or 1 when a worker failed."""
    try:
        import psutil  # noqa: F401
        from mindspore.parallel.cluster import run  # noqa: F401  (only to say it is there)
    except ImportError as err:
        raise UserError(f"--nproc {nproc} --backend mindspore: msrun cannot start ({err})") from None
    log_dir = Path(tempfile.mkdtemp(prefix="dualtune-msrun-"))
    # msrun starts the workers as `python ...` from PATH: make that this interpreter.
    bin_dir = log_dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    # As torchrun does: the cores are shared, so each process's kernels take their share of threads.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    cmd = msrun_command(nproc, free_port(), log_dir, argv)
    log.info("data parallel on %d processes: msrun %s", nproc, " ".join(cmd[3:]))
    msrun_out = log_dir / "msrun.log"
    with msrun_out.open("w") as out:
        # A session of its own: Ctrl-C reaches this process only, which passes it to the workers.
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    workers = Workers(child.pid)
    done = threading.Event()
    copier = threading.Thread(target=copy_lines, args=(log_dir, nproc, done), daemon=True)
    copier.start()
    received: list[int] = []

    def forward(signum, frame):  # the workers finish the step and checkpoint (process 0 says where)
        received.append(signum)
        workers.signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    reniced = worker_failed = False
    try:
        while child.poll() is None:
            if not reniced and len(workers.refresh()) == nproc:
                # msrun waits for its workers in a loop without a pause (half a core on 2 cores);
                # its workers are started, so lowering its priority now leaves theirs as it is.
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, child.pid, 19)
                reniced = True
            if not worker_failed and FAILED_WORKER.search(msrun_out.read_text(errors="replace")):
                # msrun has killed the other workers; its scheduler would wait 30 s more for them.
                worker_failed = True
                if workers.scheduler is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(workers.scheduler, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        done.set()
        copier.join()
    if received:
        shutil.rmtree(log_dir, ignore_errors=True)
        return 128 + received[0]
    if child.returncode == 0:
        shutil.rmtree(log_dir, ignore_errors=True)
        return 0
    failed = FAILED_WORKER.search(msrun_out.read_text(errors="replace"))
    if failed:
        pid, code = int(failed.group(1)), int(failed.group(2))
        rank = workers.ranks.get(pid)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        rank0 = next((p for p, r in workers.ranks.items() if r == 0), None)
        if code == -signal.SIGSEGV and finished_by(output, rank0):
            # MindSpore 2.7 on CPU: its cluster's receive thread (RECV_EVENT_LOOP) sometimes reads a
            # null pointer as a process exits (3 of about 30 exits here; the kernel log names
            # libmindspore_backend_common.so). Every process had passed the final barrier.
            print(
                f"dualtune: warning: process {rank} of {nproc} {how} in MindSpore's exit, after the run "
                f"had finished; the run directory {output} is complete",
                file=sys.stderr,
            )
            shutil.rmtree(log_dir, ignore_errors=True)
            return 0
        if rank is None:  # it ended before this process saw it start
            print(f"dualtune: error: a process (pid {pid}) {how}; logs in {log_dir}", file=sys.stderr)
        else:
            print(
                f"dualtune: error: process {rank} of {nproc} {how}; its log: {log_dir}/worker_{rank}.log",
                file=sys.stderr,
            )
    else:
        print(f"dualtune: error: msrun failed (exit {child.returncode}); logs in {log_dir}", file=sys.stderr)
    return 1
