"""The environment a run ran in, as its ``environment.json`` records it: Python, dualtune and the
framework's packages (from installed metadata, nothing imported), the machine (CPU model, cores),
the variables that change numbers or speed, and what the backend says of its device."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from dualtune import __version__

# Variables that change a run's numbers or speed (threads, determinism, hub access).
VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PYTHONHASHSEED",
    "CUBLAS_WORKSPACE_CONFIG",
    "CUDA_VISIBLE_DEVICES",
    "ASCEND_RT_VISIBLE_DEVICES",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "DUALTUNE_MINDSPORE_GRAPH",
    "DUALTUNE_MINDSPORE_COMPAT",
)


def versions(backend_name: str) -> dict[str, str]:
    """Python, dualtune and the backend's packages, from their installed metadata (nothing imported)."""
    from dualtune.backend import backend_names, framework

    out = {"python": platform.python_version(), "dualtune": __version__}
    # a backend no descriptor registers (a library user's own) names no packages
    packages = framework(backend_name).packages if backend_name in backend_names() else ()
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def record(backend: Any) -> dict[str, Any]:
    """The environment record of a run on ``backend`` (an active ``dualtune.backend.Backend``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "backend": backend.name,
        "device": backend.device,
        "versions": versions(backend.name),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": cores,
        "variables": {k: os.environ[k] for k in VARIABLES if k in os.environ},
        **backend.device_info(),
    }
