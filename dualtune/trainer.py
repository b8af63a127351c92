"""The training loop, evaluation and checkpoints: framework-free, driving a ``Backend``."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dualtune import data as datamap
from dualtune import metrics as metricsmod
from dualtune.backend import Backend
from dualtune.recipe import Recipe, is_head_parameter
from dualtune.rundir import RunDir, peak_rss_mb, write_atomic, write_json
from dualtune.schedule import lr_at

log = logging.getLogger("dualtune")
# Below this share of the parameters, BitFit has found almost nothing to train (t5-small: 0.0008 %).
BITFIT_TOO_FEW = 1e-4


@dataclass
class Prepared:
    """Everything a run needs before the first step: data, model, trainable parameters."""

    recipe: Recipe
    tokenizer: object
    label_names: list[str]
    train: datamap.Encoded
    eval: datamap.Encoded
    model: object
    params: list
    trainable: dict[str, int] = field(default_factory=dict)
    total_params: int = 0


def prepare_data(recipe: Recipe, backend: Backend):
    """(tokenizer, label names, encoded train split, encoded eval split)."""
    tokenizer = backend.load_tokenizer(recipe.model)
    rows = datamap.load_rows(recipe.data)
    train_rows, eval_rows = datamap.split_rows(rows, recipe.data.train_split, recipe.data.seed)
    task = recipe.model.task
    return (tokenizer, rows.label_names, datamap.encode(train_rows, tokenizer, recipe.data, task),
            datamap.encode(eval_rows, tokenizer, recipe.data, task))


def prepare(recipe: Recipe, backend: Backend) -> Prepared:
    tokenizer, label_names, enc_train, enc_eval = prepare_data(recipe, backend)
    task = recipe.model.task
    backend.seed(recipe.train.seed)
    model = backend.load_model(recipe.model, label_names, tokenizer)
    model = backend.apply_peft(model, recipe.peft, task, recipe.train.seed)
    if recipe.peft.init_from:
        backend.load_weights(model, recipe.peft.init_from, recipe.peft)
        log.info("adapter initialised from %s", recipe.peft.init_from)
    if not recipe.train.dropout:
        log.info("dropout off in %d modules", backend.disable_dropout(model))
    backend.set_class_weights(model, class_weights(recipe, enc_train.labels, label_names))
    named = backend.trainable_parameters(model)
    prepared = Prepared(recipe, tokenizer, label_names, enc_train, enc_eval, model,
                        [p for _, p in named], {n: int(p.numel()) for n, p in named},
                        backend.parameter_count(model))
    _report_trainable(prepared)
    return prepared


def class_weights(recipe: Recipe, train_labels: list[int], label_names: list[str]) -> np.ndarray | None:
    """The loss's per-class weights (``loss.class_weights``), counted on the training split."""
    spec, n = recipe.loss.class_weights, len(label_names)
    if spec is None:
        return None
    if spec != "balanced":
        if len(spec) != n:
            raise datamap.DataError(f"loss.class_weights has {len(spec)} weights for the data's {n} labels")
        return np.asarray(spec, dtype=np.float64)
    counts = np.bincount(train_labels, minlength=n)
    if not counts.all():
        missing = label_names[int(np.argmin(counts))]
        raise datamap.DataError(f"loss.class_weights=balanced: label {missing!r} has no training rows")
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(n), y=np.asarray(train_labels))
    log.info("class weights: %s", ", ".join(f"{name}={w:.3f}" for name, w in zip(label_names, weights)))
    return weights


def _report_trainable(prep: Prepared) -> None:
    n_train = sum(prep.trainable.values())
    share = n_train / max(1, prep.total_params)
    log.info("method %s: %d trainable tensors, %s of %s parameters (%.4f %%)", prep.recipe.peft.method,
             len(prep.trainable), f"{n_train:,}", f"{prep.total_params:,}", 100 * share)
    for name, count in prep.trainable.items():
        log.debug("  trains %s (%d)", name, count)
    if prep.recipe.peft.method == "bitfit":
        # Real biases are named *.bias; T5's relative_attention_bias.weight matches "bias" but is a table.
        biases = sum(c for n, c in prep.trainable.items() if n.endswith(".bias") and not is_head_parameter(n))
        if biases / max(1, prep.total_params) < BITFIT_TOO_FEW:
            log.warning("BitFit found almost nothing to train: %d bias parameters (%.5f %% of the model). "
                        "Bias-free models such as T5 need peft.bitfit.add_bias_to=[q,k,v,o,wi,wo] to add "
                        "zero-initialised biases", biases, 100 * biases / max(1, prep.total_params))


