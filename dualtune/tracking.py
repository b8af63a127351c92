"""Experiment trackers (``train.report_to``): TensorBoard, MLflow and Weights & Biases, each through
its own library, in the training process of either backend.

What each gets: per-step loss, learning rate and gradient norm (the steps metrics.jsonl has); each
evaluation's metrics (the in-loop ones and the final one, as metrics.jsonl has them); the final
metrics (``final/...``); the resolved recipe (MLflow params, W&B config, TensorBoard text); the run's
backend, device and package versions; the confusion matrix and the loss curve as images; MLflow also
the adapter and the run's JSON files as artifacts.

Where it goes, by default offline and beside the run:

- tensorboard: event files in ``RUN_DIR/tensorboard/`` (tensorboardX: it needs no torch, so it never
  loads real torch into a MindSpore process, as ``torch.utils.tensorboard`` would).
- mlflow: ``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///PARENT/mlflow.db`` with artifacts in
  ``PARENT/mlartifacts/``, PARENT being the run directory's parent (MLflow records absolute artifact
  paths, and the run directory is written aside and renamed at the end; MLflow 3 refuses its old
  ``./mlruns`` file store). Runs of one recipe on both backends share an experiment.
- wandb: offline unless ``WANDB_MODE`` is set (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads
  later); files in ``RUN_DIR/wandb/`` unless ``WANDB_DIR`` is set.

No tracker library is imported until a run asks for it; ``check_trackers`` only looks them up.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from dualtune import __version__
from dualtune.callbacks import Callback, LoopState
from dualtune.errors import RecipeError

log = logging.getLogger("dualtune")

TRACKERS = ("tensorboard", "mlflow", "wandb")
MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
IMAGES = ("confusion_matrix.png", "loss_curve.png")
ARTIFACTS = (
    "recipe.yaml",
    "final_metrics.json",
    "classification_report.json",
    "metrics.jsonl",
    "trainable.json",
)
MLFLOW_PARAM_MAX = 6000  # MLflow 3's longest param value


def check_trackers(recipe: Any) -> None:
    """One line if a tracker in ``train.report_to`` is not installed (before any framework loads)."""
    missing = [name for name in recipe.train.report_to if importlib.util.find_spec(MODULES[name]) is None]
    if missing:
        mods = " and ".join(MODULES[m] for m in missing)
        raise RecipeError(
            f"train.report_to {', '.join(missing)}: {mods} is not installed; "
            f"pip install 'dualtune[tracking]' (or remove it from train.report_to)"
        )


def versions(backend_name: str) -> dict[str, str]:
    """Python, dualtune and the backend's packages, from their installed metadata (nothing imported)."""
    out = {"python": platform.python_version(), "dualtune": __version__}
    from dualtune.backend import framework

    for pkg in framework(backend_name).packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _numbers(record: dict, skip: tuple[str, ...] = ("step", "epoch", "split")) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    }


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _png_array(path: Path):
    """A PNG as an RGB uint8 array (height, width, 3)."""
    import numpy as np
    from matplotlib import image

    img = image.imread(str(path))
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return img[..., :3] if img.ndim == 3 else np.stack([img] * 3, axis=-1)


class RunInfo:
    """What every tracker is told at the start: names, the resolved recipe, backend and versions."""

    def __init__(self, recipe: Any, run_path: Path, target: Path, backend_name: str, device: str):
        import yaml

        self.run_path, self.target = Path(run_path), Path(target)
        self.recipe_yaml = (
            (self.run_path / "recipe.yaml").read_text()
            if (self.run_path / "recipe.yaml").is_file()
            else recipe.to_yaml()
        )
        self.recipe = yaml.safe_load(self.recipe_yaml)
        self.project = recipe.train.tracking_project or recipe.name or "dualtune"
        self.run_name = self.target.name
        self.environment = {
            "backend": backend_name,
            "device": device,
            "run_dir": str(self.target.resolve()),
            "versions": versions(backend_name),
        }


class Tracker:
    """One tracker library. ``start`` at the loop's first step (``step``: where it starts: >0 on resume)."""

    name = ""

    def start(self, info: RunInfo, step: int) -> None: ...

    def log_step(self, step: int, values: dict[str, float]) -> None: ...

    def log_eval(self, step: int, values: dict[str, float]) -> None: ...

    def log_final(self, step: int, values: dict[str, float], run_dir: Path) -> None:
        """Final metrics, images and artifacts from the finished run directory."""

    def close(self, failed: bool) -> None: ...


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, info, step):
        from tensorboardX import SummaryWriter

        self.logdir = info.run_path / "tensorboard"
        # purge_step: a resumed run drops what the interrupted one logged after its checkpoint.
        self.writer = SummaryWriter(
            logdir=str(self.logdir), purge_step=step + 1 if step else None, flush_secs=30
        )
        self.writer.add_text("recipe", "```\n" + info.recipe_yaml + "```", step)
        self.writer.add_text("run", "```\n" + json.dumps(info.environment, indent=2) + "\n```", step)
        log.info("tensorboard: %s (tensorboard --logdir %s)", self.logdir, info.target / "tensorboard")

    def _scalars(self, prefix, step, values):
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def log_step(self, step, values):
        self._scalars("train", step, values)

    def log_eval(self, step, values):
        self._scalars("eval", step, values)

    def log_final(self, step, values, run_dir):
        self._scalars("final", step, values)
        for name in IMAGES:
            if (run_dir / name).is_file():
                self.writer.add_image(name[:-4], _png_array(run_dir / name), step, dataformats="HWC")

    def close(self, failed):
        self.writer.close()


