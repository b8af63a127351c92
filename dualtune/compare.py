"""``dualtune compare``: run one recipe on both backends from the same start, and judge in numbers.

Each backend runs in its own process (one framework per process). The first (reference) backend's
run initialises the adapter and saves it (adapter_init/); the second's starts from those weights. Dropout is off on both (no two frameworks share dropout masks); batches are identical by
construction (the core's dataset map).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualtune.errors import CompareError
from dualtune.rundir import write_atomic, write_json

# fp32 on CPU; see docs/parity.md.
TOLERANCES = {"init_loss_rel": 1e-5, "init_logits_abs": 1e-5, "step_loss_rel": 1e-3}
LAYER_REL_FLAG = 1e-4  # --layers: the first module whose relative difference exceeds this is named


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@dataclass
class Side:
    name: str  # the backend
    steps: list[dict]
    final: dict
    activations: dict[str, np.ndarray]
    order: list[str]


def _run(backend: str, recipe: str, overrides: list[str], out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "dualtune.cli",
        "run",
        recipe,
        "--backend",
        backend,
        "--no-progress",
        "--overwrite",
        "--output-dir",
        str(out / backend),
        *overrides,
    ]
    print(f"compare: training on {backend} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    write_atomic(out / f"{backend}.log", proc.stderr)
    if proc.returncode != 0:
        # One line: the run's own last line (its error, or the end of a traceback) and where the rest is.
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1].removeprefix("dualtune: error: ") if lines else "no output"
        raise CompareError(
            f"the {backend} run failed (exit {proc.returncode}): {last}; its log: {out / backend}.log"
        )


def _load(run_dir: Path) -> Side:
    from safetensors import safe_open

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acts: dict[str, np.ndarray] = {}
    order: list[str] = []
    path = run_dir / "activations.safetensors"
    if path.exists():
        with safe_open(str(path), "np") as f:
            order = json.loads((f.metadata() or {}).get("order", "[]")) or list(f.keys())
            acts = {k: f.get_tensor(k) for k in f.keys()}
    return Side(
        run_dir.name,
        [item for item in lines if "loss" in item],
        json.loads((run_dir / "final_metrics.json").read_text()),
        acts,
        order,
    )


def layer_table(a: Side, b: Side) -> list[dict]:
    rows = []
    for name in a.order:
        if name not in b.activations or a.activations[name].shape != b.activations[name].shape:
            continue
        x, y = a.activations[name].astype(np.float64), b.activations[name].astype(np.float64)
        diff = float(np.abs(x - y).max()) if x.size else 0.0
        rows.append({"module": name, "max_abs": diff, "rel": diff / max(float(np.abs(x).max()), 1e-12)})
    return rows


def build_report(a: Side, b: Side, layers: bool) -> dict:
    """Side ``a`` (the reference) against side ``b``: per-step losses, checks, final metrics."""
    steps = []
    for s, t in zip(a.steps, b.steps):
        steps.append(
            {
                "step": s["step"],
                f"loss_{a.name}": s["loss"],
                f"loss_{b.name}": t["loss"],
                "loss_rel": rel_diff(s["loss"], t["loss"]),
                "grad_norm_rel": rel_diff(s["grad_norm"], t["grad_norm"]),
            }
        )
    checks = {}
    if steps:
        checks["init_loss_rel"] = steps[0]["loss_rel"]
        checks["step_loss_rel"] = max(s["loss_rel"] for s in steps)
    if "logits" in a.activations and "logits" in b.activations:
        checks["init_logits_abs"] = float(np.abs(a.activations["logits"] - b.activations["logits"]).max())
    verdict = {
        k: {"value": v, "tolerance": TOLERANCES[k], "pass": bool(v <= TOLERANCES[k])}
        for k, v in checks.items()
    }
    metrics = sorted(k for k, v in a.final.items() if isinstance(v, float) and k in b.final)
    report = {
        "backends": [a.name, b.name],
        "steps": steps,
        "checks": verdict,
        "passed": bool(verdict) and len(a.steps) == len(b.steps) and all(v["pass"] for v in verdict.values()),
        "final": {
            k: {a.name: a.final[k], b.name: b.final[k]} for k in metrics if k not in ("train_seconds",)
        },
        "train_seconds": {a.name: a.final.get("train_seconds"), b.name: b.final.get("train_seconds")},
    }
    if layers:
        table = layer_table(a, b)
        report["layers"] = table
        report["first_divergent_module"] = next(
            (r["module"] for r in table if r["rel"] > LAYER_REL_FLAG), None
        )
    return report


def format_report(report: dict) -> str:
    a, b = report["backends"]
    out = [f"step  {'loss ' + a:<14}  {'loss ' + b:<14}  rel diff   grad-norm rel"]
    for s in report["steps"]:
        out.append(
            f"{s['step']:>4}  {s['loss_' + a]:<14.8g}  {s['loss_' + b]:<14.8g}  "
            f"{s['loss_rel']:.2e}   {s['grad_norm_rel']:.2e}"
        )
    out.append("")
    out.append(f"{'final metric':<28}{a:>12}{b:>12}")
    for k, v in report["final"].items():
        out.append(f"{k:<28}{v[a]:>12.6g}{v[b]:>12.6g}")
    out.append("")
    if "layers" in report:
        worst = sorted(report["layers"], key=lambda r: -r["rel"])[:10]
        out.append("layers (largest relative differences first):")
        out += [f"  {r['module']:<60} max|d|={r['max_abs']:.2e}  rel={r['rel']:.2e}" for r in worst]
        out.append(f"first module beyond {LAYER_REL_FLAG:g} relative: {report['first_divergent_module']}")
        out.append("")
    for k, v in report["checks"].items():
        out.append(
            f"{'PASS' if v['pass'] else 'FAIL'}  {k} = {v['value']:.3e}  (tolerance {v['tolerance']:g})"
        )
    out.append(f"verdict: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in report["steps"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, style in zip(report["backends"], ("-", "--")):
        ax.plot(steps, [s["loss_" + name] for s in report["steps"]], style, label=name, lw=2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("dualtune compare: " + ("PASS" if report["passed"] else "FAIL"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(recipe: str, overrides: list[str], out: Path, steps: int = 20, layers: bool = False) -> dict:
    """Run ``recipe`` on the first two backends (the reference first), the second from the first's
    initial adapter; write the report."""
    from dualtune.backend import backend_names
    from dualtune.recipe import load_recipe

    load_recipe(recipe, overrides)  # a bad recipe fails here, before two processes start
    out.mkdir(parents=True, exist_ok=True)
    common = [*overrides, "train.dropout=false", "train.dump_activations=true"]
    if steps:
        common.append(f"train.max_steps={steps}")
    reference, other = backend_names()[:2]
    _run(reference, recipe, [*common, "train.save_initial=true"], out)
    _run(other, recipe, [*common, f"peft.init_from={out / reference / 'adapter_init'}"], out)
    report = build_report(_load(out / reference), _load(out / other), layers)
    write_json(out / "report.json", report)
    write_atomic(out / "report.txt", format_report(report) + "\n")
    plot(report, out / "loss_curves.png")
    return report
