"""``dualtune run --nproc N --backend mindspore``: the same command under MindSpore's msrun.

msrun starts a scheduler process and N worker processes, each running the command (the scheduler
only serves the cluster: ``dualtune.backends.mindspore.serve_msrun_scheduler``). It writes every process's
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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dualtune import launch as common
from dualtune.errors import UserError
from dualtune.signals import handling

# msrun's line for a worker that exited with a non-zero status (mindspore 2.7's process manager)
FAILED_WORKER = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")


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


def launch(nproc: int, argv: list[str], log: Any, output: Path) -> int:
    """Run ``dualtune <argv>`` on ``nproc`` worker processes under msrun, writing the run directory
    ``output``; the exit status of the job: 0, 128 + a signal this process received and passed on,
    or 1 when a worker failed."""
    try:
        import psutil  # noqa: F401
        from mindspore.parallel.cluster import run  # noqa: F401  (only to say it is there)
    except ImportError as err:
        raise UserError(f"--nproc {nproc} --backend mindspore: msrun cannot start ({err})") from None
    log_dir = common.log_folder()
    env = common.worker_env(log_dir, nproc)
    cmd = msrun_command(nproc, common.free_port(), log_dir, argv)
    log.info("data parallel on %d processes: msrun %s", nproc, " ".join(cmd[3:]))
    msrun_out = log_dir / "msrun.log"
    with msrun_out.open("w") as out:
        # A session of its own: Ctrl-C reaches this process only, which passes it to the workers.
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    workers = Workers(child.pid)
    received: list[int] = []

    def forward(signum: int) -> None:  # the workers finish the step and checkpoint (process 0 says where)
        received.append(signum)
        workers.signal(signum)

    reniced = worker_failed = False
    # MindSpore's cluster start lines come whatever GLOG_v says
    with handling(forward), common.LineCopier(log_dir, nproc, skip_prefixes=("[INFO] PS(",)):
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
    if received:
        common.forget(log_dir)
        return 128 + received[0]
    if child.returncode == 0:
        common.forget(log_dir)
        return 0
    failed = FAILED_WORKER.search(msrun_out.read_text(errors="replace"))
    if failed:
        pid, code = int(failed.group(1)), int(failed.group(2))
        rank = workers.ranks.get(pid)
        rank0 = next((p for p, r in workers.ranks.items() if r == 0), None)
        if code == -signal.SIGSEGV and common.finished_by(output, rank0):
            # MindSpore 2.7 on CPU: its cluster's receive thread (RECV_EVENT_LOOP) sometimes reads a
            # null pointer as a process exits (3 of about 30 exits here; the kernel log names
            # libmindspore_backend_common.so). Every process had passed the final barrier.
            print(
                f"dualtune: warning: process {rank} of {nproc} {common.how_it_ended(code)} in MindSpore's "
                f"exit, after the run had finished; the run directory {output} is complete",
                file=sys.stderr,
            )
            common.forget(log_dir)
            return 0
        print(common.failure_line(rank, nproc, code, log_dir, pid), file=sys.stderr)
    else:
        print(f"dualtune: error: msrun failed (exit {child.returncode}); logs in {log_dir}", file=sys.stderr)
    return 1