# ---------------------------------------------------------------- evaluation

def decode(tokenizer, ids: np.ndarray) -> list[str]:
    """Token ids as stripped text, special tokens dropped (label words, generated or teacher-forced)."""
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def evaluate(backend: Backend, prep: Prepared, generate: bool | None = None) -> tuple[dict, list[dict]]:
    """Metrics and per-example predictions on the eval split, in dataset order (the batches are
    read longest first, ``data.eval_order``, and the predictions put back)."""
    r = prep.recipe
    task = r.model.task
    generate = r.train.generate if generate is None else generate
    tok = prep.tokenizer
    backend.set_training(prep.model, False)
    total_loss, seen = 0.0, 0
    predictions: list[dict | None] = [None] * len(prep.eval)  # filled in dataset order
    bs = r.train.eval_batch_size or r.train.batch_size
    order = datamap.eval_order(prep.eval, r.data)
    start = 0
    for np_batch in datamap.batches(prep.eval, bs, tok.pad_token_id, r.data, task, order=order):
        n = len(np_batch["input_ids"])
        batch = backend.to_tensors(np_batch)
        loss, logits = backend.eval_batch(prep.model, batch)
        total_loss += loss * n
        seen += n
        rows = order[start: start + n]
        gold = [prep.eval.labels[i] for i in rows]
        in_batch = []
        if task == "classification":
            for g, row in zip(gold, logits):
                in_batch.append({"label": prep.label_names[g], "pred": prep.label_names[int(row.argmax())],
                                 "logits": [float(x) for x in row]})
        else:
            labels = np_batch["labels"]
            argmax = np.where(labels == -100, tok.pad_token_id, logits.argmax(-1))
            forced = decode(tok, argmax)
            # Correct only if every label token (eos included) is the argmax: decoding alone would
            # pass [pad, positive] for [positive, </s>].
            token_exact = ((argmax == labels) | (labels == -100)).all(-1)
            generated = decode(tok, backend.generate(prep.model, batch, r.data.label_max_length)) \
                if generate else [None] * n
            for g, f, ok, gen in zip(gold, forced, token_exact, generated):
                in_batch.append({"label": prep.label_names[g], "teacher_forced": f,
                                 "teacher_forced_correct": bool(ok), "generated": gen})
        for i, prediction in zip(rows, in_batch):
            predictions[i] = prediction
        start += n
    backend.set_training(prep.model, True)
    metrics = {"eval_loss": total_loss / max(1, seen)}
    if task == "classification":
        metrics["accuracy"] = float(np.mean([p["pred"] == p["label"] for p in predictions]))
    else:
        metrics["teacher_forced_accuracy"] = float(np.mean([p["teacher_forced_correct"] for p in predictions]))
        if generate:
            metrics["exact_match"] = float(np.mean([p["generated"] == p["label"] for p in predictions]))
    summary = classification_summary(prep, predictions)
    metrics.update({k: summary[k] for k in metricsmod.AVERAGES})
    majority = Counter(prep.train.labels).most_common(1)[0][0]
    metrics["majority_class_accuracy"] = float(np.mean([l == majority for l in prep.eval.labels]))
    return metrics, predictions


def _predicted_label(prediction: dict) -> str:
    """What a prediction row says the class is; seq2seq: the generated text when generation ran."""
    if "pred" in prediction:
        return prediction["pred"]
    if prediction.get("generated") is not None:
        return prediction["generated"]
    # Teacher forcing: the text decodes to the label yet a token is off ([pad, positive] for
    # [positive, </s>]) -> wrong, as in teacher_forced_accuracy.
    text = prediction["teacher_forced"]
    return metricsmod.OTHER if text == prediction["label"] and not prediction["teacher_forced_correct"] else text


def classification_summary(prep: Prepared, predictions: list[dict]) -> dict:
    """``metrics.classification_report`` of ``evaluate``'s predictions: averages, per class, confusion."""
    report = metricsmod.classification_report([p["label"] for p in predictions],
                                              [_predicted_label(p) for p in predictions], prep.label_names)
    if prep.recipe.model.task == "seq2seq":
        generated = bool(predictions) and predictions[0].get("generated") is not None
        report["predicted_from"] = "generated" if generated else "teacher_forced"
    return report


