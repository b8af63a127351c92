"""Prompt tuning, p-tuning, IA3, decoder LLMs and the class-weighted loss on MindSpore: the same
cases as tests/test_methods.py, counted by hand and by peft, with real gradients."""

from __future__ import annotations

import numpy as np
import pytest

from dualtune import data as datamap
from helpers import METHOD_CASES, assert_method_trains_exactly, method_overrides, prepared


@pytest.fixture(scope="module")
def models(tiny_t5, tiny_bert, tiny_llama) -> dict[str, str]:
    return {"t5": tiny_t5, "bert": tiny_bert, "llama": tiny_llama}


@pytest.mark.parametrize("kind,method", list(METHOD_CASES))
def test_method_trains_exactly_its_parameters(ms, models, fin_data, kind, method):
    recipe, overrides = method_overrides(kind, method, models[kind], fin_data)
    prep = prepared(ms, recipe, *overrides)
    assert_method_trains_exactly(ms, prep, METHOD_CASES[(kind, method)][2])


def test_weighted_loss_equals_hand_computation(ms, tiny_bert, fin_data):
    weights = np.array([0.5, 2.0, 1.25])
    recipe, overrides = method_overrides("bert", "ia3", tiny_bert, fin_data)
    prep = prepared(ms, recipe, *overrides, f"loss.class_weights={weights.tolist()}")
    np_batch = next(
        datamap.batches(prep.train_set, 8, prep.tokenizer.pad_token_id, prep.recipe.data, "classification")
    )
    ms.set_training(prep.model, False)
    loss, logits = ms.eval_batch(prep.model, ms.to_tensors(np_batch))
    labels = np_batch["labels"]
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    nll = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(len(labels)), labels]
    assert loss == pytest.approx(float((weights[labels] * nll).sum() / weights[labels].sum()), rel=1e-5)
    assert abs(loss - nll.mean()) > 1e-3
    step_loss, grads = ms.value_and_grad(prep.model, prep.params, ms.to_tensors(np_batch))
    assert ms.to_float(step_loss) == pytest.approx(loss, rel=1e-5)
    assert any(float(np.abs(ms.to_numpy(g)).max()) > 0 for g in grads)
