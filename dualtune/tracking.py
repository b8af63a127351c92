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
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from dualtune.callbacks import Callback, LoopState
from dualtune.environment import versions
from dualtune.errors import RecipeError, TrackerError

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


PROBE_TIMEOUT_S = 5  # validate's probe of a tracker server, and MLflow's request timeout in a run


def mlflow_uri(target: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store beside the run directory ``target`` (made)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(target).resolve().parent
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _reachable(url: str) -> str | None:
    """None when a TCP connection to ``url``'s host and port opens within the probe's timeout,
    else why not (one phrase)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return f"{url} names no host"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except TimeoutError:
        return f"{host}:{port} did not answer within {PROBE_TIMEOUT_S} s"
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"


def probe_trackers(recipe: Any) -> None:
    """One line, before training, when a tracker of ``train.report_to`` has a server that cannot be
    reached (MLflow at an http(s) ``$MLFLOW_TRACKING_URI``; W&B online) or W&B online has no API key.
    Offline trackers (the defaults) need nothing."""
    report_to = recipe.train.report_to
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in report_to and uri.startswith(("http://", "https://")):
        why = _reachable(uri)
        if why:
            raise TrackerError(
                f"train.report_to mlflow: MLFLOW_TRACKING_URI {uri} cannot be reached ({why}); "
                "start the server, unset MLFLOW_TRACKING_URI (a store beside the run), or drop mlflow"
            )
    mode = os.environ.get("WANDB_MODE") or "offline"
    if "wandb" in report_to and mode not in ("offline", "disabled", "dryrun"):
        netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
        has_key = bool(os.environ.get("WANDB_API_KEY")) or (
            netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
        )
        if not has_key:
            raise TrackerError(
                f"train.report_to wandb: WANDB_MODE={mode} but no API key (WANDB_API_KEY or wandb "
                "login); unset WANDB_MODE to log offline"
            )
        base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        why = _reachable(base)
        if why:
            raise TrackerError(
                f"train.report_to wandb: {base} cannot be reached ({why}); unset WANDB_MODE to log offline"
            )


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
    """One tracker library. ``start`` at the loop's first step (``step``: where it starts: >0 on
    resume; ``previous``: what ``state`` returned in the interrupted run, to continue its own run)."""

    name = ""

    def start(self, info: RunInfo, step: int, previous: dict | None = None) -> None: ...

    def state(self) -> dict | None:
        """What a resumed run needs to continue this tracker's run (its id), or None."""
        return None

    def log_step(self, step: int, values: dict[str, float]) -> None: ...

    def log_eval(self, step: int, values: dict[str, float]) -> None: ...

    def log_final(self, step: int, values: dict[str, float], run_dir: Path) -> None:
        """Final metrics, images and artifacts from the finished run directory."""

    def flush(self) -> None:
        """What was logged is on disk or sent (after each checkpoint's records: a kill loses none)."""

    def close(self, failed: bool) -> None: ...


