"""``dualtune export``: a finished run's model in a form that needs neither dualtune nor peft, the
adapter merged into a plain Hugging Face folder (``merged``) or an ONNX graph (``onnx``).

Framework-free: the backend merges, writes and loads the artefact back. Here: the refusals (all
before a framework loads), the output folders, the verification (the run's eval rows through the
exported artefact, compared with the run's own predictions in numpy) and ``export.json``. Each format
is written into a hidden sibling folder and renamed into place only once it has passed its check.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualtune import data as datamap
from dualtune.backend import Backend, backend_names, framework, frameworks
from dualtune.environment import versions
from dualtune.errors import ExportError, RunDirError
from dualtune.evaluation import decode, eval_mode
from dualtune.predict import label_names
from dualtune.recipe import Recipe, load_recipe
from dualtune.rundir import check_new_folder, replace_folder, write_json

FORMATS = ("merged", "onnx")
# The largest |exported - run| logit difference an export may show. Both are float32 reruns of the
# same arithmetic in another order (merged weights, another batch's padding; ONNX Runtime's kernels).
TOLERANCE = {"merged": 1e-4, "onnx": 1e-4}
EXPORT_JSON = "export.json"
# Prompt learning adds trained inputs at every forward; no weight of the model can hold them.
PROMPT_LEARNING = {
    "prefix": "its trained key/value prefixes are extra inputs to every attention layer",
    "prompt": "its trained virtual tokens are extra inputs before the text",
    "p_tuning": "its prompt encoder's virtual tokens are extra inputs before the text",
}
# What ONNX export needs beyond the backend: the export extra.
ONNX_PACKAGES = ("onnx", "onnxruntime")


@dataclass
class ExportPlan:
    """What ``dualtune export`` will do, decided from files alone: the run, its recipe, and each
    format's output folder (checked: free, or dualtune's own export with ``overwrite``)."""

    run_dir: Path
    recipe: Recipe
    targets: dict[str, Path]  # format -> its folder


@dataclass
class Verification:
    """The exported artefact against the run's own predictions, row by row."""

    rows: int
    labels_differing: int
    max_abs_logit_diff: float
    tolerance: float
    reference: str  # what the artefact was compared with

    @property
    def passed(self) -> bool:
        return self.labels_differing == 0 and self.max_abs_logit_diff <= self.tolerance

    def summary(self) -> str:
        labels = "labels identical" if not self.labels_differing else f"{self.labels_differing} labels differ"
        relation = "<=" if self.max_abs_logit_diff <= self.tolerance else ">"
        return (
            f"{self.rows} rows verified, {labels}, max |logit diff| {self.max_abs_logit_diff:.2e} "
            f"{relation} tolerance {self.tolerance:.0e}"
        )

    def record(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "rows": self.rows,
            "labels_identical": self.labels_differing == 0,
            "labels_differing": self.labels_differing,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


def own_names(folder: Path) -> set[str]:
    """What an earlier export wrote in ``folder`` (its export.json lists it): all ``--overwrite`` may
    replace. A folder without a readable export.json is not dualtune's: nothing in it is."""
    try:
        record = json.loads((folder / EXPORT_JSON).read_text())
    except (OSError, ValueError):
        return set()
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list):
        return set()
    return {str(name) for name in files} | {EXPORT_JSON}


def check_method(run_dir: Path, recipe: Recipe) -> None:
    """Refuse a method whose training does not live in the model's weights."""
    method = recipe.peft.method
    if method in PROMPT_LEARNING:
        raise ExportError(
            f"{run_dir}: peft.method {method} cannot be merged into the model: {PROMPT_LEARNING[method]}, "
            "not a change to its weights; use the run's adapter/ with peft instead"
        )
    if method == "bitfit":
        try:
            added = json.loads((run_dir / "adapter" / "adapter_config.json").read_text()).get("added_biases")
        except (OSError, ValueError, AttributeError):
            added = list(recipe.peft.bitfit.add_bias_to)
        if added:
            raise ExportError(
                f"{run_dir}: peft.method bitfit added biases the model class does not have "
                f"({', '.join(added[:3])}{', ...' if len(added) > 3 else ''}): its plain folder would "
                "load without them; use the run's adapter/ instead"
            )


