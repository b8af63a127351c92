"""Cross-backend parity in numbers: `dualtune compare` on tiny models, and adapters that move.

Both backends run as child processes (one backend per process), so this file runs in the torch
suite. Tolerances are the product's promise (fp32, CPU):
  at initialisation: loss relative difference <= 1e-5, logits max abs difference <= 1e-5;
  20 AdamW steps at the recipe's learning rate: per-step loss relative difference <= 1e-3;
  cross-loaded adapters: identical predictions, logits within 1e-4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dualtune.compare import TOLERANCES
from helpers import RECIPES, dualtune_cli

pytestmark = pytest.mark.slow

CASES = {
    "t5_prefix": ("t5_prefix.yaml", []),
    "t5_lora": ("t5_lora.yaml", []),
    "t5_bitfit": ("t5_bitfit.yaml", []),
    "bert_lora": ("minilm_demo.yaml", ["peft.method=lora"]),
    "bert_prefix": ("minilm_demo.yaml", ["peft.method=prefix", "optim.lr=1e-2"]),
    "bert_bitfit": ("minilm_demo.yaml", ["peft.method=bitfit", "optim.lr=1e-3"]),
    "t5_prompt": ("t5_lora.yaml", ["peft.method=prompt", "optim.lr=1e-2"]),
    # p-tuning restarts from adapter_init's exact trainable state (peft saves its tokens post-encoder)
    "t5_p_tuning": ("t5_lora.yaml", ["peft.method=p_tuning"]),
    "t5_ia3": ("t5_lora.yaml", ["peft.method=ia3", "optim.lr=1e-2"]),
    "bert_p_tuning": ("minilm_demo.yaml", ["peft.method=p_tuning", "optim.lr=1e-3"]),
    "bert_full": ("minilm_demo.yaml", ["peft.method=none", "optim.lr=1e-4"]),
    "llama_lora": ("minilm_demo.yaml", ["peft.lora.target_modules=null", "model.pad_token_as_eos=true"]),
    "llama_prompt": (
        "minilm_demo.yaml",
        ["peft.method=prompt", "model.pad_token_as_eos=true", "optim.lr=1e-2"],
    ),
}


def _compare(out: Path, recipe: str, overrides: list[str], steps: int = 20, env=None) -> dict:
    proc = dualtune_cli(
        "compare",
        str(RECIPES / recipe),
        *overrides,
        "--out",
        str(out),
        "--steps",
        str(steps),
        env=env,
        check=False,
    )
    report = json.loads((out / "report.json").read_text())
    assert (proc.returncode == 0) == report["passed"]
    return report


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_t5, tiny_bert, tiny_llama, fin_data):
    """Run every case once; tests below read the reports and run directories."""
    root = tmp_path_factory.mktemp("compare")
    models = {"t5": tiny_t5, "bert": tiny_bert, "llama": tiny_llama}
    results = {}
    for name, (recipe, extra) in CASES.items():
        model = models[name.split("_")[0]]
        overrides = [
            f"model.name_or_path={model}",
            f"data.source={fin_data}",
            "data.max_rows=120",
            "train.epochs=10",
            *extra,
        ]  # >= 20 steps for every case
        results[name] = (root / name, _compare(root / name, recipe, overrides))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_compare_within_tolerances(compared, case):
    out, report = compared[case]
    checks = report["checks"]
    assert checks["init_loss_rel"]["value"] <= TOLERANCES["init_loss_rel"] == 1e-5
    assert checks["init_logits_abs"]["value"] <= TOLERANCES["init_logits_abs"] == 1e-5
    assert checks["step_loss_rel"]["value"] <= TOLERANCES["step_loss_rel"] == 1e-3
    assert len(report["steps"]) == 20
    assert report["passed"]
    # the run really trained on both sides: a flat MindSpore loss is a bug
    losses = [s["loss_mindspore"] for s in report["steps"]]
    assert len(set(losses)) > 15
    assert (out / "loss_curves.png").stat().st_size > 1000


def test_t5_bucket_correction_is_what_makes_parity(tmp_path, tiny_t5, fin_data):
    """Without dualtune/backends/mindspore/compat.py the tiny T5 already disagrees at initialisation."""
    env = {**os.environ, "DUALTUNE_MINDSPORE_COMPAT": "0"}
    report = _compare(
        tmp_path / "nocompat",
        "t5_lora.yaml",
        [f"model.name_or_path={tiny_t5}", f"data.source={fin_data}", "data.max_rows=120"],
        steps=1,
        env=env,
    )
    assert not report["passed"]
    assert report["checks"]["init_logits_abs"]["value"] > 10 * TOLERANCES["init_logits_abs"]


def test_compare_whose_run_fails_is_one_line(tmp_path):
    """The first run fails (its data file is missing): compare stops before the second with the run's
    own error in one line, exit 1 (the comparison failed), and the log that holds the rest."""
    missing = tmp_path / "missing.csv"
    out = tmp_path / "cmp"
    proc = dualtune_cli(
        "compare", str(RECIPES / "minilm_demo.yaml"), f"data.source={missing}", "--out", str(out), check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "compare: training on torch ...",
        f"dualtune: error: the torch run failed (exit 2): data.source {missing}: no such file; "
        f"its log: {out / 'torch'}.log",
    ]
    assert not (out / "mindspore").exists()


def _predictions(path: Path) -> list[dict]:
    return [json.loads(item) for item in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "case",
    [
        "t5_lora",
        "t5_prefix",
        "t5_p_tuning",
        "t5_ia3",
        "bert_lora",
        "bert_prefix",
        "bert_p_tuning",
        "llama_lora",
        "llama_prompt",
    ],
)
def test_mindspore_adapter_loads_in_plain_peft_on_torch(compared, case):
    import torch
    import transformers
    from peft import PeftModel

    from dualtune.backend import get_backend
    from dualtune.evaluation import evaluate
    from dualtune.prepare import Prepared, prepare_data
    from dualtune.recipe import load_recipe

    out, _ = compared[case]
    run = out / "mindspore"
    recipe = load_recipe(run / "recipe.yaml")
    backend = get_backend("torch")
    tokenizer, names, enc_train, enc_eval = prepare_data(recipe, backend)
    if recipe.model.task == "seq2seq":
        base = transformers.AutoModelForSeq2SeqLM.from_pretrained(recipe.model.name_or_path)
    else:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            recipe.model.name_or_path, num_labels=len(names)
        )
        base.config.pad_token_id = tokenizer.pad_token_id  # Llama: eos, as the recipe says
    model = PeftModel.from_pretrained(base, str(run / "adapter"))  # plain peft, nothing of dualtune
    assert isinstance(model.base_model, torch.nn.Module)
    preds = evaluate(backend, Prepared(recipe, tokenizer, names, enc_train, enc_eval, model, [])).predictions
    saved = _predictions(run / "predictions.jsonl")
    assert len(preds) == len(saved) > 0
    if recipe.model.task == "seq2seq":
        assert [p["teacher_forced"] for p in preds] == [p["teacher_forced"] for p in saved]
        assert [p["generated"] for p in preds] == [p["generated"] for p in saved]
    else:
        assert [p["pred"] for p in preds] == [p["pred"] for p in saved]
        diff = np.abs(np.array([p["logits"] for p in preds]) - np.array([p["logits"] for p in saved])).max()
        assert diff <= 1e-4


@pytest.mark.parametrize(
    "case", ["t5_lora", "t5_bitfit", "t5_prompt", "bert_prefix", "bert_bitfit", "bert_full", "llama_lora"]
)
def test_torch_adapter_evaluates_the_same_on_mindspore(compared, case):
    out, _ = compared[case]
    dualtune_cli("eval", str(out / "torch"), "--backend", "mindspore")
    got = _predictions(out / "torch" / "eval" / "mindspore" / "predictions.jsonl")
    saved = _predictions(out / "torch" / "predictions.jsonl")
    assert len(got) == len(saved) > 0
    key = "pred" if "pred" in saved[0] else "generated"
    assert [p[key] for p in got] == [p[key] for p in saved]
    if key == "pred":
        diff = np.abs(np.array([p["logits"] for p in got]) - np.array([p["logits"] for p in saved])).max()
        assert diff <= 1e-4
    else:
        assert [p["teacher_forced"] for p in got] == [p["teacher_forced"] for p in saved]


# causal_lm (recipes/smollm2_fpb_gen.yaml on the tiny Llama): LoRA, and full fine-tuning, which
# learns fast enough in 20 steps that the generated texts say something
CAUSAL_CASES = {
    "llama_causal_lora": ["peft.lora.target_modules=null", "optim.lr=3e-2"],
    "llama_causal_full": ["peft.method=none", "optim.lr=1e-2"],
}


@pytest.fixture(scope="module")
def causal_compared(tmp_path_factory, tiny_llama, fin_data):
    root = tmp_path_factory.mktemp("compare-causal")
    results = {}
    for name, extra in CAUSAL_CASES.items():
        overrides = [
            f"model.name_or_path={tiny_llama}",
            f"data.source={fin_data}",
            "train.best_metric=null",
            "schedule.warmup_ratio=null",
            *extra,
        ]
        results[name] = (root / name, _compare(root / name, "smollm2_fpb_gen.yaml", overrides))
    return results


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_causal_lm_compare_within_tolerances_and_generates_the_same_text(causal_compared, case):
    out, report = causal_compared[case]
    checks = report["checks"]
    assert checks["init_loss_rel"]["value"] <= TOLERANCES["init_loss_rel"]
    assert checks["init_logits_abs"]["value"] <= TOLERANCES["init_logits_abs"]
    assert checks["step_loss_rel"]["value"] <= TOLERANCES["step_loss_rel"]
    assert len(report["steps"]) == 20 and report["passed"]
    losses = [s["loss_mindspore"] for s in report["steps"]]
    assert len(set(losses)) > 15 and losses[-1] < losses[0]
    generated = {
        side: [p["generated"] for p in _predictions(out / side / "predictions.jsonl")]
        for side in ("torch", "mindspore")
    }
    assert generated["torch"] == generated["mindspore"]
    if case == "llama_causal_full":
        assert any(generated["torch"])  # some rows already write a label word
    # MindSpore's compiled graphs are for classifiers; a causal LM runs op by op
    assert "op by op, no compiled graphs: LlamaForCausalLM" in (out / "mindspore.log").read_text()