class MlflowTracker(Tracker):
    name = "mlflow"

    def start(self, info, step):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:  # beside the run directory: see the module's docstring
            store = info.target.resolve().parent
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
            artifacts = (store / "mlartifacts").as_uri()
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(info.project)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(
                info.project, artifact_location=artifacts and f"{artifacts}/{info.project}"
            )
        )
        env = info.environment
        tags = {
            "dualtune.backend": env["backend"],
            "dualtune.device": env["device"],
            "dualtune.run_dir": env["run_dir"],
            "dualtune.resumed_at_step": str(step),
            **{f"version.{k}": v for k, v in env["versions"].items()},
        }
        self.run_id = self.client.create_run(exp_id, run_name=info.run_name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in _flat(info.recipe).items()]
        params += [Param("run.backend", env["backend"]), Param("run.device", env["device"])]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, info.recipe_yaml, "recipe.yaml")
        log.info("mlflow: run %s in experiment %r at %s", self.run_id, info.project, uri)

    def _metrics(self, prefix, step, values):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(f"{prefix}/{k}", v, now, step) for k, v in values.items()]
        )

    def log_step(self, step, values):
        self._metrics("train", step, values)

    def log_eval(self, step, values):
        self._metrics("eval", step, values)

    def log_final(self, step, values, run_dir):
        self._metrics("final", step, values)
        for name in (*IMAGES, *ARTIFACTS):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "adapter"), "adapter")

    def close(self, failed):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker(Tracker):
    name = "wandb"

    def start(self, info, step):
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"  # the user's choice, else no network needed
        where = os.environ.get("WANDB_DIR") or str(info.run_path)
        self.run = wandb.init(
            project=info.project,
            name=info.run_name,
            dir=where,
            mode=mode,
            config={**info.recipe, "run": info.environment},
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        files = Path(self.run.dir).parent  # .../wandb/offline-run-*: under the partial run directory
        if not os.environ.get("WANDB_DIR") and files.resolve().is_relative_to(info.run_path.resolve()):
            files = info.target / files.resolve().relative_to(
                info.run_path.resolve()
            )  # after the run's rename
        log.info(
            "wandb: run %s (%s) in %s%s",
            self.run.id,
            mode,
            files,
            f" (upload: wandb sync {files})" if mode == "offline" else "",
        )

    def log_step(self, step, values):
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_eval(self, step, values):
        self.run.log({f"eval/{k}": v for k, v in values.items()}, step=step)

    def log_final(self, step, values, run_dir):
        import wandb

        self.run.summary.update({f"final/{k}": v for k, v in values.items()})
        images = {
            name[:-4]: wandb.Image(str(run_dir / name)) for name in IMAGES if (run_dir / name).is_file()
        }
        if images:
            self.run.log(images, step=step)

    def close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Tracking(Callback):
    """The trackers of ``train.report_to`` as one loop callback; the runner adds the final evaluation
    (``log_eval``), then ``finish`` with the final metrics once the run directory's files are written,
    or ``close(failed=True)``. With no trackers every call does nothing."""

    def __init__(self, recipe: Any, run_path: str | Path, target: str | Path, backend_name: str, device: str):
        self.recipe, self.run_path, self.target = recipe, Path(run_path), Path(target)
        self.backend_name, self.device = backend_name, device
        self.log_every = recipe.train.log_every
        self.trackers: list[Tracker] = [CLASSES[name]() for name in recipe.train.report_to]
        self.started: list[Tracker] = []
        self.step = 0

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, step: int = 0) -> None:
        """Open every tracker (``step``: the step the loop starts after; >0 on resume). The runner calls
        it before the loop's clock starts (MLflow's first use creates its database: seconds)."""
        if not self.trackers or self.started:
            return
        info = RunInfo(self.recipe, self.run_path, self.target, self.backend_name, self.device)
        self.step = step
        for tracker in self.trackers:
            tracker.start(info, step)
            self.started.append(tracker)

    def on_train_begin(self, state: LoopState) -> None:
        self.start(state.step)  # when not started yet (a library user's own loop)

    def on_step_end(self, state: LoopState, record: dict) -> None:
        self.step = record["step"]
        if record["step"] % self.log_every == 0:  # the steps metrics.jsonl has
            values = _numbers(record)
            for tracker in self.started:
                tracker.log_step(record["step"], values)

    def on_evaluate(self, state: LoopState, record: dict) -> None:
        self.log_eval(record)

    def log_eval(self, record: dict) -> None:
        values = _numbers(record)
        for tracker in self.started:
            tracker.log_eval(record["step"], values)

    def finish(self, final: dict, run_dir: str | Path) -> None:
        values = {k: v for k, v in _numbers(final).items() if math.isfinite(v)}
        try:
            for tracker in self.started:
                tracker.log_final(final.get("steps", self.step), values, Path(run_dir))
        except BaseException:
            self.close(failed=True)
            raise
        self.close(failed=False)

    def close(self, failed: bool = False) -> None:
        """End every started tracker (each even if another fails); safe to call twice."""
        errors = []
        while self.started:
            tracker = self.started.pop(0)
            try:
                tracker.close(failed)
            except Exception as err:  # noqa: BLE001 - the others must still close
                errors.append(f"{tracker.name}: {err}")
        if errors:
            log.warning("closing trackers: %s", "; ".join(errors))


__all__ = ["TRACKERS", "Tracking", "check_trackers", "versions"]
