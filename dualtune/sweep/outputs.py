"""What a sweep leaves in its directory besides the trials: trials.txt and trials.csv (one row a
trial), best_recipe.yaml (the recipe with the best trial's parameters), history.png and
importances.png; and the summary lines the command prints."""

from __future__ import annotations

import csv
import io
import warnings
from typing import Any

from dualtune.errors import UserError
from dualtune.recipe import Recipe, TrainSpec, load_recipe
from dualtune.sweep.space import override
from dualtune.sweep.study import Sweep, best_trial, import_optuna


def fmt(value: Any) -> str:
    """A parameter's value in a line or table: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_rows(study, sw: Sweep) -> list[dict]:
    from dualtune.report import run_row

    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            **{k: t.params.get(k) for k in sw.space.params},
            "run_dir": t.user_attrs.get("run_dir", ""),
            "error": t.user_attrs.get("error", ""),
        }
        row["seconds"] = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        if t.state.name == "COMPLETE":
            try:
                rep = run_row(sw.out / row["run_dir"])
                row.update(
                    {
                        "main_metric": rep["metric"],
                        "score": rep["score"],
                        "f1_macro": rep["f1_macro"],
                        "train_seconds": rep["train_seconds"],
                        "steps": rep["steps"],
                    }
                )
            except UserError:
                pass
        rows.append(row)
    return rows


CSV_EXTRA = ["main_metric", "score", "f1_macro", "train_seconds", "steps"]


def write_table(rows: list[dict], sw: Sweep) -> None:
    keys = ["number", "state", "value", *sw.space.params, "run_dir", "seconds", *CSV_EXTRA, "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    writer.writerows([["" if row.get(k) is None else row[k] for k in keys] for row in rows])
    (sw.out / "trials.csv").write_text(buf.getvalue())
    headers = ["trial", "state", sw.space.metric, *sw.space.params, "run dir", "note"]
    cells = [
        [
            str(r["number"]),
            r["state"].lower(),
            "-" if r["value"] is None else f"{r['value']:.4f}",
            *("-" if r.get(k) is None else fmt(r[k]) for k in sw.space.params),
            r["run_dir"],
            r["error"],
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in [headers, *cells]]
    (sw.out / "trials.txt").write_text("\n".join(lines) + "\n")


def best_recipe(sw: Sweep, best) -> Recipe:
    """The recipe with the best trial's parameters applied, resolved; output_dir back to the default."""
    best_values = [override(k, p.value(best.params[k])) for k, p in sw.space.params.items()]
    recipe = load_recipe(sw.recipe, [*sw.overrides, *best_values])
    recipe.train.output_dir = TrainSpec.model_fields["output_dir"].default
    return recipe


def write_plots(study, sw: Sweep) -> list[str]:
    """Optimisation history and parameter importances as PNGs; notes on what was skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = import_optuna()
    from optuna.visualization import matplotlib as ovm

    notes = []
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not done:
        return ["history.png, importances.png not written: no completed trial"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ax = ovm.plot_optimization_history(study, target_name=sw.space.metric)
            fig: Any = ax.figure
            fig.savefig(sw.out / "history.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
        except Exception as err:  # noqa: BLE001 - a plot never fails a sweep
            notes.append(f"history.png not written: {str(err).splitlines()[0]}")
        if len(done) < 2:
            notes.append(f"importances.png not written: needs 2 completed trials, the study has {len(done)}")
            return notes
        if len({t.value for t in done}) == 1:
            notes.append(
                f"importances.png not written: every completed trial has {sw.space.metric} {done[0].value:.4f}"
            )
            return notes
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            ax = ovm.plot_param_importances(study, evaluator=evaluator, target_name=sw.space.metric)
            fig = ax.figure
            fig.savefig(sw.out / "importances.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
        except Exception as err:  # noqa: BLE001
            notes.append(f"importances.png not written: {str(err).splitlines()[0]}")
    return notes


def summarize(study, sw: Sweep) -> str | None:
    """trials.txt, trials.csv, best_recipe.yaml, history.png, importances.png; returns the summary."""
    rows = trial_rows(study, sw)
    write_table(rows, sw)
    notes = write_plots(study, sw)
    best = best_trial(study)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines = [
        f"sweep: {len(rows)} trial{'s' if len(rows) != 1 else ''}: "
        + ", ".join(f"{n} {'failed' if s == 'FAIL' else s.lower()}" for s, n in counts.items() if n)
    ]
    if best is not None:
        recipe = best_recipe(sw, best)
        shown = ", ".join(f"{k}={fmt(best.params[k])}" for k in sw.space.params)
        header = (
            f"# dualtune sweep {sw.study_name}: best of {len(rows)} trials, trial {best.number} "
            f"({best.user_attrs.get('run_dir', '')}), {sw.space.metric} {best.value:.6g} on {sw.backend}\n"
            f"# {shown}\n"
        )
        from dualtune.rundir import write_atomic

        write_atomic(sw.out / "best_recipe.yaml", header + recipe.to_yaml())
        lines.append(f"sweep: best trial {best.number}: {sw.space.metric}={best.value:.4f} ({shown})")
        lines.append(
            f"sweep: best recipe: {sw.out / 'best_recipe.yaml'} "
            f"(dualtune run {sw.out / 'best_recipe.yaml'} --backend {sw.backend})"
        )
    else:
        lines.append("sweep: no trial completed; no best_recipe.yaml")
    lines += [f"sweep: {n}" for n in notes]
    lines.append(f"sweep: table: {sw.out / 'trials.txt'}, {sw.out / 'trials.csv'}")
    return "\n".join(lines)
