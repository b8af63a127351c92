"""The bench's child processes and the machine's CPU around them: each side (and the model maker)
runs as ``bench.py`` with a child flag, in an environment of its own, and the CPU time other
processes used meanwhile is measured (--wait-quiet waits for a quiet machine first)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import BenchError

BENCH = Path(__file__).resolve().with_name("bench.py")
# --wait-quiet: "quiet" means other processes use less than this share of the cores; a side that
# ran while they used more is run again, at most BUSY_RETRIES times.
BUSY_SHARE = 0.10
BUSY_RETRIES = 2


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.pop("DUALTUNE_BACKEND", None)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "GLOG_v": env.get("GLOG_v", "3"),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, say, threshold: float = BUSY_SHARE, window_s: float = 10.0) -> float | None:
    """Wait (up to ``limit_s``) until other processes use less than ``threshold`` of the cores over
    ``window_s`` seconds; returns the last share seen (None where /proc/stat cannot be read)."""
    deadline, share, told = time.monotonic() + limit_s, None, False
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(window_s)
        b1 = busy_cpu_seconds()
        if b0 is None or b1 is None:
            return None
        share = (b1 - b0) / (window_s * (os.cpu_count() or 1))
        if share < threshold or time.monotonic() >= deadline:
            if share >= threshold:
                say(f"still busy after {limit_s:.0f} s ({100 * share:.0f} % of the cores); measuring anyway")
            return share
        if not told:
            say(
                f"other processes use {100 * share:.0f} % of the cores; waiting up to {limit_s:.0f} s for quiet"
            )
            told = True


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def torchrun(nproc: int) -> list[str]:
    """The command that runs a script as ``nproc`` processes of this machine, as ``dualtune run
    --nproc`` does on torch (each process gets RANK and WORLD_SIZE; the backend joins them)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def spawn(
    args: list[str], env: dict, log_path: Path, what: str, usage: dict | None = None, nproc: int = 1
) -> str:
    """Run bench.py as a child (``nproc`` > 1: that many, under torchrun); ``usage`` receives its wall
    time, its CPU time and the CPU time everything else on the machine used meanwhile (other jobs
    competing for the cores)."""
    busy0, own0, wall0 = busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [*launcher, str(BENCH), *args], stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
    busy1, own1, wall1 = busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    if usage is not None:
        usage["child_wall_seconds"] = wall1 - wall0
        usage["child_cpu_seconds"] = own1 - own0
        if busy0 is not None and busy1 is not None:
            other = max(0.0, (busy1 - busy0) - (own1 - own0))
            usage["other_cpu_seconds"] = other
            # Share of the machine's cores that other processes kept busy while this side ran.
            usage["other_cpu_share"] = other / ((wall1 - wall0) * (os.cpu_count() or 1))
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().strip().splitlines()[-15:])
        raise BenchError(f"{what} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return proc.stdout