def write_reports(run_path: str | Path, prep: Prepared, predictions: list[dict]) -> dict:
    """classification_report.json and confusion_matrix.png in ``run_path``; returns the report."""
    run_path = Path(run_path)
    report = classification_summary(prep, predictions)
    write_json(run_path / "classification_report.json", report)
    metricsmod.save_confusion_png(report, run_path / "confusion_matrix.png")
    return report


# ---------------------------------------------------------------- training

def total_steps(recipe: Recipe, n_train: int) -> int:
    steps = recipe.train.epochs * datamap.num_batches(n_train, recipe.train.batch_size)
    return min(steps, recipe.train.max_steps) if recipe.train.max_steps else steps


@dataclass
class BestCheckpoint:
    """The evaluation with the best ``metric`` so far, and the trainable tensors at that point."""

    metric: str
    value: float | None = None
    step: int | None = None
    state: dict | None = None

    def beats(self, value: float) -> bool:
        """Is ``value`` strictly better than the best so far?"""
        return self.value is None or better(self.metric, value, self.value)


def better(metric: str, a: float, b: float) -> bool:
    """Is ``a`` strictly better than ``b`` (eval_loss falls, every other metric rises)?"""
    return a < b if metric == "eval_loss" else a > b


def train(backend: Backend, prep: Prepared, run: RunDir | None = None, progress: bool = True,
          best: BestCheckpoint | None = None) -> list[dict]:
    """Run the recipe's optimizer steps; returns the per-step records (also written to ``run``).

    Evaluates every ``train.eval_every`` (and checkpoints to ``run``), except after the last step:
    that evaluation is the caller's (``run_recipe`` does it in full), so it is not done twice."""
    r = prep.recipe
    task, pad = r.model.task, prep.tokenizer.pad_token_id
    steps = total_steps(r, len(prep.train))
    optimizer = backend.make_optimizer(prep.params, r.optim)
    eval_every = r.train.eval_every if isinstance(r.train.eval_every, int) else None
    per_epoch = datamap.num_batches(len(prep.train), r.train.batch_size)
    records, step = [], 0
    backend.set_training(prep.model, True)
    bar = tqdm(total=steps, desc=f"{r.name or 'train'} [{backend.name}]", disable=not progress, unit="step")
    started = time.perf_counter()
    for epoch in range(r.train.epochs):
        # The order depends only on (seed, epoch): identical on every backend.
        for np_batch in datamap.batches(prep.train, r.train.batch_size, pad, r.data, task,
                                        shuffle_seed=r.train.seed + epoch, group_by_length=r.train.group_by_length):
            if step >= steps:
                break
            lr = lr_at(step, r.optim.lr, r.schedule, steps)
            loss, grads = backend.value_and_grad(prep.model, prep.params, backend.to_tensors(np_batch))
            grads, grad_norm = backend.clip_grads(grads, r.optim.grad_clip)
            backend.apply_update(optimizer, grads, lr)
            step += 1
            loss = backend.to_float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; lower optim.lr or set optim.grad_clip")
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            records.append(record)
            if run is not None and step % r.train.log_every == 0:
                run.log_metrics(record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            end_of_epoch = step % per_epoch == 0
            if step < steps and ((eval_every and step % eval_every == 0) or (eval_every is None and end_of_epoch)):
                _evaluate_and_checkpoint(backend, prep, run, step, epoch, best)
    bar.close()
    log.info("trained %d steps in %.1f s", step, time.perf_counter() - started)
    return records


def _evaluate_and_checkpoint(backend, prep, run, step, epoch, best: BestCheckpoint | None) -> None:
    # Without a best metric, a quick evaluation (no generation) to follow progress; with one, the
    # full evaluation, since the metric may need the generated text.
    metrics, _ = evaluate(backend, prep, generate=None if best is not None else False)
    record = {"step": step, "epoch": epoch, **metrics}
    log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if run is not None:
        run.log_metrics({"split": "eval", **record})
    if best is None or best.beats(metrics[best.metric]):
        if best is not None:
            best.value, best.step = metrics[best.metric], step
            best.state = backend.trainable_state(prep.model)
        if run is not None:  # a checkpoint: a run that fails later keeps its last (best) adapter
            backend.save(prep.model, run.path / "adapter", prep.recipe.peft)


def _dump_activations(backend: Backend, prep: Prepared, path: Path) -> None:
    """Module outputs on the first two training examples (dataset order), for ``compare --layers``."""
    from safetensors.numpy import save_file

    r = prep.recipe
    np_batch = next(datamap.batches(prep.train, 2, prep.tokenizer.pad_token_id, r.data, r.model.task))
    backend.set_training(prep.model, False)
    acts = backend.activations(prep.model, backend.to_tensors(np_batch))
    backend.set_training(prep.model, True)
    save_file({k: np.ascontiguousarray(v) for k, v in acts.items()}, str(path),
              metadata={"order": json.dumps(list(acts))})  # execution order, for the first divergence


def run_recipe(recipe: Recipe, backend: Backend, output_dir: str | Path, progress: bool = True) -> Path:
    """Train, evaluate and write the run directory; returns its final path."""
    output_dir = Path(output_dir)
    with RunDir(output_dir) as run:
        handler = logging.FileHandler(run.path / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("dualtune").addHandler(handler)
        try:
            write_atomic(run.path / "recipe.yaml", recipe.to_yaml())
            prep = prepare(recipe, backend)
            if not recipe.data.label_names:  # the effective recipe names the classes the data gave
                effective = recipe.model_copy(deep=True)
                effective.data.label_names = list(prep.label_names)
                write_atomic(run.path / "recipe.yaml", effective.to_yaml())
            if recipe.train.save_initial:  # exact: another run starts from it (peft.init_from)
                backend.save(prep.model, run.path / "adapter_init", recipe.peft, exact=True)
            if recipe.train.dump_activations:
                _dump_activations(backend, prep, run.path / "activations.safetensors")
            write_json(run.path / "trainable.json", {"method": recipe.peft.method, "total": prep.total_params,
                                                     "trainable": sum(prep.trainable.values()),
                                                     "tensors": prep.trainable})
            best = BestCheckpoint(recipe.train.best_metric) if recipe.train.best_metric else None
            started = time.perf_counter()
            records = train(backend, prep, run, progress, best)
            seconds = time.perf_counter() - started
            metrics, predictions = evaluate(backend, prep)
            last = records[-1] if records else {"step": 0, "epoch": 0}
            run.log_metrics({"split": "eval", "step": last["step"], "epoch": last["epoch"], **metrics})
            selected = last["step"]
            if best is not None and best.step is not None and better(best.metric, best.value, metrics[best.metric]):
                log.info("keeping the adapter of step %d: %s %.4f (last step: %.4f)", best.step,
                         best.metric, best.value, metrics[best.metric])
                backend.assign_trainable(prep.model, best.state)
                metrics, predictions = evaluate(backend, prep)
                selected = best.step
            backend.save(prep.model, run.path / "adapter", recipe.peft)
            write_atomic(run.path / "predictions.jsonl",
                         "".join(json.dumps(p) + "\n" for p in predictions))
            write_reports(run.path, prep, predictions)
            final = {"backend": backend.name, "device": backend.device, "steps": len(records),
                     "first_loss": records[0]["loss"] if records else None,
                     "last_loss": records[-1]["loss"] if records else None,
                     "selected_step": selected, "best_metric": recipe.train.best_metric,
                     "train_seconds": seconds, "trainable_parameters": sum(prep.trainable.values()),
                     "total_parameters": prep.total_params, "peak_rss_mb": peak_rss_mb(), **metrics}
            write_json(run.path / "final_metrics.json", final)
            log.info("final: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        except BaseException as err:
            log.error("run failed: %s: %s", type(err).__name__, err)  # into run.log of the .failed dir
            raise
        finally:
            logging.getLogger("dualtune").removeHandler(handler)
            handler.close()
    return output_dir


def evaluate_run(run_dir: str | Path, backend: Backend) -> tuple[dict, list[dict]]:
    """Evaluate a finished run directory's adapter on ``backend`` (whichever trained it); writes
    metrics, predictions, classification report and confusion matrix to RUN_DIR/eval/BACKEND/."""
    from dualtune.recipe import load_recipe

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer, label_names, enc_train, enc_eval = prepare_data(recipe, backend)
    model = backend.load_trained(recipe.model, label_names, tokenizer, recipe.peft, run_dir / "adapter")
    backend.set_class_weights(model, class_weights(recipe, enc_train.labels, label_names))  # eval_loss as trained
    prep = Prepared(recipe, tokenizer, label_names, enc_train, enc_eval, model, [])
    metrics, predictions = evaluate(backend, prep)
    out = run_dir / "eval" / backend.name
    write_json(out / "metrics.json", {"backend": backend.name, "device": backend.device, **metrics})
    write_atomic(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    write_reports(out, prep, predictions)
    return metrics, predictions
