"""The bench's report: the medians over repeated runs, the ratios dualtune / reference, the table on
stdout, and the facts about the machine and the versions that the JSON records."""

from __future__ import annotations

import os
import platform
import statistics
from importlib import metadata
from pathlib import Path

from common import rate

METRICS = ("steps_per_s", "tokens_per_s", "eval_samples_per_s", "peak_rss_mb")
# dualtune sides also report their rates with graph compiles taken out (a row where both sides have it)
COMPILED_METRICS = ("steps_per_s_compiled", "eval_samples_per_s_compiled")
# --against nproc1 adds: examples (all processes') per second, and the processes' peak RSS summed
# (peak_rss_mb is then the largest process's).
NPROC_METRICS = METRICS[:2] + ("examples_per_s",) + METRICS[2:] + ("peak_rss_mb_summed",)
LABELS = {
    "steps_per_s": "train steps/s",
    "tokens_per_s": "train tokens/s",
    "examples_per_s": "train examples/s",
    "eval_samples_per_s": "eval samples/s",
    "peak_rss_mb": "peak RSS MB",
    "peak_rss_mb_summed": "peak RSS MB, sum",
    "steps_per_s_compiled": "steps/s, compiled",
    "eval_samples_per_s_compiled": "eval/s, compiled",
}
# With --repeat, these are the medians over the runs (the other fields are the last run's).
MEDIAN_FIELDS = (
    NPROC_METRICS
    + COMPILED_METRICS
    + (
        "compile_seconds",
        "eval_compile_seconds",
        "train_seconds",
        "eval_seconds",
        "wall_seconds",
        "child_wall_seconds",
        "child_cpu_seconds",
        "other_cpu_seconds",
        "other_cpu_share",
    )
)


def summarize(results: list[dict]) -> dict:
    """One run: itself. Several: the median of each metric, the runs kept under ``runs``."""
    if len(results) == 1:
        return results[0]
    out = dict(results[-1])
    for k in MEDIAN_FIELDS:
        if all(k in r for r in results):
            out[k] = statistics.median(r[k] for r in results)
    out["runs"] = results
    return out


def ratios(sides: dict, metrics: tuple = METRICS) -> dict:
    d, r = sides["dualtune"], sides["reference"]
    compiled = tuple(k for k in COMPILED_METRICS if k in d and k in r)
    return {k: rate(d[k], r[k]) for k in metrics + compiled}


def format_table(report: dict) -> str:
    d, r, q = report["dualtune"], report["reference"], report["ratios"]
    names = ("dualtune", "reference", "ratio d/r")
    if report.get("against") == "dualtune in fp32":  # mixed precision against fp32, both dualtune
        names = (report["precision"], "fp32", f"{report['precision']}/fp32")
    if report.get("nproc", 1) > 1:  # data parallel against one process, both dualtune
        n, t = report["nproc"], report["threads"]
        names = (f"{n} x {t // n} thr", f"1 x {t} thr", f"{n}x{t // n}/1x{t}")
    lines = [f"{'':<18}{names[0]:>12}{names[1]:>12}{names[2]:>11}"]
    for k in q:
        lines.append(f"{LABELS[k]:<18}{d[k]:>12.4g}{r[k]:>12.4g}{q[k]:>11.3f}")
    if "peak_gpu_mb" in d and "peak_gpu_mb" in r:  # --device cuda
        gpu = (d["peak_gpu_mb"], r["peak_gpu_mb"])
        lines.append(f"{'peak GPU MB':<18}{gpu[0]:>12.4g}{gpu[1]:>12.4g}{rate(*gpu):>11.3f}")
    return "\n".join(lines)


def versions(backend: str) -> dict:
    names = ["torch", "transformers", "peft", "tokenizers"] + (
        ["mindspore", "mindnlp"] if backend == "mindspore" else []
    )
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(load_before: tuple, load_after: tuple) -> dict:
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
    }
