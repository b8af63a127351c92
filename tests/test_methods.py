"""Prompt tuning, p-tuning, IA3, decoder LLMs, class-weighted loss and best-checkpoint selection on
the torch backend (the MindSpore suite runs the same method cases in its own process)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualtune import data as datamap
from dualtune import prepare as trainer
from dualtune.data import DataError
from dualtune.recipe import load_recipe
from helpers import METHOD_CASES, RECIPES, assert_method_trains_exactly, dualtune_cli, method_overrides
from torch_helpers import torch_backend


@pytest.fixture(scope="module")
def backend():
    return torch_backend()


@pytest.fixture(scope="module")
def models(tiny_t5, tiny_bert, tiny_llama) -> dict[str, str]:
    return {"t5": tiny_t5, "bert": tiny_bert, "llama": tiny_llama}


def prepare(backend, recipe: str, overrides: list[str]):
    return trainer.prepare(load_recipe(RECIPES / recipe, overrides), backend)


@pytest.mark.parametrize("kind,method", list(METHOD_CASES))
def test_method_trains_exactly_its_parameters(backend, models, fin_data, kind, method):
    recipe, overrides = method_overrides(kind, method, models[kind], fin_data)
    prep = prepare(backend, recipe, overrides)
    assert_method_trains_exactly(backend, prep, METHOD_CASES[(kind, method)][2])


def test_decoder_without_pad_token_needs_pad_token_as_eos(tiny_llama, fin_data, tmp_path):
    proc = dualtune_cli(
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={tiny_llama}",
        f"data.source={fin_data}",
        "--output-dir",
        str(tmp_path / "run"),
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dualtune: error: tokenizer of {tiny_llama} has no pad token; set model.pad_token_as_eos=true (decoder LLMs)"
    )
    assert not (tmp_path / "run").exists()


def test_decoder_pads_with_eos(backend, tiny_llama, fin_data):
    recipe, overrides = method_overrides("llama", "lora", tiny_llama, fin_data)
    prep = prepare(backend, recipe, overrides)
    assert prep.tokenizer.pad_token == prep.tokenizer.eos_token == "</s>"
    assert prep.model.config.pad_token_id == prep.tokenizer.eos_token_id


def test_targets_that_name_nothing_are_one_line(tiny_llama, fin_data, tmp_path):
    # minilm_demo.yaml targets BERT's [query, value]; Llama has q_proj / v_proj
    proc = dualtune_cli(
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={tiny_llama}",
        f"data.source={fin_data}",
        "model.pad_token_as_eos=true",
        "--output-dir",
        str(tmp_path / "run"),
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "dualtune: error: peft.lora: No modules were targeted for adaptation"
    )


# ---------------------------------------------------------------- class-weighted loss


def test_balanced_weights_follow_the_training_split(backend, tiny_bert, fin_data):
    recipe = load_recipe(
        RECIPES / "minilm_demo.yaml",
        [
            f"model.name_or_path={tiny_bert}",
            f"data.source={fin_data}",
            "data.max_rows=null",
            "loss.class_weights=balanced",
        ],
    )
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
    weights = trainer.class_weights(recipe, labels, ["negative", "neutral", "positive"])
    np.testing.assert_allclose(weights, [12 / (3 * 4), 12 / (3 * 2), 12 / (3 * 6)])
    with pytest.raises(
        DataError, match="^loss.class_weights=balanced: label 'neutral' has no training rows$"
    ):
        trainer.class_weights(recipe, [0, 2, 2], ["negative", "neutral", "positive"])


def weighted_ce(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Weighted cross-entropy by hand: sum_i w[y_i] * -log softmax(x_i)[y_i] / sum_i w[y_i]."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(labels)), labels]
    w = weights[labels]
    return float((w * nll).sum() / w.sum())


def test_weighted_loss_equals_hand_computation(backend, tiny_bert, fin_data):
    weights = [0.5, 2.0, 1.25]
    recipe, overrides = method_overrides("bert", "prompt", tiny_bert, fin_data)
    prep = prepare(backend, "minilm_demo.yaml", [*overrides, f"loss.class_weights={weights}"])
    np_batch = next(
        datamap.batches(prep.train_set, 8, prep.tokenizer.pad_token_id, prep.recipe.data, "classification")
    )
    backend.set_training(prep.model, False)
    loss, logits = backend.eval_batch(prep.model, backend.to_tensors(np_batch))
    assert len(set(np_batch["labels"].tolist())) > 1  # the weights matter
    assert loss == pytest.approx(weighted_ce(logits, np_batch["labels"], np.array(weights)), rel=1e-5)
    unweighted = weighted_ce(logits, np_batch["labels"], np.ones(3))
    assert abs(loss - unweighted) > 1e-3
    # and the training step uses the same loss
    step_loss, _ = backend.value_and_grad(prep.model, prep.params, backend.to_tensors(np_batch))
    assert backend.to_float(step_loss) == pytest.approx(loss, rel=1e-5)


# ---------------------------------------------------------------- best checkpoint


def test_best_checkpoint_is_kept(tiny_bert, fin_data, tmp_path):
    """A learning rate too high to settle: the last step is not the best; the kept adapter is."""
    out = tmp_path / "run"
    dualtune_cli(
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "peft.method=none",
        "optim.lr=0.05",
        "train.epochs=1",
        "train.eval_every=2",
        "train.best_metric=eval_loss",
        "--output-dir",
        str(out),
    )
    evals = [
        json.loads(item)
        for item in (out / "metrics.jsonl").read_text().splitlines()
        if '"split": "eval"' in item
    ]
    losses = {r["step"]: r["eval_loss"] for r in evals}
    best_step = min(losses, key=losses.get)
    final = json.loads((out / "final_metrics.json").read_text())
    assert best_step != max(losses), f"the last evaluation was the best; the test needs a worse end: {losses}"
    assert final["selected_step"] == best_step and final["best_metric"] == "eval_loss"
    assert final["eval_loss"] == pytest.approx(losses[best_step], rel=1e-6)
    # the saved adapter is the kept one: evaluating it again gives the same loss
    dualtune_cli("eval", str(out), "--backend", "torch")
    again = json.loads((out / "eval" / "torch" / "metrics.json").read_text())
    assert again["eval_loss"] == pytest.approx(losses[best_step], rel=1e-6)


def test_eval_of_a_weighted_run_reports_the_weighted_loss(tiny_bert, fin_data, tmp_path):
    out = tmp_path / "run"
    dualtune_cli(
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "train.max_steps=3",
        "loss.class_weights=balanced",
        "--output-dir",
        str(out),
    )
    final = json.loads((out / "final_metrics.json").read_text())
    dualtune_cli("eval", str(out), "--backend", "torch")
    again = json.loads((out / "eval" / "torch" / "metrics.json").read_text())
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert again["accuracy"] == final["accuracy"]
