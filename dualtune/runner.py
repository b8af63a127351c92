"""A whole run: output checks, preparation, the loop with its callbacks, checkpoints and resume,
signals, the final evaluation, and the run directory's files. Also ``evaluate_run`` (``dualtune eval``)."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualtune import __version__
from dualtune import data as datamap
from dualtune.backend import Backend
from dualtune.callbacks import Callback, EarlyStopping, LoopState, MetricsFile, Progress
from dualtune.errors import RunDirError
from dualtune.evaluation import evaluate, write_evaluation
from dualtune.metrics import better
from dualtune.prepare import Prepared, class_weights, prepare, prepare_data
from dualtune.recipe import Recipe, load_recipe
from dualtune.report import plot_curves
from dualtune.rundir import (
    CHECKPOINTS,
    RunDir,
    RunInterrupted,
    RunPlan,
    checkpoint_step,
    continuation,
    damage,
    discard_checkpoints_after,
    fault_point,
    find_resume,
    fingerprint,
    flat_recipe,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    output_dir,
    peak_rss_mb,
    plan_run,
    read_marker,
    run_status,
    save_checkpoint,
    write_atomic,
    write_json,
)
from dualtune.signals import handling
from dualtune.tracking import Tracking
from dualtune.trainer import BestCheckpoint, KeepBest, Resume, total_steps, train

log = logging.getLogger("dualtune")


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
        continued: dict[str, Any],
    ):
        self.backend, self.prep, self.run, self.signals, self.best = backend, prep, run, signals, best
        self.first_loss = first_loss
        self.continued = continued  # rundir.continuation: what a resume must share with this run
        self.every = prep.recipe.train.save_every
        self.due = False
        self.last_step = -1
        self.last_path: Path | None = None
        self.last_loss: float | None = None

    def on_step_end(self, state, record):
        if not self.first_loss:
            self.first_loss.append(record["loss"])
        self.last_loss = record["loss"]
        if self.every and state.step % self.every == 0:
            self.due = True

    def on_evaluate(self, state, record):
        self.due = True
        # The adapter as of this evaluation (the best one with best_metric): a run that fails later keeps it.
        if self.best is None or self.best.step == record["step"]:
            save_adapter(self.backend, self.prep, self.run.path / "adapter")

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
            "last_loss": self.last_loss,  # a resume at the last step trains none
            "best": best,
            "last_eval": state.last_eval,
            "fingerprint": fingerprint(r),
            "continuation": self.continued,
            "recipe": flat_recipe(r),  # a resume names the keys it changes
            "metrics_lines": self.run.metrics_lines(),  # metrics.jsonl as of this step, for a resume
            "callbacks": state.callbacks.state_dict() if state.callbacks is not None else {},
        }
        protect = self.best.step if self.best is not None else None
        self.last_path = save_checkpoint(
            self.run.path, state.step, tensors, info, r.train.keep_checkpoints, protect
        )
        self.last_step = state.step
        self.run.mark("running", step=state.step)
        log.debug("checkpoint at step %d: %s", state.step, self.last_path)
        if state.callbacks is not None:
            state.callbacks.on_checkpoint(state, self.last_path)
        fault_point(f"checkpoint-{state.step}")


def save_adapter(backend: Backend, prep: Prepared, directory: Path) -> None:
    """The adapter in its library's format, naming its base model as the recipe does (a hub id, a
    ``pkg:`` spec, the path as given), never the path it resolved to here (a site-packages or cache
    folder of this machine): copied to another machine, it resolves there again. The resolved
    path is the run's own record (environment.json)."""
    backend.save(prep.model, directory, prep.recipe.peft)
    portable_adapter(directory, prep.recipe.model.name_or_path)


def portable_adapter(directory: Path, base_model: str) -> None:
    """Rewrite ``base_model_name_or_path`` (adapter_config.json) and the model card's ``base_model``
    to ``base_model``, as the user named it."""
    config = directory / "adapter_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        resolved = data.get("base_model_name_or_path")
        if resolved and resolved != base_model:
            data["base_model_name_or_path"] = base_model
            write_atomic(config, json.dumps(data, indent=2, sort_keys=True) + "\n")
            card = directory / "README.md"
            if card.is_file():
                text = card.read_text(encoding="utf-8")
                write_atomic(
                    card,
                    text.replace(f"base_model: {resolved}", f"base_model: {base_model}").replace(
                        f"base_model:adapter:{resolved}", f"base_model:adapter:{base_model}"
                    ),
                )


