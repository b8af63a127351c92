"""Evaluation: metrics, per-example predictions and the classification report of a model on the
eval split, and the files they are written to. Framework-free: the backend runs the model."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dualtune import data as datamap
from dualtune import metrics as metricsmod
from dualtune.backend import Backend
from dualtune.recipe import PROMPT_LEARNING_METHODS, TEXT_TASKS
from dualtune.rundir import write_atomic, write_json

if TYPE_CHECKING:
    from dualtune.prepare import Prepared


@dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: list[dict]  # one per eval row, in dataset order
    report: dict  # metrics.classification_report of the predictions


@contextmanager
def eval_mode(backend: Backend, model: Any) -> Iterator[None]:
    """``model`` in eval mode (dropout off) inside the block; its previous mode after, also on error."""
    was_training = bool(getattr(model, "training", True))
    backend.set_training(model, False)
    try:
        yield
    finally:
        backend.set_training(model, was_training)


def decode(tokenizer: Any, ids: np.ndarray | list[list[int]]) -> list[str]:
    """Token ids as stripped text, special tokens dropped (label words, generated or teacher-forced)."""
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def generate_text(
    backend: Backend,
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    batch: Any,
    spec: Any,
    task: str,
    method: str = "lora",
) -> list[str]:
    """Greedy generation, decoded. seq2seq: from ``batch`` (the inputs as tensors), at most
    ``data.label_max_length`` tokens. causal_lm: from ``prompts`` padded on the left, at most
    ``data.label_max_length`` + 1 (the target's EOS) new tokens, each row cut at its first EOS."""
    if task != "causal_lm":
        return decode(tokenizer, backend.generate(model, batch, spec.label_max_length))
    # peft drops the position ids of prompt-learning methods when generating, so the positions of a
    # left-padded row would count its padding (training's never do): those rows go in groups of one
    # length, unpadded.
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p) if method in PROMPT_LEARNING_METHODS else 0, []).append(i)
    eos = tokenizer.eos_token_id
    texts: list[str] = [""] * len(prompts)
    for rows in groups.values():
        left = datamap.collate_prompts([prompts[i] for i in rows], tokenizer.pad_token_id, spec)
        new = backend.generate(model, backend.to_tensors(left), spec.label_max_length + 1)
        cut = [list(row[: (list(row) + [eos]).index(eos)]) for row in new]
        for i, text in zip(rows, decode(tokenizer, cut)):
            texts[i] = text
    return texts


