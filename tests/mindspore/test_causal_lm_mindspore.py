"""``model.task: causal_lm`` on MindSpore (op by op: the compiled graphs are for classifiers): LoRA,
prompt tuning and full fine-tuning on the tiny Llama learn on one batch, a short run's loss falls,
and generation from left-padded prompts writes what each prompt writes alone. The torch twin is
tests/test_causal_lm.py; parity: tests/test_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from dualtune.evaluation import evaluate, generate_text
from dualtune.prepare import prepare
from dualtune.recipe import load_recipe
from dualtune.trainer import train
from helpers import RECIPES, steps_on_one_batch

RECIPE = RECIPES / "smollm2_fpb_gen.yaml"


def causal_recipe(tiny_llama: str, fin_data: str, *extra: str):
    return load_recipe(
        RECIPE,
        [
            f"model.name_or_path={tiny_llama}",
            f"data.source={fin_data}",
            "peft.lora.target_modules=null",
            "train.best_metric=null",
            "schedule.warmup_ratio=null",
            "optim.weight_decay=0",
            *extra,
        ],
    )


@pytest.mark.parametrize(("method", "lr"), [("lora", "3e-2"), ("prompt", "3e-1"), ("none", "1e-2")])
def test_method_learns_and_generates_on_mindspore(ms, tiny_llama, fin_data, method, lr):
    recipe = causal_recipe(tiny_llama, fin_data, f"peft.method={method}", f"optim.lr={lr}")
    prep = prepare(recipe, ms)
    assert ms.compiled(prep.model, prep.params) is None  # op by op
    losses = steps_on_one_batch(ms, prep, 6, float(lr))
    assert losses[-1] < losses[0] - 0.05, losses
    prompts = prep.eval_set.input_ids[:4]
    assert len({len(p) for p in prompts}) > 1
    together = generate_text(ms, prep.model, prep.tokenizer, prompts, None, recipe.data, "causal_lm", method)
    alone = [
        generate_text(ms, prep.model, prep.tokenizer, [p], None, recipe.data, "causal_lm", method)[0]
        for p in prompts
    ]
    assert together == alone


def test_lora_run_loss_falls_on_mindspore(ms, tiny_llama, fin_data):
    recipe = causal_recipe(
        tiny_llama,
        fin_data,
        "optim.lr=3e-2",
        "train.epochs=2",
        "train.max_steps=12",
        "train.dropout=false",
        "data.max_rows=80",
    )
    prep = prepare(recipe, ms)
    records, _ = train(ms, prep)
    losses = [r["loss"] for r in records]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    evaluation = evaluate(ms, prep)
    m = evaluation.metrics
    assert m["exact_match"] == np.mean([p["generated"] == p["label"] for p in evaluation.predictions])
    assert {"eval_loss", "teacher_forced_accuracy", "f1_macro"} <= set(m)