def _resume_state(
    backend: Backend, prep: Prepared, path: Path, best: BestCheckpoint | None, first_loss: list[float]
) -> Resume:
    """The loop's start from checkpoint ``path`` (checked by the plan); the trainable tensors (and
    best) restored."""
    info, tensors = load_checkpoint(path)
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
        info.get("callbacks") or {},
    )


def run_recipe(
    recipe: Recipe,
    backend: Backend,
    output: str | Path | None = None,
    progress: bool | None = None,
    callbacks: Sequence[Callback] = (),
    overwrite: bool = False,
    resume: str | Path | bool | None = None,
    plan: RunPlan | None = None,
) -> Path:
    """Train, evaluate and write the run directory; returns its final path.

    ``output``: the run directory (default: ``train.output_dir`` filled in). ``progress``: a bar
    (True), progress lines (False), or whichever suits stderr (None). ``resume``: True continues the
    unfinished run of this output, a path continues that run directory. ``callbacks``: the caller's
    own, after dualtune's. ``plan``: ``rundir.plan_run``'s, as ``validate`` made it (the CLI);
    without one the run plans itself (output, overwrite and resume then say what). Data parallel
    (several processes, ``backend.world()``): process 0 does all of this; the others only train
    (``_train_replica``)."""
    rank, world = backend.world()
    if rank != 0:
        return _train_replica(recipe, backend, output, resume)
    if plan is None:
        plan = plan_run(recipe, backend.name, output, overwrite, resume)
    if plan.data is None:
        plan.data = datamap.fingerprint(datamap.load_rows(recipe.data), recipe.data)
    plan.check_continuation(recipe, world)  # validate checked it too, but not knowing the processes
    if world > 1:
        backend.all_reduce_sum([], [0.0])  # wait until the others have read the checkpoint
    signals = SignalStop()
    run = RunDir(plan.target, plan.overwrite, plan.source)
    interrupted = None
    try:
        with handling(signals.handle), run:
            _run_in(run, plan, recipe, backend, progress, callbacks, signals)
    except RunInterrupted as stop:
        failed = run.failed or plan.target
        where = failed / stop.checkpoint.relative_to(run.path) if stop.checkpoint else None
        stop.checkpoint = where
        interrupted = stop
    if world > 1:
        backend.all_reduce_sum([], [0.0])  # the others wait for the run directory: all end together
    if interrupted is not None:
        raise interrupted
    return plan.target


def _truncate_metrics(path: Path, state: dict[str, Any], extending: bool) -> None:
    """metrics.jsonl as the continued run has it at checkpoint ``state``. Continuing an unfinished
    run: the lines as the checkpoint was written (later steps, and a final evaluation the run did not
    live to finish, were never checkpointed). Extending a finished run: its lines up to the step,
    its final evaluation included (the run did finish there)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not extending and state.get("metrics_lines") is not None:
        kept = lines[: state["metrics_lines"]]
    else:  # (or a checkpoint from before the line count was kept)
        kept = [line for line in lines if json.loads(line).get("step", 0) <= state["step"]]
    write_atomic(path, "".join(line + "\n" for line in kept))


def _train_replica(
    recipe: Recipe, backend: Backend, output: str | Path | None, resume: str | Path | bool | None
) -> Path:
    """A data-parallel process other than 0: the same preparation and steps, nothing written."""
    target = output_dir(recipe, backend.name, output)
    prep = prepare(recipe, backend)
    start = None
    if resume:  # the checkpoint process 0 chose (it checked the rest), read before it moves
        checkpoint, _, _ = intact_checkpoint(find_resume(target, resume))
        start = _resume_state(backend, prep, checkpoint, None, [])
    backend.all_reduce_sum([], [0.0])  # process 0 may now take the run directory over
    signals = SignalStop()
    with handling(signals.handle):
        train(backend, prep, [signals], resume=start)
    # Until process 0 has finished the run directory (or its checkpoint): all processes end together.
    # (Under msrun, process 0 was once seen to die of SIGSEGV as it exited, seconds after this one.)
    backend.all_reduce_sum([], [0.0])
    return target


class _RunLog:
    """run.log in the run directory for the length of the run; a failure's last line in it."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> _RunLog:
        log.addHandler(self.handler)
        return self

    def __exit__(self, exc_type, err, tb) -> None:
        if err is not None:
            log.debug("run failed: %s: %s", type(err).__name__, err)
            self.handler.emit(
                logging.LogRecord(
                    "dualtune",
                    logging.ERROR,
                    __file__,
                    0,
                    "run failed: %s: %s",
                    (type(err).__name__, err),
                    None,
                )
            )
        log.removeHandler(self.handler)
        self.handler.close()


