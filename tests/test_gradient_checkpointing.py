"""train.gradient_checkpointing on the torch backend: transformers' own checkpointing (not reentrant)
gives the gradients and the losses of a run without it, and really recomputes each layer. The
MindSpore twin is tests/mindspore/test_gradient_checkpointing_mindspore.py."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from dualtune.errors import BackendError, RecipeError
from dualtune.recipe import load_recipe
from helpers import (
    CHECKPOINT_CASES,
    RECIPES,
    assert_same_gradients,
    checkpointing_overrides,
    gradients_with_checkpointing,
    prepared,
    run_losses_with_checkpointing,
)
from torch_helpers import torch_backend


@pytest.fixture(scope="module")
def backend():
    return torch_backend()


@pytest.mark.parametrize("kind,method", list(CHECKPOINT_CASES))
def test_checkpointing_gives_the_same_gradients(backend, tiny_t5, tiny_bert, fin_data, kind, method):
    model_dir = tiny_t5 if kind == "t5" else tiny_bert
    plain = gradients_with_checkpointing(backend, kind, method, model_dir, fin_data, on=False)
    checkpointed = gradients_with_checkpointing(backend, kind, method, model_dir, fin_data, on=True)
    assert_same_gradients(plain, checkpointed)


def test_checkpointed_run_matches_plain_run(backend, tiny_t5, fin_data):
    plain, calls = run_losses_with_checkpointing(backend, tiny_t5, fin_data, on=False)
    checkpointed, ck_calls = run_losses_with_checkpointing(backend, tiny_t5, fin_data, on=True)
    assert (calls, ck_calls) == (4, 8)  # one forward per step; with checkpointing one more in backward
    assert plain[-1] < plain[0]
    np.testing.assert_allclose(checkpointed, plain, rtol=1e-6)


def test_prefix_tuning_is_refused():
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "t5_prefix.yaml", ["train.gradient_checkpointing=true"])
    assert str(err.value) == (
        "train.gradient_checkpointing does not work with peft.method=prefix: transformers drops the "
        "prefix (past_key_values) inside checkpointed layers"
    )


def test_model_without_checkpointing_is_refused(backend, tiny_bert, fin_data, monkeypatch):
    monkeypatch.setattr(transformers.BertPreTrainedModel, "supports_gradient_checkpointing", False)
    with pytest.raises(BackendError) as err:
        prepared(
            backend, "minilm_demo.yaml", *checkpointing_overrides("bert", "lora", tiny_bert, fin_data, True)
        )
    assert str(err.value) == (
        "train.gradient_checkpointing: transformers cannot checkpoint BertForSequenceClassification"
    )
