"""Gradient accumulation on MindSpore: 2 micro-batches of 8 are one batch of 16 (as on torch,
tests/test_grad_accum.py), seq2seq token means over micro-batches of other sizes included."""

from __future__ import annotations

import numpy as np
import pytest

from dualtune.prepare import prepare
from dualtune.recipe import load_recipe
from dualtune.trainer import train
from helpers import RECIPES


def losses(ms, model_dir, data, recipe_file, batch_size, accum, extra):
    recipe = load_recipe(
        RECIPES / recipe_file,
        [
            f"model.name_or_path={model_dir}",
            f"data.source={data}",
            "train.dropout=false",
            "train.max_steps=4",
            "train.eval_every=1000",
            f"train.batch_size={batch_size}",
            f"train.grad_accum_steps={accum}",
            "optim.lr=1e-2",
            "schedule.warmup_ratio=null",
            "data.max_rows=52",
            *extra,
        ],
    )  # 41 train rows: 16+16+9
    records, _ = train(ms, prepare(recipe, ms))
    return np.array([r["loss"] for r in records])


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_two_micro_batches_of_8_are_one_batch_of_16(ms, tiny_t5, tiny_bert, fin_data, kind):
    recipe_file, model_dir = ("t5_lora.yaml", tiny_t5) if kind == "t5" else ("minilm_demo.yaml", tiny_bert)
    extra = ["train.group_by_length=true"] if kind == "t5" else ["loss.class_weights=balanced"]
    one = losses(ms, model_dir, fin_data, recipe_file, 16, 1, extra)
    two = losses(ms, model_dir, fin_data, recipe_file, 8, 2, extra)
    assert one[-1] < one[0]
    np.testing.assert_allclose(two, one, rtol=1e-6)