class TensorBoardTracker(Tracker):
    """Event files in RUN_DIR/tensorboard. tensorboardX writes from a queue in a thread and its
    ``flush`` does not wait for the queue, so each batch of records (a checkpoint's) goes to an event
    file of its own that is closed after it: what was sent is on disk when the checkpoint stands."""

    name = "tensorboard"

    def start(self, info, step, previous=None):
        self.logdir = info.run_path / "tensorboard"
        # purge_step: a resumed run drops what the interrupted one logged after its checkpoint.
        self.purge_step = step + 1 if step else None
        self.files = 0
        self.writer: Any = None
        self._writer().add_text("recipe", "```\n" + info.recipe_yaml + "```", step)
        self.writer.add_text("run", "```\n" + json.dumps(info.environment, indent=2) + "\n```", step)
        log.info("tensorboard: %s (tensorboard --logdir %s)", self.logdir, info.target / "tensorboard")

    def _writer(self) -> Any:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.files += 1  # names sort in writing order: time, then pid and count
            self.writer = SummaryWriter(
                logdir=str(self.logdir),
                purge_step=self.purge_step,
                flush_secs=30,
                filename_suffix=f".{os.getpid()}.{self.files:06d}",
            )
            self.purge_step = None  # once, in the resumed process's first file
        return self.writer

    def _scalars(self, prefix, step, values):
        writer = self._writer()
        for k, v in values.items():
            writer.add_scalar(f"{prefix}/{k}", v, step)

    def log_step(self, step, values):
        self._scalars("train", step, values)

    def log_eval(self, step, values):
        self._scalars("eval", step, values)

    def log_final(self, step, values, run_dir):
        self._scalars("final", step, values)
        for name in IMAGES:
            if (run_dir / name).is_file():
                self._writer().add_image(name[:-4], _png_array(run_dir / name), step, dataformats="HWC")

    def flush(self):
        if self.writer is not None:
            self.writer.close()  # waits for its queue
            self.writer = None

    def close(self, failed):
        self.flush()


