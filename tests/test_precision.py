"""train.precision on the torch backend, on CPU (this machine has AVX2 only: bf16 is slower here):
bf16 and fp16 autocast the forward with float32 weights and AdamW state; fp16 scales the loss and
skips the steps whose gradients overflow, and says how many. Also the run's peak memory in
final_metrics.json, and the one-line refusals (a bad precision; MindSpore, which has no bf16/fp16
CPU kernels)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from safetensors.numpy import load_file

from dualtune.errors import RecipeError
from dualtune.prepare import prepare
from dualtune.recipe import load_recipe
from dualtune.runner import run_recipe
from dualtune.trainer import train
from helpers import RECIPES, dualtune_cli
from torch_helpers import torch_backend

CASES = {"t5": ("t5_lora.yaml", "tiny_t5"), "bert": ("minilm_demo.yaml", "tiny_bert")}
# bf16 against fp32, same seed, dropout off, 8 steps at lr 1e-2 (measured 2026-11-26, torch 2.13 CPU):
# first loss 1.4e-4 (t5) and 1.9e-5 (bert) relative, the largest gap over the 8 steps 1.4e-3 and
# 6.4e-4. Bounds with margin: bf16 keeps 8 bits of mantissa, so 1e-3 is a few of its rounding steps.
BF16_FIRST_LOSS_RTOL = 1e-3
BF16_LOSSES_RTOL = 1e-2
# fp16 (10 bits): measured 4.1e-6 first, 1.2e-4 at most over 8 steps (t5).
FP16_LOSSES_RTOL = 1e-3


def recipe(request, fin_data, case: str, precision: str, *extra: str):
    recipe_file, model_fixture = CASES[case]
    return load_recipe(
        RECIPES / recipe_file,
        [
            f"model.name_or_path={request.getfixturevalue(model_fixture)}",
            f"data.source={fin_data}",
            "data.max_rows=null",
            "train.dropout=false",
            "train.max_steps=8",
            "train.eval_every=1000",
            "train.batch_size=8",
            "optim.lr=1e-2",
            "schedule.warmup_ratio=null",
            f"train.precision={precision}",
            *extra,
        ],
    )


def train_losses(backend, r):
    prep = prepare(r, backend)
    records, state = train(backend, prep)
    return np.array([x["loss"] for x in records]), state, backend.trainable_state(prep.model)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_trains_near_fp32(request, fin_data, case):
    backend = torch_backend()
    fp32, _, _ = train_losses(backend, recipe(request, fin_data, case, "fp32"))
    bf16, state, _ = train_losses(backend, recipe(request, fin_data, case, "bf16"))
    assert bf16[-1] < bf16[0] and state.skipped_steps == 0
    assert not np.array_equal(bf16, fp32)  # autocast is on: bf16 rounds differently
    np.testing.assert_allclose(bf16[0], fp32[0], rtol=BF16_FIRST_LOSS_RTOL)
    np.testing.assert_allclose(bf16, fp32, rtol=BF16_LOSSES_RTOL)


def test_bf16_is_reproducible(request, fin_data):
    backend = torch_backend()
    first, _, weights = train_losses(backend, recipe(request, fin_data, "t5", "bf16"))
    again, _, weights_again = train_losses(backend, recipe(request, fin_data, "t5", "bf16"))
    assert first.tobytes() == again.tobytes()
    assert weights.keys() == weights_again.keys()
    assert all(weights[k].tobytes() == weights_again[k].tobytes() for k in weights)


def test_fp16_trains_without_skips_and_accumulates(request, fin_data):
    backend = torch_backend()
    fp32, _, _ = train_losses(backend, recipe(request, fin_data, "t5", "fp32"))
    fp16, state, _ = train_losses(backend, recipe(request, fin_data, "t5", "fp16"))
    assert state.skipped_steps == 0 and fp16[-1] < fp16[0]
    np.testing.assert_allclose(fp16, fp32, rtol=FP16_LOSSES_RTOL)
    # 2 micro-batches of 4 under one loss scale: the step of one batch of 8 (measured 6e-5 relative)
    accum, _, _ = train_losses(
        backend,
        recipe(request, fin_data, "t5", "fp16", "train.batch_size=4", "train.grad_accum_steps=2"),
    )
    np.testing.assert_allclose(accum, fp16, rtol=1e-3)


@pytest.mark.parametrize("accum", [1, 2])
def test_fp16_overflow_is_skipped_and_counted(request, fin_data, monkeypatch, accum, tmp_path, caplog):
    backend = torch_backend()
    # A loss scale of 2^100 overflows float16 in every backward pass: each step must change nothing.
    monkeypatch.setattr(backend, "fp16_init_scale", 2.0**100)
    r = recipe(
        request,
        fin_data,
        "bert",
        "fp16",
        "train.max_steps=3",
        "train.save_initial=true",
        f"train.batch_size={8 // accum}",
        f"train.grad_accum_steps={accum}",
    )
    with caplog.at_level(logging.INFO, logger="dualtune"):
        run = run_recipe(r, backend, output=tmp_path / "run", progress=False)
    final = json.loads((run / "final_metrics.json").read_text())
    assert (final["precision"], final["skipped_steps"], final["steps"]) == ("fp16", 3, 3)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped") for x in records if "loss" in x] == [True, True, True]
    assert "fp16: 3 of 3 steps skipped (gradients overflowed; the loss scale adapts)" in caplog.messages
    untrained = load_file(run / "adapter_init" / "adapter_model.safetensors")
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    assert untrained.keys() == trained.keys() and len(trained) > 0
    assert all(np.array_equal(untrained[k], trained[k]) for k in trained)


def test_final_metrics_has_peak_memory(request, fin_data, tmp_path):
    backend = torch_backend()
    r = recipe(request, fin_data, "bert", "bf16", "train.max_steps=2")
    run = run_recipe(r, backend, output=tmp_path / "run", progress=False)
    final = json.loads((run / "final_metrics.json").read_text())
    parameter_mb = final["total_parameters"] * 4 / 2**20
    # The process holds at least the model's float32 weights (and torch itself: hundreds of MiB).
    assert final["peak_rss_mb"] > max(parameter_mb, 100)
    assert final["peak_device_memory_mb"] is None  # CPU: no device memory to report
    assert (final["precision"], final["skipped_steps"]) == ("bf16", 0)


def test_bad_precision_is_one_line():
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "t5_lora.yaml", ["train.precision=fp8"])
    assert str(err.value) == "train.precision: got 'fp8' (str), expected 'fp32', 'bf16' or 'fp16'"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mindspore_refuses_mixed_precision_before_loading(tiny_t5, fin_data, precision, tmp_path):
    proc = dualtune_cli(
        "run",
        str(RECIPES / "t5_lora.yaml"),
        "--backend",
        "mindspore",
        "--output-dir",
        str(tmp_path / "run"),
        f"model.name_or_path={tiny_t5}",
        f"data.source={fin_data}",
        f"train.precision={precision}",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"dualtune: error: train.precision {precision}: the mindspore backend trains in fp32 only (MindSpore's "
        "CPU MatMul has no bfloat16/float16 kernel); use train.precision=fp32 or --backend torch"
    ]
    assert not (tmp_path / "run").exists()