def evaluate(backend: Backend, prep: Prepared, generate: bool | None = None) -> Evaluation:
    """Metrics, predictions (in dataset order) and report on the eval split. The batches are read
    longest first (``data.eval_order``) and the predictions put back in dataset order."""
    r = prep.recipe
    task = r.model.task
    generate = r.train.generate if generate is None else generate
    tok = prep.tokenizer
    eval_set = prep.eval_set
    total_loss, seen = 0.0, 0
    predictions: list[dict] = [{} for _ in range(len(eval_set))]  # filled in dataset order
    bs = r.train.eval_batch_size or r.train.batch_size
    order = datamap.eval_order(eval_set, r.data)
    start = 0
    with eval_mode(backend, prep.model):
        for np_batch in datamap.batches(eval_set, bs, tok.pad_token_id, r.data, task, order=order):
            n = len(np_batch["input_ids"])
            batch = backend.to_tensors(np_batch)
            loss, logits = backend.eval_batch(prep.model, batch)
            total_loss += (loss or 0.0) * n
            seen += n
            rows = order[start : start + n]
            gold = [eval_set.labels[i] for i in rows]
            in_batch = []
            if task == "classification":
                for g, row in zip(gold, logits):
                    in_batch.append(
                        {
                            "label": prep.label_names[g],
                            "pred": prep.label_names[int(row.argmax())],
                            "logits": [float(x) for x in row],
                        }
                    )
            else:
                labels = np_batch["labels"]
                if task == "causal_lm":
                    # the logits at position t predict token t + 1; prompt tuning and p-tuning put
                    # their virtual tokens' logits first
                    logits = logits[:, logits.shape[1] - labels.shape[1] : -1]
                    labels = labels[:, 1:]
                argmax = np.where(labels == -100, tok.pad_token_id, logits.argmax(-1))
                forced = decode(tok, argmax)
                # Correct only if every label token (eos included) is the argmax: decoding alone would
                # pass [pad, positive] for [positive, </s>].
                token_exact = ((argmax == labels) | (labels == -100)).all(-1)
                generated = (
                    generate_text(
                        backend,
                        prep.model,
                        tok,
                        [eval_set.input_ids[i] for i in rows],
                        batch,
                        r.data,
                        task,
                        r.peft.method,
                    )
                    if generate
                    else [None] * n
                )
                for g, f, ok, gen in zip(gold, forced, token_exact, generated):
                    in_batch.append(
                        {
                            "label": prep.label_names[g],
                            "teacher_forced": f,
                            "teacher_forced_correct": bool(ok),
                            "generated": gen,
                        }
                    )
            for i, prediction in zip(rows, in_batch):
                predictions[i] = {"text": eval_set.texts[i], **prediction}
            start += n
    metrics = {"eval_loss": total_loss / max(1, seen)}
    if task == "classification":
        metrics["accuracy"] = float(np.mean([p["pred"] == p["label"] for p in predictions]))
    else:
        metrics["teacher_forced_accuracy"] = float(
            np.mean([p["teacher_forced_correct"] for p in predictions])
        )
        if generate:
            metrics["exact_match"] = float(np.mean([p["generated"] == p["label"] for p in predictions]))
    report = classification_summary(prep, predictions)
    metrics.update({k: report[k] for k in metricsmod.AVERAGES})
    if len(prep.label_names) == 2:
        # Two classes: the second label's F1 (id 1, the positive class), which is what `evaluate`'s
        # "f1" and scikit-learn's binary average report; the macro average stays beside it.
        metrics["f1"] = report["per_class"][prep.label_names[1]]["f1"]
    majority = Counter(prep.train_set.labels).most_common(1)[0][0]
    metrics["majority_class_accuracy"] = float(np.mean([label == majority for label in eval_set.labels]))
    return Evaluation(metrics, predictions, report)


def predicted_label(prediction: dict) -> str:
    """What a prediction row says the class is; seq2seq and causal_lm: the generated text when
    generation ran."""
    if "pred" in prediction:
        return str(prediction["pred"])
    if prediction.get("generated") is not None:
        return str(prediction["generated"])
    # Teacher forcing: the text decodes to the label yet a token is off ([pad, positive] for
    # [positive, </s>]) -> wrong, as in teacher_forced_accuracy.
    text = str(prediction["teacher_forced"])
    return (
        metricsmod.OTHER if text == prediction["label"] and not prediction["teacher_forced_correct"] else text
    )


def classification_summary(prep: Prepared, predictions: list[dict]) -> dict:
    """``metrics.classification_report`` of ``evaluate``'s predictions: averages, per class, confusion."""
    report = metricsmod.classification_report(
        [p["label"] for p in predictions], [predicted_label(p) for p in predictions], prep.label_names
    )
    if prep.recipe.model.task in TEXT_TASKS:
        generated = bool(predictions) and predictions[0].get("generated") is not None
        report["predicted_from"] = "generated" if generated else "teacher_forced"
    return report


def write_evaluation(directory: str | Path, evaluation: Evaluation) -> None:
    """predictions.jsonl, classification_report.json and confusion_matrix.png in ``directory``."""
    directory = Path(directory)
    write_atomic(
        directory / "predictions.jsonl",
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in evaluation.predictions),
    )
    write_json(directory / "classification_report.json", evaluation.report)
    metricsmod.save_confusion_png(evaluation.report, directory / "confusion_matrix.png")
