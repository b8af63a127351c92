"""Everything a run needs before its first step: the data (loaded, split, tokenized), the model with
the PEFT method applied, and its trainable parameters. Framework-free: the backend loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dualtune import data as datamap
from dualtune.backend import Backend, check_precision
from dualtune.errors import DataError
from dualtune.recipe import Recipe, is_head_parameter

log = logging.getLogger("dualtune")
# Below this share of the parameters, BitFit has found almost nothing to train (t5-small: 0.0008 %).
BITFIT_TOO_FEW = 1e-4


@dataclass
class Prepared:
    """Everything a run needs before the first step: data, model, trainable parameters."""

    recipe: Recipe
    tokenizer: Any
    label_names: list[str]
    train_set: datamap.Encoded
    eval_set: datamap.Encoded
    model: Any
    params: list
    trainable: dict[str, int] = field(default_factory=dict)
    total_params: int = 0
    class_weights: np.ndarray | None = None  # the loss's per-class weights (loss.class_weights)


def prepare_data(recipe: Recipe, backend: Backend) -> tuple[Any, list[str], datamap.Encoded, datamap.Encoded]:
    """(tokenizer, label names, encoded train split, encoded eval split)."""
    tokenizer = backend.load_tokenizer(recipe.model)
    rows = datamap.load_rows(recipe.data)
    train_rows, eval_rows = datamap.split_rows(rows, recipe.data.train_split, recipe.data.seed)
    task = recipe.model.task
    return (
        tokenizer,
        rows.label_names,
        datamap.encode(train_rows, tokenizer, recipe.data, task),
        datamap.encode(eval_rows, tokenizer, recipe.data, task),
    )


def prepare(recipe: Recipe, backend: Backend) -> Prepared:
    check_precision(backend.name, backend.device, recipe.train.precision)
    backend.precision = recipe.train.precision
    tokenizer, label_names, enc_train, enc_eval = prepare_data(recipe, backend)
    task = recipe.model.task
    backend.seed(recipe.train.seed)
    model = backend.load_model(recipe.model, label_names, tokenizer)
    if recipe.train.gradient_checkpointing:  # before the method, as peft expects
        backend.enable_gradient_checkpointing(model)
    model = backend.apply_peft(model, recipe.peft, task, recipe.train.seed)
    if recipe.peft.init_from:
        backend.load_weights(model, Path(recipe.peft.init_from), recipe.peft)
        log.info("adapter initialised from %s", recipe.peft.init_from)
    if not recipe.train.dropout:
        log.info("dropout off in %d modules", backend.disable_dropout(model))
    weights = class_weights(recipe, enc_train.labels, label_names)
    backend.set_class_weights(model, weights)
    named = backend.trainable_parameters(model)
    prepared = Prepared(
        recipe,
        tokenizer,
        label_names,
        enc_train,
        enc_eval,
        model,
        [p for _, p in named],
        {n: int(p.numel()) for n, p in named},
        backend.parameter_count(model),
        weights,
    )
    report_trainable(prepared)
    return prepared


def class_weights(recipe: Recipe, train_labels: list[int], label_names: list[str]) -> np.ndarray | None:
    """The loss's per-class weights (``loss.class_weights``), counted on the training split."""
    spec, n = recipe.loss.class_weights, len(label_names)
    if spec is None:
        return None
    if spec != "balanced":
        if len(spec) != n:
            raise DataError(f"loss.class_weights has {len(spec)} weights for the data's {n} labels")
        return np.asarray(spec, dtype=np.float64)
    counts = np.bincount(train_labels, minlength=n)
    if not counts.all():
        missing = label_names[int(np.argmin(counts))]
        raise DataError(f"loss.class_weights=balanced: label {missing!r} has no training rows")
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(n), y=np.asarray(train_labels))
    log.info("class weights: %s", ", ".join(f"{name}={w:.3f}" for name, w in zip(label_names, weights)))
    return weights


def report_trainable(prep: Prepared) -> None:
    n_train = sum(prep.trainable.values())
    share = n_train / max(1, prep.total_params)
    log.info(
        "method %s: %d trainable tensors, %s of %s parameters (%.4f %%)",
        prep.recipe.peft.method,
        len(prep.trainable),
        f"{n_train:,}",
        f"{prep.total_params:,}",
        100 * share,
    )
    for name, count in prep.trainable.items():
        log.debug("  trains %s (%d)", name, count)
    if prep.recipe.peft.method == "bitfit":
        # Real biases are named *.bias; T5's relative_attention_bias.weight matches "bias" but is a table.
        biases = sum(c for n, c in prep.trainable.items() if n.endswith(".bias") and not is_head_parameter(n))
        if biases / max(1, prep.total_params) < BITFIT_TOO_FEW:
            log.warning(
                "BitFit found almost nothing to train: %d bias parameters (%.5f %% of the model). "
                "Bias-free models such as T5 need peft.bitfit.add_bias_to=[q,k,v,o,wi,wo] to add "
                "zero-initialised biases",
                biases,
                100 * biases / max(1, prep.total_params),
            )