def _run_in(
    run: RunDir,
    plan: RunPlan,
    recipe: Recipe,
    backend: Backend,
    progress: bool | None,
    callbacks: Sequence[Callback],
    signals: SignalStop,
) -> None:
    """The run inside its directory, as named steps."""
    with _RunLog(run.path / "run.log"):
        for note in plan.notes + ([plan.changed] if plan.changed else []):
            log.warning("%s", note)
        tracking = Tracking(recipe, run.path, run.target, backend.name, backend.device)  # train.report_to
        try:
            prep = _start(run, plan, recipe, backend)
            best = BestCheckpoint(recipe.train.best_metric) if recipe.train.best_metric else None
            first_loss: list[float] = []
            resume = _restore(run, plan, backend, prep, best, first_loss)
            checkpointer = Checkpointer(
                backend,
                prep,
                run,
                signals,
                best,
                first_loss,
                continuation(recipe, plan.data or {}, backend.world()[1]),
            )
            loop = _loop_callbacks(recipe, backend, prep, run, progress, signals, best, checkpointer)
            # the trackers start in on_train_begin, with their state restored (a resume continues its runs)
            records, state = train(
                backend, prep, [*loop, tracking, *callbacks], full_eval=best is not None, resume=resume
            )
            seconds = state.train_seconds
            if signals.received is not None:
                raise RunInterrupted(signals.received, state.step, checkpointer.last_path)
            evaluation, selected = _final_evaluation(run, backend, prep, best, state, tracking)
            _write_results(
                run, plan, backend, prep, evaluation, state, records, selected, first_loss, seconds, tracking
            )
        except BaseException:
            tracking.close(failed=True)
            raise


def _start(run: RunDir, plan: RunPlan, recipe: Recipe, backend: Backend) -> Prepared:
    """Mark the run, write what it is (recipe.yaml with the classes the data gave, data.json), and
    prepare data and model."""
    if plan.source is None:
        run.mark("running", recipe=recipe.name, backend=backend.name, dualtune=__version__)
    else:
        run.mark("running", backend=backend.name)  # a resume may continue on the other stack
    effective = recipe
    if not recipe.data.label_names and plan.data is not None:
        effective = recipe.model_copy(deep=True)
        effective.data.label_names = list(plan.data["label_names"])
    write_atomic(run.path / "recipe.yaml", effective.to_yaml())
    write_json(run.path / "data.json", plan.data)  # what it trained on, for report and a resume
    prep = prepare(recipe, backend)
    fault_point("model-load")
    _record_environment(run.path / "environment.json", recipe, backend, plan.state.get("step", 0))
    if (
        recipe.train.save_initial and plan.source is None
    ):  # exact: another run starts from it (peft.init_from)
        backend.save(prep.model, run.path / "adapter_init", recipe.peft, exact=True)
    if recipe.train.dump_activations and plan.source is None:
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
    return prep


def _record_environment(path: Path, recipe: Recipe, backend: Backend, from_step: int) -> None:
    """environment.json: where and with what the run ran (versions, machine, device, the variables
    that change numbers, the model as named and as resolved here), one entry per process that
    trained it: a resume, on either stack, adds its own from its step."""
    from dualtune.environment import record
    from dualtune.hub import resolve_model_path

    entries = json.loads(path.read_text())["runs"] if path.is_file() else []
    name = recipe.model.name_or_path
    resolved = resolve_model_path(name, unpack=False)
    entry = {
        "from_step": from_step,
        **record(backend),
        "model": {"name_or_path": name, "resolved": str(resolved)},
    }
    write_json(path, {"runs": [*entries, entry]})


