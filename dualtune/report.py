"""``dualtune report``: finished runs side by side, one row each, from the files the run directory
holds (final_metrics.json, trainable.json, recipe.yaml). Reads JSON and YAML only: no backend, no
framework, so it answers at once."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from dualtune.errors import RunDirError
from dualtune.rundir import read_marker

FORMATS = ("text", "markdown", "csv")
# (key, text/markdown header, format for text and markdown; csv writes the raw value)
COLUMNS = [
    ("run", "run", "{}"),
    ("backend", "backend", "{}"),
    ("method", "method", "{}"),
    ("metric", "metric", "{}"),
    ("score", "score", "{:.4f}"),
    ("f1_macro", "f1 macro", "{:.4f}"),
    ("trainable_parameters", "trainable", "{:,}"),
    ("trainable_percent", "trainable %", "{:.4f}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("peak_rss_mb", "peak MB", "{:.0f}"),
    ("steps", "steps", "{}"),
]

CSV_KEYS = ["run", "backend", "method", "task", "metric", "score", "f1_macro", "trainable_parameters",
            "total_parameters", "trainable_percent", "train_seconds", "peak_rss_mb", "steps"]


def _read(path: Path, loader):
    if not path.is_file():
        raise RunDirError(f"{path.parent}: not a finished run (no {path.name})")
    try:
        value = loader(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise RunDirError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: expected a mapping")
    return value


def main_metric(task: str, final: dict) -> str:
    """What the task is judged by: accuracy; seq2seq exact_match (generated text), else teacher-forced."""
    if task == "classification":
        return "accuracy"
    return "exact_match" if "exact_match" in final else "teacher_forced_accuracy"


def run_row(run_dir: str | Path) -> dict:
    """One run's row; RunDirError if ``run_dir`` is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such directory")
    marker = read_marker(run_dir)
    if marker is not None and marker.get("status") != "finished":
        step = f" at step {marker['step']}" if marker.get("step") else ""
        raise RunDirError(f"{run_dir}: an unfinished run ({marker.get('status')}{step}); report reads finished runs")
    final = _read(run_dir / "final_metrics.json", json.loads)
    trainable = _read(run_dir / "trainable.json", json.loads)
    recipe = _read(run_dir / "recipe.yaml", yaml.safe_load)
    task = (recipe.get("model") or {}).get("task")
    metric = main_metric(task, final)
    if metric not in final:
        raise RunDirError(f"{run_dir / 'final_metrics.json'}: no {metric}")
    n_train = trainable.get("trainable", final.get("trainable_parameters"))
    total = trainable.get("total", final.get("total_parameters"))
    return {"run": run_dir.resolve().name, "backend": final.get("backend"),
            "method": (recipe.get("peft") or {}).get("method", trainable.get("method")),
            "task": task, "metric": metric, "score": final[metric], "f1_macro": final.get("f1_macro"),
            "trainable_parameters": n_train, "total_parameters": total,
            "trainable_percent": 100.0 * n_train / total if n_train is not None and total else None,
            "train_seconds": final.get("train_seconds"), "peak_rss_mb": final.get("peak_rss_mb"),
            "steps": final.get("steps")}


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def format_rows(rows: list[dict], fmt: str = "text") -> str:
    """The rows as an aligned text table, a Markdown table or CSV (raw numbers, one header line)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_KEYS)
        writer.writerows([["" if row.get(k) is None else row[k] for k in CSV_KEYS] for row in rows])
        return buf.getvalue().rstrip("\n")
    headers = [h for _, h, _ in COLUMNS]
    cells = [[_cell(row, k, f) for k, _, f in COLUMNS] for row in rows]
    if fmt == "markdown":
        right = [i >= 4 for i in range(len(COLUMNS))]  # numbers right-aligned
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    if fmt != "text":
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
    line = lambda values: "  ".join(v.ljust(w) if i < 4 else v.rjust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    return "\n".join([line(headers)] + [line(c) for c in cells])


def report(run_dirs: list[str | Path], fmt: str = "text") -> str:
    return format_rows([run_row(d) for d in run_dirs], fmt)