def plan_export(
    run_dir: str | Path,
    formats: list[str],
    backend_name: str,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> ExportPlan:
    """Every check ``dualtune export`` makes before a framework loads, as one line each: a finished
    run of a task and method that can be exported, a backend that exports, the export extra for ONNX,
    the run's predictions to verify against, and output folders that are free (``overwrite``: or hold
    only an earlier export's files)."""
    from dualtune.runner import check_finished

    run_dir = check_finished(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    formats = list(dict.fromkeys(formats))
    if not formats:
        raise ExportError(f"no format to export: give --format {' or --format '.join(FORMATS)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"--format {unknown[0]}: expected one of {', '.join(FORMATS)}")
    check_method(run_dir, recipe)
    if backend_name in backend_names():
        able = framework(backend_name).export_formats
        for fmt in formats:
            if fmt not in able:
                others = [f.name for f in frameworks() if fmt in f.export_formats]
                hint = f"; export with --backend {' or '.join(others)}" if others else ""
                raise ExportError(f"--format {fmt}: the {backend_name} backend cannot export it{hint}")
    if "onnx" in formats:
        if recipe.model.task != "classification":
            raise ExportError(
                f"--format onnx: {recipe.model.task} models are not supported yet (classification only); "
                "--format merged exports this run"
            )
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise ExportError(f"--format onnx needs {' and '.join(missing)}: pip install 'dualtune[export]'")
    if not (run_dir / "predictions.jsonl").is_file():
        raise RunDirError(f"{run_dir}: no predictions.jsonl, which an export is verified against")
    base = Path(out) if out is not None else run_dir / "export"
    targets = {fmt: base / fmt for fmt in formats}
    for path in targets.values():
        check_new_folder(path, own_names(path), overwrite)
    return ExportPlan(run_dir, recipe, targets)


def verification_batches(
    recipe: Recipe, tokenizer: Any, predictions: list[dict], names: list[str]
) -> list[dict[str, np.ndarray]]:
    """The run's eval rows (``predictions.jsonl``'s texts, in its order) tokenized and padded as the
    run's evaluation did, in its eval batch size; seq2seq batches carry the label tokens."""
    rows = datamap.Rows(
        [p["text"] for p in predictions], [names.index(p["label"]) for p in predictions], list(names)
    )
    encoded = datamap.encode(rows, tokenizer, recipe.data, recipe.model.task)
    size = recipe.train.eval_batch_size or recipe.train.batch_size
    out = []
    for start in range(0, len(encoded), size):
        index = range(start, min(start + size, len(encoded)))
        batch = datamap.collate(encoded, index, tokenizer.pad_token_id, recipe.data, recipe.model.task)
        if recipe.model.task == "classification":
            del batch["labels"]  # what a classifier's user feeds it: input_ids, attention_mask
        out.append(batch)
    return out


def teacher_forced(tokenizer: Any, logits: list[np.ndarray], batches: list[dict]) -> list[str]:
    """The label text each row's logits predict, decoded as the run's evaluation decoded it."""
    texts: list[str] = []
    for row_logits, batch in zip(logits, batches):
        labels = batch["labels"]
        texts += decode(tokenizer, np.where(labels == -100, tokenizer.pad_token_id, row_logits.argmax(-1)))
    return texts


def compare(
    got: list[np.ndarray], reference: list[np.ndarray], got_labels: list[str], run_labels: list[str]
) -> tuple[int, float]:
    """(rows whose label differs, the largest |got - reference| over every logit)."""
    differing = sum(a != b for a, b in zip(got_labels, run_labels))
    diff = max((float(np.max(np.abs(g.astype(np.float64) - r))) for g, r in zip(got, reference)), default=0.0)
    return differing, diff


def export_versions(backend_name: str, fmt: str) -> dict[str, str]:
    out = versions(backend_name)
    for package in ONNX_PACKAGES if fmt == "onnx" else ():
        out[package] = importlib.metadata.version(package)
    return out


def export_run(plan: ExportPlan, backend: Backend) -> list[dict[str, Any]]:
    """Export ``plan``'s run in each of its formats on ``backend``, each verified against the run's
    predictions before it is moved into place; their export.json records, in order. A format that
    fails its check is an ``ExportError`` and leaves nothing behind (formats before it stay)."""
    run_dir, recipe = plan.run_dir, plan.recipe
    task = recipe.model.task
    names = label_names(recipe)
    predictions = [
        json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    tokenizer = backend.load_tokenizer(recipe.model)
    model = backend.load_trained(recipe.model, names, tokenizer, recipe.peft, run_dir / "adapter")
    batches = verification_batches(recipe, tokenizer, predictions, names)
    if task == "classification":
        logits = np.asarray([p["logits"] for p in predictions], dtype=np.float64)
        sizes = np.cumsum([len(b["input_ids"]) for b in batches])[:-1]
        reference = np.split(logits, sizes)
        run_labels = [p["pred"] for p in predictions]
        source = "predictions.jsonl: the run's logits and labels"
    else:
        # predictions.jsonl holds no seq2seq logits: the run's adapter computes them here, before
        # the merge, on the same batches; the labels are the run's teacher-forced ones.
        with eval_mode(backend, model):
            reference = [backend.eval_batch(model, backend.to_tensors(b))[1] for b in batches]
        run_labels = [p["teacher_forced"] for p in predictions]
        source = "the run's adapter, teacher-forced logits; predictions.jsonl's teacher_forced labels"
    model = backend.merge_trained(model, recipe.peft)
    backend.set_training(model, False)
    records = []
    for fmt, target in plan.targets.items():
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)  # this process's own, from nothing but a reused pid
        made_parent = not target.parent.exists()  # RUN_DIR/export/: removed again if this fails
        try:
            files = backend.export(model, tokenizer, task, fmt, partial, recipe.model.name_or_path)
            run = backend.load_exported(partial, fmt, task)
            got = [run(b) for b in batches]
            if task == "classification":
                got_labels = [names[int(i)] for g in got for i in g.argmax(-1)]
            else:
                got_labels = teacher_forced(tokenizer, got, batches)
            differing, diff = compare(got, reference, got_labels, run_labels)
            check = Verification(len(predictions), differing, diff, TOLERANCE[fmt], source)
            record = {
                "format": fmt,
                "source_run": str(run_dir.resolve()),
                "base_model": recipe.model.name_or_path,
                "method": recipe.peft.method,
                "task": task,
                "labels": names,
                "backend": backend.name,
                "device": backend.device,
                "versions": export_versions(backend.name, fmt),
                "verification": check.record(),
                "files": sorted({*files, EXPORT_JSON}),
                "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            if not check.passed:
                raise ExportError(
                    f"--format {fmt} of {run_dir} failed its check ({check.summary()}); nothing written"
                )
            write_json(partial / EXPORT_JSON, record)
            replace_folder(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            if made_parent and target.parent.is_dir() and not any(target.parent.iterdir()):
                target.parent.rmdir()
            raise
        records.append({**record, "path": str(target)})
    return records
