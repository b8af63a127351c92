"""A whole run: output checks, preparation, the loop with its callbacks, checkpoints and resume,
signals, the final evaluation, and the run directory's files. Also ``evaluate_run`` (``dualtune eval``)."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualtune import __version__
from dualtune.backend import Backend
from dualtune.callbacks import Callback, EarlyStopping, LoopState, MetricsFile, Progress
from dualtune.errors import RunDirError
from dualtune.evaluation import evaluate, write_evaluation
from dualtune.metrics import better
from dualtune.prepare import Prepared, class_weights, prepare, prepare_data
from dualtune.recipe import Recipe, load_recipe
from dualtune.report import plot_curves
from dualtune.rundir import (
    RunDir,
    RunInterrupted,
    TargetLock,
    check_target,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    peak_rss_mb,
    read_marker,
    run_status,
    save_checkpoint,
    unfinished_runs,
    write_atomic,
    write_json,
)
from dualtune.signals import handling
from dualtune.tracking import Tracking, check_trackers
from dualtune.trainer import BestCheckpoint, KeepBest, Resume, total_steps, train

log = logging.getLogger("dualtune")

# What a resumed run must share with its checkpoint, or it would silently be another run. The rest
# (epochs, max_steps, eval and log cadence, optimizer, schedule) may change: more epochs extend a run.
FIXED_KEYS = (
    "model",
    "data",
    "peft",
    "loss",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.seed",
    "train.group_by_length",
    "train.dropout",
)


def output_dir(recipe: Recipe, backend_name: str, override: str | Path | None = None) -> Path:
    """The run directory: ``override``, else ``train.output_dir`` with {recipe} and {backend} filled."""
    if override is not None:
        return Path(override)
    return Path(recipe.train.output_dir.format(recipe=recipe.name or "run", backend=backend_name))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The recipe's values under FIXED_KEYS, flat (peft.init_from aside: a checkpoint replaces it)."""
    flat = _flat(recipe.model_dump(mode="json"))
    return {
        k: v
        for k, v in flat.items()
        if any(k == f or k.startswith(f + ".") for f in FIXED_KEYS) and k != "peft.init_from"
    }


def check_resumable(saved: dict[str, Any], recipe: Recipe, where: Path) -> None:
    now = fingerprint(recipe)
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise RunDirError(
                f"--resume {where}: {key} was {saved.get(key)!r} in the checkpoint, now "
                f"{now.get(key)!r}; resuming would mix two runs (start a new run instead)"
            )


def find_resume(target: Path, resume: str | Path | bool) -> Path:
    """The directory ``--resume`` continues: the one named, else the unfinished run of ``target``."""
    if resume is not True:
        path = Path(str(resume))
        if not path.is_dir() or read_marker(path) is None:
            raise RunDirError(f"--resume {path}: not a dualtune run directory")
        if latest_checkpoint(path) is None:
            raise RunDirError(f"--resume {path}: no checkpoint to resume from (set train.save_every)")
        return path
    found = [u for u in unfinished_runs(target) if u.checkpoint is not None]
    if not found and target.is_dir() and latest_checkpoint(target) is not None:
        return target  # a finished run with checkpoints: more epochs extend it
    if not found:
        raise RunDirError(
            f"--resume: no unfinished run of {target} with a checkpoint "
            f"(looked for {target.name}.failed and {target.name}.partial-*)"
        )
    return max(found, key=lambda u: u.checkpoint.stat().st_mtime if u.checkpoint else 0).path


def check_leftovers(target: Path) -> None:
    """A new run (not --resume) next to an unfinished one: refuse when that one could be resumed."""
    for u in unfinished_runs(target):
        if u.checkpoint is not None:
            raise RunDirError(
                f"{u.path}: an unfinished run of this output ({u.why}, checkpoint at step "
                f"{checkpoint_step(u.checkpoint)}); continue it with --resume, or "
                f"remove it to start over"
            )
        if u.path.name.endswith(".failed"):
            continue  # dualtune's own failed run, no checkpoint: the next failure replaces it
        log.warning("%s: left by a run that was killed (%s), with no checkpoint; remove it", u.path, u.why)


