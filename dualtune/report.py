"""``dualtune report``: finished runs side by side, one row each, from the files the run directory
holds (final_metrics.json, trainable.json, recipe.yaml). Reads JSON and YAML only: no backend, no
framework, so it answers at once."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import yaml

from dualtune.errors import RunDirError
from dualtune.rundir import read_marker, run_status

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
    ("peak_device_memory_mb", "device MB", "{:.0f}"),
    ("steps", "steps", "{}"),
]

CSV_KEYS = [
    "run",
    "backend",
    "method",
    "task",
    "metric",
    "score",
    "f1_macro",
    "trainable_parameters",
    "total_parameters",
    "trainable_percent",
    "train_seconds",
    "peak_rss_mb",
    "peak_device_memory_mb",
    "precision",
    "steps",
]


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


def main_metric(task: str | None, final: dict) -> str:
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
        raise RunDirError(f"{run_dir}: an unfinished run ({run_status(marker)}); report reads finished runs")
    final = _read(run_dir / "final_metrics.json", json.loads)
    trainable = _read(run_dir / "trainable.json", json.loads)
    recipe = _read(run_dir / "recipe.yaml", yaml.safe_load)
    task = (recipe.get("model") or {}).get("task")
    metric = main_metric(task, final)
    if metric not in final:
        raise RunDirError(f"{run_dir / 'final_metrics.json'}: no {metric}")
    n_train = trainable.get("trainable", final.get("trainable_parameters"))
    total = trainable.get("total", final.get("total_parameters"))
    return {
        "run": run_dir.resolve().name,
        "backend": final.get("backend"),
        "method": (recipe.get("peft") or {}).get("method", trainable.get("method")),
        "task": task,
        "metric": metric,
        "score": final[metric],
        "f1_macro": final.get("f1_macro"),
        "trainable_parameters": n_train,
        "total_parameters": total,
        "trainable_percent": 100.0 * n_train / total if n_train is not None and total else None,
        "train_seconds": final.get("train_seconds"),
        "peak_rss_mb": final.get("peak_rss_mb"),
        "peak_device_memory_mb": final.get("peak_device_memory_mb"),
        "precision": final.get("precision"),
        "steps": final.get("steps"),
    }


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
        lines = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---:" if r else "---" for r in right) + "|",
        ]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    if fmt != "text":
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
    line = lambda values: "  ".join(
        v.ljust(w) if i < 4 else v.rjust(w)  # noqa: E731
        for i, (v, w) in enumerate(zip(values, widths))
    ).rstrip()
    return "\n".join([line(headers)] + [line(c) for c in cells])


def report(run_dirs: list[str | Path], fmt: str = "text") -> str:
    return format_rows([run_row(d) for d in run_dirs], fmt)


def finished_runs(run_dirs: list[str | Path]) -> tuple[list[str | Path], list[str]]:
    """The finished runs among ``run_dirs`` (in order), and one line for each of the others (a glob
    over runs/ may catch one still running, failed or foreign): a report of the rest goes on."""
    kept: list[str | Path] = []
    skipped: list[str] = []
    for d in run_dirs:
        try:
            run_row(d)
        except RunDirError as err:
            skipped.append(str(err))
        else:
            kept.append(Path(d))
    return kept, skipped


def curves(run_dir: str | Path) -> dict:
    """A run's curves from its metrics.jsonl: train loss per step, eval loss and the judged metric
    (train.best_metric, else the task's main metric) at each evaluation, the selected step."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no metrics.jsonl (not a run directory)")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as err:
        raise RunDirError(f"{path}: unreadable ({err})") from None
    recipe = (
        yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").is_file() else {}
    )
    evals = [r for r in records if r.get("split") == "eval"]
    train = [r for r in records if "split" not in r and "loss" in r]
    metric = ((recipe or {}).get("train") or {}).get("best_metric") or main_metric(
        ((recipe or {}).get("model") or {}).get("task"), evals[-1] if evals else {}
    )
    final_path = run_dir / "final_metrics.json"
    final = json.loads(final_path.read_text()) if final_path.is_file() else {}
    return {
        "train_steps": [r["step"] for r in train],
        "train_loss": [r["loss"] for r in train],
        "eval_steps": [r["step"] for r in evals],
        "eval_loss": [r.get("eval_loss") for r in evals],
        "metric": metric,
        "metric_values": [r.get(metric) for r in evals],
        "selected_step": final.get("selected_step") if final.get("best_metric") else None,
    }


def plot_curves(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """One PNG: left, train loss per step (line) and eval loss at each evaluation (dashed, dots) of
    every run; right, the judged metric at each evaluation (a ring marks a best_metric run's selected
    step). Matplotlib's Agg canvas, no pyplot: safe in any process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [curves(d) for d in run_dirs]
    labels = labels or [Path(d).resolve().name for d in run_dirs]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    for i, (c, label) in enumerate(zip(runs, labels)):
        color = f"C{i % 10}"
        loss_ax.plot(c["train_steps"], c["train_loss"], color=color, lw=1.5, label=f"{label} train")
        steps = [s for s, v in zip(c["eval_steps"], c["eval_loss"]) if v is not None]
        if steps:
            loss_ax.plot(
                steps,
                [v for v in c["eval_loss"] if v is not None],
                "o--",
                color=color,
                ms=4,
                label=f"{label} eval",
            )
        points = [(s, v) for s, v in zip(c["eval_steps"], c["metric_values"]) if v is not None]
        if points:
            metric_ax.plot(*zip(*points), "o-", color=color, ms=4, label=f"{label} ({c['metric']})")
            chosen = [(s, v) for s, v in points if s == c["selected_step"]]
            if chosen:
                metric_ax.plot([chosen[-1][0]], [chosen[-1][1]], "o", ms=11, mfc="none", color=color)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("train loss (line), eval loss (dots)")
    metric_ax.set_xlabel("step")
    metric_ax.set_ylabel(" / ".join(dict.fromkeys(c["metric"] for c in runs)))
    metric_ax.set_title("metric at each evaluation")
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, out)  # never a half-written PNG
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- published numbers (--anchors)


def _table(headers: list[str], cells: list[list[str]], fmt: str, numbers_from: int) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([headers, *cells])
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        rule = "|" + "|".join("---:" if i >= numbers_from else "---" for i in range(len(headers))) + "|"
        return "\n".join(
            ["| " + " | ".join(r) + " |" for r in [headers]]
            + [rule]
            + ["| " + " | ".join(r) + " |" for r in cells]
        )
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
    line = lambda values: "  ".join(  # noqa: E731
        v.ljust(w) if i < numbers_from else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
    ).rstrip()
    return "\n".join(line(r) for r in [headers, *cells])


def anchor_report(run_dirs: list[str | Path], dataset: str | None = None, fmt: str = "text") -> str:
    """Each run's numbers beside the published ones for its data set (``dualtune.anchors``): one
    table per data set, a column per run (its value of each anchor's metric, and its eval rows).
    ``dataset`` names the data set for every run; None finds it from each run's recipe."""
    from dualtune.anchors import DATASETS, anchors_for, dataset_of

    groups: dict[str, list[tuple[str, dict, int | None]]] = {}
    if dataset is not None:
        anchors_for(dataset)  # an unknown name is refused before any run is read
    for d in run_dirs:
        run_dir = Path(d)
        run_row(run_dir)  # a finished run, or one clear line
        recipe = _read(run_dir / "recipe.yaml", yaml.safe_load)
        final = _read(run_dir / "final_metrics.json", json.loads)
        key = dataset or dataset_of(recipe.get("data") or {})
        if key is None:
            continue
        report_file = run_dir / "classification_report.json"
        n_eval = _read(report_file, json.loads).get("n") if report_file.is_file() else None
        groups.setdefault(key, []).append((run_dir.resolve().name, final, n_eval))
    if not groups:
        raise RunDirError(
            f"no run reads a data set with published numbers (known: {', '.join(DATASETS)}); "
            f"name its data set with --anchors DATASET"
        )
    out = []
    for key, runs in groups.items():
        headers = ["source", "model", "method", "protocol", "metric", "published"] + [
            f"{name} ({n} eval rows)" if n else name for name, _, n in runs
        ]
        cells = []
        for a in anchors_for(key):
            values = [final.get(a.metric) for _, final, _ in runs]
            cells.append(
                [a.source, a.model, a.method, a.split, a.metric, f"{a.value:.4f}"]
                + ["-" if v is None else f"{v:.4f}" for v in values]
            )
        title = f"published numbers: {DATASETS[key]}"
        out.append((title + "\n" if fmt != "csv" else "") + _table(headers, cells, fmt, numbers_from=5))
    return "\n\n".join(out)
