"""The run directory: written into a partial directory, moved into place only when the run succeeds.

A failed run never overwrites a good one: its partial directory is renamed ``<dir>.failed`` (kept
for its log) and the previous run, if any, stays where it was.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class RunDir:
    """``with RunDir(target) as rd: ...`` writes into ``rd.path``; on success it becomes ``target``."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.path = self.target.with_name(f"{self.target.name}.partial-{os.getpid()}")
        self.failed: Path | None = None

    def __enter__(self) -> "RunDir":
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self._metrics = open(self.path / "metrics.jsonl", "a")
        return self

    def log_metrics(self, record: dict) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._metrics.close()
        if exc_type is None:
            old = self.target.with_name(f"{self.target.name}.old-{os.getpid()}")
            if self.target.exists():
                os.replace(self.target, old)
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)
            return
        self.failed = self.target.with_name(f"{self.target.name}.failed")
        shutil.rmtree(self.failed, ignore_errors=True)
        os.replace(self.path, self.failed)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (host memory; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