class MlflowTracker(Tracker):
    name = "mlflow"

    def start(self, info, step, previous=None):
        # A server that does not answer: a bounded wait, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(PROBE_TIMEOUT_S))
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(info.target)
        self.client = MlflowClient(uri)
        env = info.environment
        if previous and previous.get("run_id") and self._continue(previous["run_id"], step):
            log.info("mlflow: continuing run %s from step %d at %s", self.run_id, step, uri)
            return
        exp = self.client.get_experiment_by_name(info.project)
        artifacts = (
            None
            if os.environ.get("MLFLOW_TRACKING_URI")
            else (info.target.resolve().parent / "mlartifacts").as_uri()
        )
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(
                info.project, artifact_location=artifacts and f"{artifacts}/{info.project}"
            )
        )
        tags = {
            "dualtune.backend": env["backend"],
            "dualtune.device": env["device"],
            "dualtune.run_dir": env["run_dir"],
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

    def _continue(self, run_id: str, step: int) -> bool:
        """Reopen the interrupted run's own MLflow run (params stay as first logged: MLflow keeps
        them immutable; a changed key is a tag with its step); False when this store lacks it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            log.warning(
                "mlflow: the interrupted run's MLflow run %s is not in this store; starting a new one", run_id
            )
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, f"dualtune.resumed_at_step_{step}", "true")
        return True

    def state(self):
        return {"run_id": self.run_id}

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

    def start(self, info, step, previous=None):
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"  # the user's choice, else no network needed
        where = os.environ.get("WANDB_DIR") or str(info.run_path)
        # a resume continues the interrupted run's own W&B run (offline: wandb sync merges the two)
        again = {"id": previous["id"], "resume": "allow"} if previous and previous.get("id") else {}
        self.run = wandb.init(
            project=info.project,
            name=info.run_name,
            dir=where,
            mode=mode,
            config={**info.recipe, "run": info.environment},
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
            **again,
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

    def state(self):
        return {"id": self.run.id}

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
    or ``close(failed=True)``. With no trackers every call does nothing.

    The trackers get the steps and evaluations a checkpoint has kept: records wait until the next
    checkpoint is written (``on_checkpoint``; each evaluation and every ``train.save_every`` steps)
    or the run ends. So a run killed and resumed sends each step once, and a resumed run continues
    its own tracker runs (their ids are this callback's state in every checkpoint): its history is
    metrics.jsonl's. A tracker that fails is dropped with one warning, or stops the run with
    ``train.report_to_strict``."""

    def __init__(self, recipe: Any, run_path: str | Path, target: str | Path, backend_name: str, device: str):
        self.recipe, self.run_path, self.target = recipe, Path(run_path), Path(target)
        self.backend_name, self.device = backend_name, device
        self.log_every = recipe.train.log_every
        self.strict = recipe.train.report_to_strict
        self.trackers: list[Tracker] = [CLASSES[name]() for name in recipe.train.report_to]
        self.started: list[Tracker] = []
        self.pending: list[tuple[str, int, dict[str, float]]] = []  # (kind, step, values) not yet sent
        self.previous: dict[str, dict] = {}
        self.step = 0

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def state_dict(self) -> dict | None:
        if not self.started:
            return None
        states = {t.name: t.state() for t in self.started}
        return {name: state for name, state in states.items() if state is not None}

    def load_state_dict(self, state: dict) -> None:
        self.previous = dict(state)

    def _guard(self, tracker: Tracker, what: str, call: Callable[[], None]) -> bool:
        """``call`` for ``tracker``; a failure drops it with one warning, or stops the run (strict)."""
        try:
            call()
            return True
        except Exception as err:  # noqa: BLE001 - any tracker library's failure, network included
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            if self.strict:
                raise TrackerError(
                    f"{tracker.name}: {what} failed: {first} (train.report_to_strict=true stops the run; "
                    "its checkpoints are kept: --resume continues it)"
                ) from err
            log.warning(
                "%s: %s failed: %s; the run goes on without it (metrics.jsonl has everything; "
                "train.report_to_strict=true stops instead)",
                tracker.name,
                what,
                first,
            )
            if tracker in self.started:
                self.started.remove(tracker)
            return False

    def start(self, step: int = 0) -> None:
        """Open every tracker (``step``: the step the loop starts after; >0 on resume)."""
        if not self.trackers or self.started:
            return
        info = RunInfo(self.recipe, self.run_path, self.target, self.backend_name, self.device)
        self.step = step
        for tracker in self.trackers:
            if self._guard(
                tracker, "start", partial(tracker.start, info, step, self.previous.get(tracker.name))
            ):
                self.started.append(tracker)

    def on_train_begin(self, state: LoopState) -> None:
        self.start(state.step)

    def on_step_end(self, state: LoopState, record: dict) -> None:
        self.step = record["step"]
        if self.started and record["step"] % self.log_every == 0:  # the steps metrics.jsonl has
            self.pending.append(("train", record["step"], _numbers(record)))

    def on_evaluate(self, state: LoopState, record: dict) -> None:
        self.log_eval(record)

    def on_checkpoint(self, state: LoopState, path: Path) -> None:
        self.flush()

    def log_eval(self, record: dict) -> None:
        if self.started:
            self.pending.append(("eval", record["step"], _numbers(record)))

    def flush(self) -> None:
        """Send what is pending to every tracker."""
        pending, self.pending = self.pending, []
        for tracker in list(self.started):

            def send(t: Tracker = tracker) -> None:
                for kind, step, values in pending:
                    (t.log_step if kind == "train" else t.log_eval)(step, values)
                t.flush()

            self._guard(tracker, "logging", send)

    def finish(self, final: dict, run_dir: str | Path) -> None:
        values = {k: v for k, v in _numbers(final).items() if math.isfinite(v)}
        try:
            self.flush()
            for tracker in list(self.started):
                self._guard(
                    tracker,
                    "the final metrics and files",
                    partial(tracker.log_final, final.get("steps", self.step), values, Path(run_dir)),
                )
        except BaseException:
            self.close(failed=True)
            raise
        self.close(failed=False)

    def close(self, failed: bool = False) -> None:
        """End every started tracker (each even if another fails); safe to call twice. A failed
        run's last records are sent first (the steps that diverged are what one looks for)."""
        if failed and self.started and self.pending:
            try:
                self.flush()
            except TrackerError:
                pass  # strict: the run is failing already
        errors = []
        while self.started:
            tracker = self.started.pop(0)
            try:
                tracker.close(failed)
            except Exception as err:  # noqa: BLE001 - the others must still close
                errors.append(f"{tracker.name}: {err}")
        if errors:
            log.warning("closing trackers: %s", "; ".join(errors))


__all__ = ["TRACKERS", "Tracking", "check_trackers", "probe_trackers", "versions"]
