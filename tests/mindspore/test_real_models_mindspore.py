"""The real SmolLM2 (GGUF package) and all-mpnet-base-v2 (five zip parts) on MindSpore, where the
README's set-up installed them: each loads offline with the corrected tokenizer and 3 LoRA steps on
one short batch lower the loss (the torch twin: tests/test_real_models.py)."""

from __future__ import annotations

import importlib.util

import pytest

from helpers import prepared, steps_on_one_batch
from model_files import REAL_MODELS, REAL_OVERRIDES, real_model_installed

pytestmark = [
    pytest.mark.mindspore,
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf"),
]


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(k, marks=pytest.mark.skipif(not real_model_installed(k), reason=f"{k} not installed"))
        for k in REAL_MODELS
    ],
)
def test_real_model_lora_steps_lower_the_loss(ms, kind, fin_data):
    model, targets = REAL_MODELS[kind]
    prep = prepared(
        ms,
        "minilm_demo.yaml",
        f"model.name_or_path={model}",
        f"data.source={fin_data}",
        f"peft.lora.target_modules={targets}",
        *REAL_OVERRIDES,
    )
    if kind == "smollm2":
        assert (prep.tokenizer.eos_token, prep.tokenizer.pad_token_id) == ("<|im_end|>", 2)
    losses = steps_on_one_batch(ms, prep, steps=3, lr=1e-3)
    assert losses[2] < losses[0] - 1e-3, losses