def check_output(
    recipe: Recipe,
    backend_name: str,
    override: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | bool | None = None,
) -> Path:
    """All output checks a run makes before any work; returns the target."""
    check_trackers(recipe)  # a tracker asked for but not installed: one line, before a framework loads
    target = output_dir(recipe, backend_name, override)
    TargetLock(target).check_free()
    if resume:
        source = find_resume(target, resume)
        if source.resolve() != target.resolve():
            check_target(target, overwrite or recipe.train.overwrite)
        checkpoint = latest_checkpoint(source)
        assert checkpoint is not None  # find_resume only returns directories with one
        try:  # a changed recipe is refused now, before the run directory is touched
            saved = json.loads((checkpoint / "state.json").read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None  # _resume_state reports an unreadable checkpoint
        if saved is not None:
            check_resumable(saved, recipe, checkpoint)
    else:
        check_target(target, overwrite or recipe.train.overwrite)
        check_leftovers(target)
    return target


class SignalStop(Callback):
    """SIGTERM, SIGHUP and SIGINT end the run after the current step (a second one at once). After
    the last step the run is finished instead: its final evaluation takes seconds, a resume would not."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.trained = False  # the loop is over: a signal now lets the run finish

    def handle(self, signum: int) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signum
        what = (
            "training is done; finishing the final evaluation and the run directory"
            if self.trained
            else "finishing this step, then a checkpoint"
        )
        log.warning("%s: %s (send it again to stop at once)", signal.Signals(signum).name, what)

    def on_step_begin(self, state: LoopState) -> None:
        self._check(state)

    def on_step_end(self, state: LoopState, record: dict) -> None:
        self._check(state)

    def on_train_end(self, state: LoopState, records: list[dict]) -> None:
        self.trained = True

    def _check(self, state: LoopState) -> None:
        if self.received is not None:
            state.stop = True


class Checkpointer(Callback):
    """Checkpoints every ``save_every`` steps, at each evaluation, and when a signal stops the run."""

    def __init__(
        self,
        backend: Backend,
        prep: Prepared,
        run: RunDir,
        signals: SignalStop,
        best: BestCheckpoint | None,
        first_loss: list[float],
    ):
        self.backend, self.prep, self.run, self.signals, self.best = backend, prep, run, signals, best
        self.first_loss = first_loss
        self.every = prep.recipe.train.save_every
        self.due = False
        self.last_step = -1
        self.last_path: Path | None = None

    def on_step_end(self, state, record):
        if not self.first_loss:
            self.first_loss.append(record["loss"])
        if self.every and state.step % self.every == 0:
            self.due = True

    def on_evaluate(self, state, record):
        self.due = True
        # The adapter as of this evaluation (the best one with best_metric): a run that fails later keeps it.
        if self.best is None or self.best.step == record["step"]:
            self.backend.save(self.prep.model, self.run.path / "adapter", self.prep.recipe.peft)

    def on_step_begin(self, state):
        if self.due:
            self.write(state)

    def on_train_end(self, state, records):
        if self.due or self.signals.received is not None:
            self.write(state)

    def write(self, state: LoopState) -> None:
        self.due = False
        if state.step == self.last_step or state.step == 0:
            return
        b, r = self.backend, self.prep.recipe
        names = list(self.prep.trainable)
        opt = b.optimizer_state(state.optimizer)
        tensors = {
            "trainable": b.trainable_state(self.prep.model),
            "optimizer": {
                **{f"exp_avg/{n}": a for n, a in zip(names, opt["exp_avg"])},
                **{f"exp_avg_sq/{n}": a for n, a in zip(names, opt["exp_avg_sq"])},
            },
            "rng": b.rng_state(),
        }
        best = None
        if self.best is not None and self.best.state is not None:
            tensors["best"] = self.best.state
            best = {"metric": self.best.metric, "value": self.best.value, "step": self.best.step}
        info = {
            "format": "dualtune-checkpoint-1",
            "dualtune": __version__,
            "backend": b.name,
            "step": state.step,
            "epoch": state.epoch,
            "position": state.position,
            "total_steps": state.total_steps,
            "optimizer_step": int(opt["step"]),
            "first_loss": self.first_loss[0] if self.first_loss else None,
            "best": best,
            "last_eval": state.last_eval,
            "fingerprint": fingerprint(r),
        }
        protect = self.best.step if self.best is not None else None
        self.last_path = save_checkpoint(
            self.run.path, state.step, tensors, info, r.train.keep_checkpoints, protect
        )
        self.last_step = state.step
        self.run.mark("running", step=state.step)
        log.debug("checkpoint at step %d: %s", state.step, self.last_path)


def _resume_state(
    backend: Backend, prep: Prepared, path: Path, best: BestCheckpoint | None, first_loss: list[float]
) -> Resume:
    """The loop's start from checkpoint ``path``; the trainable tensors (and best) restored."""
    info, tensors = load_checkpoint(path)
    check_resumable(info["fingerprint"], prep.recipe, path)
    names = list(prep.trainable)
    backend.assign_trainable(prep.model, tensors["trainable"])
    optimizer = {
        "step": info["optimizer_step"],
        "exp_avg": [tensors["optimizer"][f"exp_avg/{n}"] for n in names],
        "exp_avg_sq": [tensors["optimizer"][f"exp_avg_sq/{n}"] for n in names],
    }
    same_framework = info["backend"] == backend.name
    if not same_framework:
        log.warning(
            "the checkpoint was written on %s: its random generators do not carry over to %s, so "
            "dropout draws other masks from here (with train.dropout=false the numbers continue)",
            info["backend"],
            backend.name,
        )
    if best is not None and info.get("best"):
        best.value, best.step = info["best"]["value"], info["best"]["step"]
        best.state = tensors.get("best")
    if info.get("first_loss") is not None:
        first_loss.append(info["first_loss"])
    log.info(
        "resuming from %s: step %d of %d (epoch %d, batch %d)",
        path,
        info["step"],
        total_steps(prep.recipe, len(prep.train_set), backend.world()[1]),
        info["epoch"] + 1,
        info["position"],
    )
    return Resume(
        info["step"],
        info["epoch"],
        info["position"],
        optimizer,
        tensors.get("rng") if same_framework else None,
    )


def run_recipe(
    recipe: Recipe,
    backend: Backend,
    output: str | Path | None = None,
    progress: bool | None = None,
    callbacks: Sequence[Callback] = (),
    overwrite: bool = False,
    resume: str | Path | bool | None = None,
) -> Path:
    """Train, evaluate and write the run directory; returns its final path.

    ``output``: the run directory (default: ``train.output_dir`` filled in). ``progress``: a bar
    (True), progress lines (False), or whichever suits stderr (None). ``resume``: True continues the
    unfinished run of this output, a path continues that run directory. ``callbacks``: the caller's
    own, after dualtune's. Data parallel (several processes, ``backend.world()``): process 0 does
    all of this; the others only train (``_train_replica``)."""
    rank, world = backend.world()
    if rank != 0:
        return _train_replica(recipe, backend, output, resume)
    target = check_output(recipe, backend.name, output, overwrite, resume)
    source = find_resume(target, resume) if resume else None
    if world > 1:
        backend.all_reduce_sum([], [0.0])  # wait until the others have read the checkpoint
    signals = SignalStop()
    run = RunDir(target, overwrite or recipe.train.overwrite, source)
    interrupted = None
    try:
        with handling(signals.handle), run:
            _run_in(run, recipe, backend, progress, callbacks, signals, resumed=source is not None)
    except RunInterrupted as stop:
        failed = run.failed or target
        where = failed / stop.checkpoint.relative_to(run.path) if stop.checkpoint else None
        stop.checkpoint = where
        interrupted = stop
    if world > 1:
        backend.all_reduce_sum([], [0.0])  # the others wait for the run directory: all end together
    if interrupted is not None:
        raise interrupted
    return target


def _truncate_metrics(path: Path, step: int) -> None:
    """metrics.jsonl as the uninterrupted run has it at ``step``: later lines were never checkpointed."""
    if path.is_file():
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        write_atomic(path, "".join(line + "\n" for line in kept))


def _train_replica(
    recipe: Recipe, backend: Backend, output: str | Path | None, resume: str | Path | bool | None
) -> Path:
    """A data-parallel process other than 0: the same preparation and steps, nothing written."""
    target = output_dir(recipe, backend.name, output)
    prep = prepare(recipe, backend)
    start = None
    if resume:
        checkpoint = latest_checkpoint(find_resume(target, resume))
        assert checkpoint is not None
        start = _resume_state(backend, prep, checkpoint, None, [])
    backend.all_reduce_sum([], [0.0])  # process 0 may now take the run directory over
    signals = SignalStop()
    with handling(signals.handle):
        train(backend, prep, [signals], resume=start)
    # Until process 0 has finished the run directory (or its checkpoint): all processes end together.
    # (Under msrun, process 0 was once seen to die of SIGSEGV as it exited, seconds after this one.)
    backend.all_reduce_sum([], [0.0])
    return target


def _run_in(
    run: RunDir,
    recipe: Recipe,
    backend: Backend,
    progress: bool | None,
    callbacks: Sequence[Callback],
    signals: SignalStop,
    resumed: bool,
) -> None:
    handler = logging.FileHandler(run.path / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    tracking = Tracking(recipe, run.path, run.target, backend.name, backend.device)  # train.report_to
    try:
        if not resumed:
            run.mark("running", recipe=recipe.name, backend=backend.name, dualtune=__version__)
        else:
            run.mark("running", backend=backend.name)  # a resume may continue on the other stack
        write_atomic(run.path / "recipe.yaml", recipe.to_yaml())
        prep = prepare(recipe, backend)
        if not recipe.data.label_names:  # the effective recipe names the classes the data gave
            effective = recipe.model_copy(deep=True)
            effective.data.label_names = list(prep.label_names)
            write_atomic(run.path / "recipe.yaml", effective.to_yaml())
        if recipe.train.save_initial and not resumed:  # exact: another run starts from it (peft.init_from)
            backend.save(prep.model, run.path / "adapter_init", recipe.peft, exact=True)
        if recipe.train.dump_activations and not resumed:
            _dump_activations(backend, prep, run.path / "activations.safetensors")
        write_json(
            run.path / "trainable.json",
            {
                "method": recipe.peft.method,
                "total": prep.total_params,
                "trainable": sum(prep.trainable.values()),
                "tensors": prep.trainable,
            },
        )
        best = BestCheckpoint(recipe.train.best_metric) if recipe.train.best_metric else None
        first_loss: list[float] = []
        resume = None
        if resumed:
            checkpoint = latest_checkpoint(run.path)
            assert checkpoint is not None  # find_resume chose this directory for its checkpoint
            resume = _resume_state(backend, prep, checkpoint, best, first_loss)
            _truncate_metrics(run.path / "metrics.jsonl", resume.step)
        checkpointer = Checkpointer(backend, prep, run, signals, best, first_loss)
        loop_callbacks: list[Callback] = [
            signals,
            MetricsFile(run.log_metrics, recipe.train.log_every),
            Progress(
                f"{recipe.name or 'train'} [{backend.name}]",
                every=recipe.train.log_every,
                bar=progress,
                min_interval_s=0.0 if progress is not None else 5.0,
            ),
        ]
        if best is not None:
            loop_callbacks.append(KeepBest(backend, prep, best))
        if recipe.train.early_stopping_patience and best is not None:
            loop_callbacks.append(EarlyStopping(best.metric, recipe.train.early_stopping_patience))
        loop_callbacks += [checkpointer, tracking, *callbacks]
        tracking.start(resume.step if resume is not None else 0)
        started = time.perf_counter()
        records, state = train(backend, prep, loop_callbacks, full_eval=best is not None, resume=resume)
        seconds = time.perf_counter() - started
        if signals.received is not None:
            raise RunInterrupted(signals.received, state.step, checkpointer.last_path)
        evaluation = evaluate(backend, prep)
        metrics = evaluation.metrics
        run.log_metrics({"split": "eval", "step": state.step, "epoch": state.epoch, **metrics})
        tracking.log_eval({"step": state.step, "epoch": state.epoch, **metrics})
        selected = state.step
        if (
            best is not None
            and best.value is not None
            and best.state is not None
            and better(best.metric, best.value, metrics[best.metric])
        ):
            log.info(
                "keeping the adapter of step %d: %s %.4f (last step: %.4f)",
                best.step,
                best.metric,
                best.value,
                metrics[best.metric],
            )
            backend.assign_trainable(prep.model, best.state)
            evaluation = evaluate(backend, prep)
            metrics = evaluation.metrics
            selected = best.step if best.step is not None else selected
        backend.save(prep.model, run.path / "adapter", recipe.peft)
        write_evaluation(run.path, evaluation)
        final = {
            "backend": backend.name,
            "device": backend.device,
            "steps": state.step,
            "first_loss": first_loss[0] if first_loss else None,
            "last_loss": records[-1]["loss"] if records else None,
            "selected_step": selected,
            "best_metric": recipe.train.best_metric,
            "stopped_early": bool(state.stop),
            "resumed": resumed,
            "train_seconds": seconds,
            "trainable_parameters": sum(prep.trainable.values()),
            "total_parameters": prep.total_params,
            "peak_rss_mb": peak_rss_mb(),
            "peak_device_memory_mb": backend.peak_device_memory_mb(),
            "compile_seconds": backend.compile_seconds(prep.model),
            "precision": recipe.train.precision,
            "skipped_steps": state.skipped_steps,
            **metrics,
        }
        write_json(run.path / "final_metrics.json", final)
        log.info("final: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        plot_curves([run.path], run.path / "loss_curve.png", labels=[run.target.name])
        tracking.finish(final, run.path)
    except BaseException as err:
        tracking.close(failed=True)
        log.debug("run failed: %s: %s", type(err).__name__, err)
        handler.emit(
            logging.LogRecord(
                "dualtune", logging.ERROR, __file__, 0, "run failed: %s: %s", (type(err).__name__, err), None
            )
        )
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _dump_activations(backend: Backend, prep: Prepared, path: Path) -> None:
    """Module outputs on the first two training examples (dataset order), for ``compare --layers``."""
    from safetensors.numpy import save_file

    from dualtune import data as datamap
    from dualtune.evaluation import eval_mode

    r = prep.recipe
    np_batch = next(datamap.batches(prep.train_set, 2, prep.tokenizer.pad_token_id, r.data, r.model.task))
    with eval_mode(backend, prep.model):
        acts = backend.activations(prep.model, backend.to_tensors(np_batch))
    save_file(
        {k: np.ascontiguousarray(v) for k, v in acts.items()},
        str(path),
        metadata={"order": json.dumps(list(acts))},
    )  # execution order, for the first divergence


def check_finished(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """``run_dir`` if it is a finished run (or ``checkpoint`` is one of its checkpoints), else one line
    that says what it is. Reads files only: called before a framework loads."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no recipe.yaml)")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not (path / "state.json").is_file() or not (path / "trainable.safetensors").is_file():
            raise RunDirError(
                f"--checkpoint {path}: not a checkpoint (no state.json and trainable.safetensors)"
            )
        return run_dir
    marker = read_marker(run_dir)
    if marker is None and not (run_dir / "final_metrics.json").is_file():
        raise RunDirError(f"{run_dir}: not a finished run (no final_metrics.json)")
    if marker is not None and marker.get("status") != "finished":
        ckpt = latest_checkpoint(run_dir)
        hint = (
            f"evaluate its checkpoint on purpose with --checkpoint {ckpt}" if ckpt else "it has no checkpoint"
        )
        raise RunDirError(
            f"{run_dir}: an unfinished run ({run_status(marker)}), whose adapter/ is a "
            f"mid-training snapshot; resume it with dualtune run RECIPE --resume {run_dir}, or {hint}"
        )
    if not (run_dir / "adapter").is_dir():
        raise RunDirError(f"{run_dir}: no adapter/ (not a finished run)")
    return run_dir


def evaluate_run(
    run_dir: str | Path, backend: Backend, checkpoint: str | Path | None = None
) -> tuple[Path, Any]:
    """Evaluate a finished run directory's adapter (or one of its checkpoints) on ``backend``
    (whichever trained it); writes metrics.json, predictions, classification report and confusion
    matrix to RUN_DIR/eval/BACKEND/ (a checkpoint: RUN_DIR/eval/BACKEND-step-N/)."""
    run_dir = check_finished(run_dir, checkpoint)
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer, label_names, train_set, eval_set = prepare_data(recipe, backend)
    if checkpoint is None:
        model = backend.load_trained(recipe.model, label_names, tokenizer, recipe.peft, run_dir / "adapter")
        out = run_dir / "eval" / backend.name
    else:
        model = backend.apply_peft(
            backend.load_model(recipe.model, label_names, tokenizer),
            recipe.peft,
            recipe.model.task,
            recipe.train.seed,
        )
        _, tensors = load_checkpoint(Path(checkpoint))
        backend.assign_trainable(model, tensors["trainable"])
        out = run_dir / "eval" / f"{backend.name}-{Path(checkpoint).name}"
    backend.set_class_weights(
        model, class_weights(recipe, train_set.labels, label_names)
    )  # eval_loss as trained
    prep = Prepared(recipe, tokenizer, label_names, train_set, eval_set, model, [])
    evaluation = evaluate(backend, prep)
    write_json(
        out / "metrics.json", {"backend": backend.name, "device": backend.device, **evaluation.metrics}
    )
    write_evaluation(out, evaluation)
    return out, evaluation


__all__ = [
    "check_finished",
    "check_output",
    "evaluate_run",
    "output_dir",
    "run_recipe",
]