def _restore(
    run: RunDir,
    plan: RunPlan,
    backend: Backend,
    prep: Prepared,
    best: BestCheckpoint | None,
    first_loss: list[float],
) -> Resume | None:
    """On --resume: the plan's checkpoint (now in this run's directory) loaded, metrics.jsonl as of
    it, and later checkpoints (damaged ones passed over) cleared: the run retrains that stretch."""
    if plan.checkpoint is None:
        return None
    checkpoint = run.path / CHECKPOINTS / plan.checkpoint.name
    resume = _resume_state(backend, prep, checkpoint, best, first_loss)
    discard_checkpoints_after(run.path, checkpoint_step(checkpoint))
    extending = plan.source is not None and plan.source.resolve() == plan.target.resolve()
    _truncate_metrics(run.path / "metrics.jsonl", plan.state, extending)
    return resume


def _loop_callbacks(
    recipe: Recipe,
    backend: Backend,
    prep: Prepared,
    run: RunDir,
    progress: bool | None,
    signals: SignalStop,
    best: BestCheckpoint | None,
    checkpointer: Checkpointer,
) -> list[Callback]:
    """dualtune's own loop callbacks, in their order (signals first, checkpoints after what they save)."""
    loop: list[Callback] = [
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
        loop.append(KeepBest(backend, prep, best))
    if recipe.train.early_stopping_patience and best is not None:
        loop.append(EarlyStopping(best.metric, recipe.train.early_stopping_patience))
    return [*loop, checkpointer]


def _final_evaluation(
    run: RunDir,
    backend: Backend,
    prep: Prepared,
    best: BestCheckpoint | None,
    state: LoopState,
    tracking: Tracking,
) -> tuple[Any, int]:
    """The last step's evaluation (logged), then the best step's adapter swapped in if it was better;
    returns the evaluation of the adapter kept and its step."""
    evaluation = evaluate(backend, prep)
    metrics = evaluation.metrics
    run.log_metrics({"split": "eval", "step": state.step, "epoch": state.epoch, **metrics})
    tracking.log_eval({"step": state.step, "epoch": state.epoch, **metrics})
    fault_point("final-eval")
    if (
        best is None
        or best.value is None
        or best.state is None
        or best.step is None
        or not better(best.metric, best.value, metrics[best.metric])
    ):
        return evaluation, state.step
    log.info(
        "keeping the adapter of step %d: %s %.4f (last step: %.4f)",
        best.step,
        best.metric,
        best.value,
        metrics[best.metric],
    )
    backend.assign_trainable(prep.model, best.state)
    fault_point("best-swap")
    return evaluate(backend, prep), best.step


def _write_results(
    run: RunDir,
    plan: RunPlan,
    backend: Backend,
    prep: Prepared,
    evaluation: Any,
    state: LoopState,
    records: list[dict],
    selected: int,
    first_loss: list[float],
    seconds: float,
    tracking: Tracking,
) -> None:
    """The adapter, predictions and report, final_metrics.json, the loss curve, the trackers' end."""
    recipe, metrics = prep.recipe, evaluation.metrics
    save_adapter(backend, prep, run.path / "adapter")
    write_evaluation(run.path, evaluation)
    fault_point("final-files")
    final = {
        "backend": backend.name,
        "device": backend.device,
        "steps": state.step,
        "first_loss": first_loss[0] if first_loss else None,
        "last_loss": records[-1]["loss"] if records else plan.state.get("last_loss"),
        "selected_step": selected,
        "best_metric": recipe.train.best_metric,
        "stopped_early": bool(state.stop),
        "resumed": plan.source is not None,
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
    fault_point("finished-files")


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
        why = damage(path)
        if why is not None:
            raise RunDirError(f"--checkpoint {path}: damaged ({why}); choose another of its checkpoints")
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
    "evaluate_run",
    "run_recipe",
]
