"""Whole runs through the CLI on the tiny T5: the run directory, falling loss, adapters that reload in
plain transformers + peft, and failed runs that leave a good run directory alone."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dualtune import data as datamap
from dualtune import runner
from dualtune.data import DataError
from dualtune.recipe import load_recipe
from torch_helpers import RECIPES, run_cli_parallel, teacher_forced_strings, torch_backend

pytestmark = pytest.mark.slow

METHODS = ("prefix", "lora", "bitfit")
EPOCHS, LR = 3, "1e-2"
STEPS = EPOCHS * math.ceil(180 / 8)  # 200 rows, 20 held out, batch 8
RUN_FILES = {
    "recipe.yaml",
    "metrics.jsonl",
    "final_metrics.json",
    "predictions.jsonl",
    "trainable.json",
    "run.log",
    "adapter",
    "classification_report.json",
    "confusion_matrix.png",
}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def run_args(method: str, tiny_t5: str, fin_data: str, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(RECIPES / f"t5_{method}.yaml"),
        "--backend",
        "torch",
        f"model.name_or_path={tiny_t5}",
        f"data.source={fin_data}",
        f"optim.lr={LR}",
        f"train.epochs={EPOCHS}",
        "--output-dir",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def t5_runs(tiny_t5, fin_data, tmp_path_factory) -> dict[str, Path]:
    """The three T5 recipes run by `dualtune run`, side by side (one process each)."""
    root = tmp_path_factory.mktemp("runs")
    out = {m: root / f"t5_{m}" for m in METHODS}
    procs = run_cli_parallel({m: run_args(m, tiny_t5, fin_data, out[m]) for m in METHODS})
    for m, proc in procs.items():
        assert proc.returncode == 0, f"dualtune run t5_{m} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "split" not in r]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the run directory


@pytest.mark.parametrize("method", METHODS)
def test_run_directory(t5_runs, tiny_t5, fin_data, method):
    run = t5_runs[method]
    assert {p.name for p in run.iterdir()} >= RUN_FILES
    assert {p.name for p in (run / "adapter").iterdir()} >= ADAPTER_FILES
    assert [p.name for p in run.parent.iterdir() if ".partial-" in p.name or p.name.endswith(".failed")] == []

    recipe = load_recipe(run / "recipe.yaml")  # the effective recipe, overrides applied
    assert recipe.name == f"t5_{method}" and recipe.peft.method == method
    assert recipe.model.name_or_path == tiny_t5 and recipe.data.source == fin_data
    assert recipe.optim.lr == 0.01 and recipe.train.epochs == EPOCHS

    metrics = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in metrics if "split" not in r]
    evals = [r for r in metrics if r.get("split") == "eval"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [STEPS // EPOCHS * (e + 1) for e in range(EPOCHS)]  # every epoch
    assert all(math.isfinite(r["loss"]) and r["lr"] <= 0.01 for r in steps)

    final = json.loads((run / "final_metrics.json").read_text())
    assert final["backend"] == "torch" and final["steps"] == STEPS
    assert final["first_loss"] == steps[0]["loss"] and final["last_loss"] == steps[-1]["loss"]
    assert final["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])  # same weights, same eval

    predictions = read_jsonl(run / "predictions.jsonl")
    assert len(predictions) == 20
    assert all(
        set(p) == {"text", "label", "teacher_forced", "teacher_forced_correct", "generated"}
        for p in predictions
    )
    assert final["teacher_forced_accuracy"] == np.mean([p["teacher_forced_correct"] for p in predictions])
    # token-exact implies the decoded text is the label; the reverse need not hold ([pad, label])
    assert all(p["teacher_forced"] == p["label"] for p in predictions if p["teacher_forced_correct"])
    assert final["exact_match"] == np.mean([p["generated"] == p["label"] for p in predictions])

    trainable = json.loads((run / "trainable.json").read_text())
    assert trainable["method"] == method
    assert trainable["trainable"] == sum(trainable["tensors"].values()) == final["trainable_parameters"]
    assert trainable["total"] == final["total_parameters"] > trainable["trainable"]

    assert "final: eval_loss=" in (run / "run.log").read_text()
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (
        adapter_config["peft_type"] == {"prefix": "PREFIX_TUNING", "lora": "LORA", "bitfit": "BITFIT"}[method]
    )


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls(t5_runs, method):
    losses = train_losses(t5_runs[method])
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    # measured (lr 1e-2, 3 epochs): prefix 6.47 -> 5.57, lora 4.66 -> 3.17, bitfit 5.72 -> 4.23
    assert last < first - 0.5 and last < 0.9 * first, (first, last)


# ---------------------------------------------------------------- reloading the adapters


def eval_batches(run: Path, tokenizer):
    recipe = load_recipe(run / "recipe.yaml")
    rows = datamap.load_rows(recipe.data)
    _, eval_rows = datamap.split_rows(rows, recipe.data.train_split, recipe.data.seed)
    enc = datamap.encode(eval_rows, tokenizer, recipe.data, recipe.model.task)
    bs = recipe.train.eval_batch_size or recipe.train.batch_size
    return recipe, list(datamap.batches(enc, bs, tokenizer.pad_token_id, recipe.data, recipe.model.task))


def teacher_forced(model, tokenizer, batches) -> list[str]:
    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(**{k: torch.from_numpy(v) for k, v in b.items()}).logits.numpy()
            out += teacher_forced_strings(tokenizer, logits, b["labels"], tokenizer.pad_token_id)
    return out


@pytest.mark.parametrize("method", ["prefix", "lora"])
def test_adapter_reloads_in_plain_peft(t5_runs, tiny_t5, method):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run = t5_runs[method]
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), run / "adapter").eval()
    _, batches = eval_batches(run, tokenizer)
    predictions = read_jsonl(run / "predictions.jsonl")
    assert teacher_forced(model, tokenizer, batches) == [p["teacher_forced"] for p in predictions]
    # and the adapter is what made them: the bare model predicts otherwise
    bare = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    assert teacher_forced(bare, tokenizer, batches) != [p["teacher_forced"] for p in predictions]


def test_bitfit_reloads_through_the_backend(t5_runs, tiny_t5):
    backend = torch_backend()
    run = t5_runs["bitfit"]
    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = backend.load_tokenizer(recipe.model)
    model = backend.load_trained(
        recipe.model, recipe.data.label_names, tokenizer, recipe.peft, run / "adapter"
    )
    model.eval()
    saved = json.loads((run / "trainable.json").read_text())["tensors"]
    params = dict(model.named_parameters())
    assert set(saved) <= set(params)
    assert any(params[n].abs().sum() > 0 for n in saved if n.endswith(".q.bias"))  # trained, not zeros
    _, batches = eval_batches(run, tokenizer)
    predictions = read_jsonl(run / "predictions.jsonl")
    assert teacher_forced(model, tokenizer, batches) == [p["teacher_forced"] for p in predictions]


# ---------------------------------------------------------------- failed runs


def test_nan_run_leaves_good_run_untouched(t5_runs, tiny_t5, fin_data, tmp_path):
    good = tmp_path / "t5_lora"
    shutil.copytree(t5_runs["lora"], good)
    before = tree(good)
    # lr 1e30: the first update sends the weights to +-inf, the loss of step 2 is nan
    # --overwrite: it may replace the good run, but only if it finishes
    proc = run_cli_parallel(
        {"nan": run_args("lora", tiny_t5, fin_data, good, "optim.lr=1e30", "--overwrite")}
    )["nan"]
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "dualtune: error: loss is nan at step 2; lower optim.lr or set optim.grad_clip"
    )
    assert tree(good) == before
    siblings = sorted(p.name for p in tmp_path.iterdir())
    assert siblings == ["t5_lora", "t5_lora.failed"]  # no .partial-*; the failed run is kept aside
    failed = read_jsonl(tmp_path / "t5_lora.failed" / "metrics.jsonl")
    assert [r["step"] for r in failed] == [1]
    assert load_recipe(tmp_path / "t5_lora.failed" / "recipe.yaml").optim.lr == 1e30


def test_bad_data_run_leaves_good_run_untouched(t5_runs, tiny_t5, tmp_path):
    good = tmp_path / "t5_prefix"
    shutil.copytree(t5_runs["prefix"], good)
    before = tree(good)
    bad = tmp_path / "Sentences_AllAgree.txt"
    bad.write_bytes(b"Sales rose 5 % .@positive\nThe company is based in Espoo .@neutral\nno label here\n")
    recipe = load_recipe(RECIPES / "t5_prefix.yaml", [f"model.name_or_path={tiny_t5}", f"data.source={bad}"])
    with pytest.raises(DataError) as err:
        runner.run_recipe(recipe, torch_backend(), good, progress=False, overwrite=True)
    assert str(err.value) == f"{bad}:3: expected 'sentence@label', got 'no label here'"
    assert tree(good) == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
