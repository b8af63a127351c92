"""``dualtune run --nproc N --backend torch``: the same command under torchrun (torch.distributed.run).

Each worker writes its output to a log of its own (``dualtune.launch.WORKER_LOGS``); their lines are
copied to this process's stderr as they come, and torchrun's own output (its SignalException and
ChildFailedError reports) goes to ``torchrun.log``. A failed job ends in one line naming the process
and its log, as the MindSpore launcher's does. Imports no torch: torchrun is a process of its own.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from dualtune import launch as common
from dualtune.signals import handling

# torchrun's ChildFailedError report: the first failure's rank and exit code
ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "dualtune.cli",
        *argv,
    ]


def launch(nproc: int, argv: list[str], log: Any, output: Path) -> int:
    """Run ``dualtune <argv>`` on ``nproc`` processes under torchrun, writing the run directory
    ``output``; 0, 128 + a signal this process received and passed on, or 1 when a process failed."""
    log_dir = common.log_folder()
    env = {**common.worker_env(log_dir, nproc), common.WORKER_LOGS: str(log_dir)}
    cmd = torchrun_command(nproc, argv)
    log.info("data parallel on %d processes: %s", nproc, " ".join(cmd[1:]))
    torchrun_out = log_dir / "torchrun.log"
    with torchrun_out.open("w") as out:
        # A session of its own: Ctrl-C reaches this process only, which passes it on once.
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    received: list[int] = []

    def forward(signum: int) -> None:  # torchrun stops its processes; they checkpoint (process 0 says where)
        received.append(signum)
        child.send_signal(signum)

    with handling(forward), common.LineCopier(log_dir, nproc):
        code = child.wait()
    if received:
        common.forget(log_dir)
        return 128 + received[0]
    if code == 0:
        common.forget(log_dir)
        return 0
    failed = ROOT_CAUSE.search(torchrun_out.read_text(errors="replace"))
    if failed:
        print(
            common.failure_line(int(failed.group(1)), nproc, int(failed.group(2)), log_dir), file=sys.stderr
        )
    else:
        print(f"dualtune: error: torchrun failed (exit {code}); logs in {log_dir}", file=sys.stderr)
    return 1
