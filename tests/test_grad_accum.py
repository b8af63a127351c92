"""Gradient accumulation: k micro-batches of b rows per optimizer step is the step of one batch of
k x b rows (the same rows; each micro-batch's mean loss weighted by its share of examples, class
weight or label tokens), on the torch backend. The MindSpore twin is tests/mindspore/test_mindspore_backend.py."""

from __future__ import annotations

import numpy as np
import pytest

from dualtune.backend import get_backend
from dualtune.prepare import prepare
from dualtune.recipe import load_recipe
from dualtune.trainer import train
from helpers import RECIPES

# 52 rows: 41 train, so each epoch ends in a step of 9 rows, cut into micro-batches of 8 + 1 (or 4 + 4 + 1):
# only their shares of examples (tokens) make that step equal to one batch of 9.
CASES = {
    "bert": ("minilm_demo.yaml", ["data.max_rows=52"]),
    "bert-class-weights": ("minilm_demo.yaml", ["data.max_rows=null", "loss.class_weights=balanced"]),
    "t5": ("t5_lora.yaml", ["data.max_rows=52", "train.group_by_length=true"]),  # token means
    # causal_lm: token means over the target tokens (prompts masked out)
    "llama-causal": (
        "smollm2_fpb_gen.yaml",
        [
            "data.max_rows=52",
            "peft.method=none",
            "train.best_metric=null",
            "schedule.warmup_ratio=null",
        ],
    ),
}


def losses(model_dir, data, case, batch_size, accum):
    recipe_file, extra = CASES[case]
    recipe = load_recipe(
        RECIPES / recipe_file,
        [
            f"model.name_or_path={model_dir}",
            f"data.source={data}",
            "train.dropout=false",
            "train.max_steps=5",
            "train.eval_every=1000",
            f"train.batch_size={batch_size}",
            f"train.grad_accum_steps={accum}",
            "optim.lr=1e-2",
            "schedule.warmup_ratio=null",
            *extra,
        ],
    )
    records, state = train(get_backend("torch"), prepare(recipe, get_backend("torch")))
    return (
        np.array([r["loss"] for r in records]),
        np.array([r["grad_norm"] for r in records]),
        [r["tokens"] for r in records],
    )


@pytest.mark.parametrize("case", list(CASES))
def test_two_micro_batches_of_8_are_one_batch_of_16(tiny_bert, tiny_t5, tiny_llama, fin_data, case):
    model_dir = {"t5": tiny_t5, "llama-causal": tiny_llama}.get(case, tiny_bert)
    one_loss, one_norm, one_tokens = losses(model_dir, fin_data, case, 16, 1)
    two_loss, two_norm, two_tokens = losses(model_dir, fin_data, case, 8, 2)
    assert one_tokens == two_tokens  # the same rows in every step
    assert one_loss[-1] < one_loss[0]
    np.testing.assert_allclose(two_loss, one_loss, rtol=1e-6)
    np.testing.assert_allclose(two_norm, one_norm, rtol=1e-5)
    four_loss, _, _ = losses(model_dir, fin_data, case, 4, 4)
    np.testing.assert_allclose(four_loss, one_loss, rtol=1e-6)
