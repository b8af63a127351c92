"""The MindSpore backend: real gradients, exactly the intended parameters, the compat corrections."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dualtune.backend import BackendError, get_backend
from dualtune.optim import adamw_reference, clip_scale
from dualtune.recipe import OptimSpec
from helpers import (
    DEMO_METHODS,
    RECIPES,
    assert_moved_exactly,
    dualtune_cli,
    first_batch,
    prepared,
    snapshot,
    steps_on_one_batch,
)

T5_METHODS = {
    # method: (recipe, overrides, expected trainable parameter count for the tiny T5)
    "prefix": ("t5_prefix.yaml", [], 20 * 2 * 2 * 32),  # tokens x decoder layers x (k, v) x d_model
    "lora": ("t5_lora.yaml", [], 6 * 2 * (8 * 32 + 32 * 8)),  # (2 enc + 4 dec attention) x (q, v) x (A + B)
    "bitfit": ("t5_bitfit.yaml", [], None),
    "none": ("t5_lora.yaml", ["peft.method=none"], None),
}


def test_process_runs_mindtorch(ms):
    import torch

    assert "mindtorch" in torch.__file__
    assert ms.name == "mindspore"


def test_torch_after_mindspore_is_refused(ms):
    with pytest.raises(BackendError) as err:
        get_backend("torch")
    assert str(err.value) == (
        "the mindspore backend is already active in this process; torch needs a "
        "process of its own (mindnlp takes over `import torch` for the whole process)"
    )
    from dualtune.backends import torch as torch_backend

    with pytest.raises(BackendError, match="the torch backend cannot start: MindSpore"):
        torch_backend.create("cpu")


@pytest.mark.parametrize("method", list(T5_METHODS))
def test_t5_method_trains_exactly_its_parameters(ms, tiny_t5, fin_data, method):
    recipe, extra, expected = T5_METHODS[method]
    prep = prepared(ms, recipe, f"model.name_or_path={tiny_t5}", f"data.source={fin_data}", *extra)
    n_trainable = sum(prep.trainable.values())
    if expected is not None:
        assert n_trainable == expected
    if method in ("prefix", "lora"):
        assert prep.model.get_nb_trainable_parameters()[0] == n_trainable  # peft's own count
    if method == "bitfit":
        # zero biases on q,k,v,o (3 attention blocks x 2 layers) and wi, wo (2 x 2 ff blocks),
        # plus the two relative_attention_bias tables (32 buckets x 4 heads)
        attn = 3 * 2 * 4 * 32
        ff = 2 * 2 * (64 + 32)
        assert n_trainable == attn + ff + 2 * 32 * 4
    if method == "none":
        assert n_trainable == prep.total_params
    before = snapshot(ms, prep.model)
    losses = steps_on_one_batch(ms, prep, steps=4, lr=1e-2)
    assert_moved_exactly(before, snapshot(ms, prep.model), prep.trainable)
    assert losses[-1] < losses[0] - 1e-3, f"loss did not fall on MindSpore: {losses}"


@pytest.mark.parametrize("method", ["lora", "prefix", "bitfit", "none"])
def test_classification_method_trains_exactly_its_parameters(ms, tiny_bert, fin_data, method):
    prep = prepared(
        ms,
        "minilm_demo.yaml",
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        f"peft.method={method}",
        "peft.lora.target_modules=[query,value]",
    )
    head = 32 * 3 + 3
    n_trainable = sum(prep.trainable.values())
    if method == "lora":
        assert n_trainable == 2 * 2 * 8 * (32 + 32) + head
    if method == "prefix":
        assert n_trainable == 20 * 2 * 2 * 32 + head
    if method in ("lora", "prefix"):
        assert prep.model.get_nb_trainable_parameters()[0] == n_trainable
    before = snapshot(ms, prep.model)
    losses = steps_on_one_batch(ms, prep, steps=4, lr=1e-2)
    assert_moved_exactly(before, snapshot(ms, prep.model), prep.trainable)
    assert losses[-1] < losses[0] - 1e-3, f"loss did not fall on MindSpore: {losses}"


def test_adamw_update_matches_reference(ms):
    """AdamW runs on one vector of every parameter (dualtune/backends/mindspore/step.py): each parameter of
    each shape still gets its own reference values, clipped steps and unclipped ones, and the
    moments come back per parameter (the checkpoint's layout)."""
    import mindspore
    import torch

    spec = OptimSpec(lr=1e-2, weight_decay=0.1, grad_clip=0.5)
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (2, 1, 3)]
    init = [rng.normal(size=s).astype(np.float32) for s in shapes]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    optimizer = ms.make_optimizer(params, spec)
    ref = [x.astype(np.float64) for x in init]
    m, v = [np.zeros(s) for s in shapes], [np.zeros(s) for s in shapes]
    scales = []
    for step, lr in enumerate([1e-2, 5e-3, 2e-3, 1e-3], 1):
        size = 1.0 if step % 2 else 0.01  # alternately clipped and not
        grads = [rng.normal(scale=size, size=s).astype(np.float32) for s in shapes]
        clipped, norm = ms.clip_grads([torch.tensor(g) for g in grads], spec.grad_clip)
        assert norm == pytest.approx(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads)), rel=1e-6)
        scales.append(clip_scale(norm, spec.grad_clip))
        ms.apply_update(optimizer, clipped, lr)
        for i, g in enumerate(grads):
            ref[i], m[i], v[i] = adamw_reference(ref[i], g * scales[-1], m[i], v[i], step, lr, spec)
        for param, r in zip(params, ref):
            np.testing.assert_allclose(ms.to_numpy(param), r, rtol=1e-5, atol=1e-7)
    assert min(scales) < 0.5 and max(scales) == 1.0
    state = ms.optimizer_state(optimizer)
    assert state["step"] == 4
    for got, want in zip(state["exp_avg"] + state["exp_avg_sq"], m + v):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    # loaded back into a fresh optimizer: the next update is the same bytes as the first's
    again = ms.make_optimizer(params, spec)
    ms.load_optimizer_state(again, state)
    before = [ms.to_numpy(p).copy() for p in params]
    g = [torch.tensor(rng.normal(size=s).astype(np.float32)) for s in shapes]
    ms.apply_update(optimizer, g, 1e-3)
    first = [ms.to_numpy(p).copy() for p in params]
    for p, b in zip(params, before):
        mindspore.ops.assign(p, mindspore.Tensor(b))
    ms.apply_update(again, g, 1e-3)
    assert all(np.array_equal(ms.to_numpy(p), f) for p, f in zip(params, first))


def test_t5_bucket_correction(ms):
    """Without compat.apply(), T5's buckets on MindSpore CPU differ at |rp| = 16, 32, 64."""
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    from dualtune.backends.mindspore.compat import relative_position_bucket_np

    rp = np.arange(-200, 201)
    for bidirectional in (True, False):
        truth = relative_position_bucket_np(rp, bidirectional, 32, 128)
        got = T5Attention._relative_position_bucket(torch.tensor(rp), bidirectional, 32, 128)
        np.testing.assert_array_equal(ms.to_numpy(got), truth)
    # the float64 reference itself: exact integer logs land on the upper bucket
    assert relative_position_bucket_np(np.array([16, 32, 64, -16]), True, 32, 128).tolist() == [
        26,
        28,
        30,
        10,
    ]


def test_hf_endpoint_left_as_the_user_had_it(tmp_path):
    code = (
        "import os; from dualtune.backend import get_backend; "
        "get_backend('mindspore'); import huggingface_hub.constants as c; "
        "print(os.environ.get('HF_ENDPOINT'), c.ENDPOINT)"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-2:] == ["None", "https://huggingface.co"]


def test_cli_run_on_mindspore(tmp_path, tiny_t5, fin_data):
    """A whole `dualtune run` on MindSpore and the run folder it leaves. One recipe: the other two
    flagship recipes train on MindSpore through `dualtune compare` in tests/test_parity.py."""
    out = tmp_path / "run"
    dualtune_cli(
        "run",
        str(RECIPES / "t5_lora.yaml"),
        "--backend",
        "mindspore",
        f"model.name_or_path={tiny_t5}",
        f"data.source={fin_data}",
        "data.max_rows=80",
        "train.max_steps=6",
        "optim.lr=1e-2",
        "train.batch_size=4",
        "--output-dir",
        str(out),
    )
    assert sorted(p.name for p in out.iterdir()) == [
        ".dualtune-run",
        "adapter",
        "classification_report.json",
        "confusion_matrix.png",
        "data.json",
        "environment.json",
        "final_metrics.json",
        "loss_curve.png",
        "metrics.jsonl",
        "predictions.jsonl",
        "recipe.yaml",
        "run.log",
        "trainable.json",
    ]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["backend"] == "mindspore" and final["steps"] == 6
    steps = [json.loads(item) for item in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(set(losses)) == len(losses), "a MindSpore loss that does not move is a bug"


@pytest.mark.slow
def test_offline_demo_beats_majority_on_mindspore(tmp_path):
    """The README's demo command with --backend mindspore: the recipe as shipped (LoRA). Its prefix
    and full fine-tuning variants train on torch in tests/test_demo.py, and tests/test_parity.py
    holds MindSpore to torch's numbers for both on the tiny BERT (bert_prefix, bert_full). Three
    3-epoch MiniLM runs op by op were 40 % of this suite's time (10.4 of 26.7 minutes)."""
    out = tmp_path / "demo"
    dualtune_cli(
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        "--backend",
        "mindspore",
        *DEMO_METHODS["lora"],
        "--output-dir",
        str(out),
    )
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["accuracy"] >= final["majority_class_accuracy"] + 0.15, final
    assert final["last_loss"] < final["first_loss"]
    assert final["f1_macro"] >= 0.85, final  # every class predicted (macro F1 0.59 before, on q, v)


# Which encoders stay out of MindSpore's gradient recording: frozen, and not fed by a prompt.
FROZEN_ENCODER_CASES = {
    "prefix": ("t5_prefix.yaml", [], True),
    "lora": ("t5_lora.yaml", [], False),
    "lora on the decoder only": ("t5_lora.yaml", ["peft.lora.target_modules=[EncDecAttention.q]"], True),
    "prompt": ("t5_lora.yaml", ["peft.method=prompt"], False),
    "p_tuning": ("t5_lora.yaml", ["peft.method=p_tuning"], False),
    "bitfit": ("t5_bitfit.yaml", [], False),
}


@pytest.mark.parametrize("case", list(FROZEN_ENCODER_CASES))
def test_frozen_encoder_gives_the_same_loss_and_gradients(ms, tiny_t5, fin_data, monkeypatch, case):
    import dualtune.backends.mindspore.step as backend_module

    recipe, extra, frozen = FROZEN_ENCODER_CASES[case]
    prep = prepared(ms, recipe, f"model.name_or_path={tiny_t5}", f"data.source={fin_data}", *extra)
    assert (backend_module.frozen_encoder(prep.model, prep.params) is not None) == frozen
    batch = first_batch(ms, prep)
    ms.set_training(prep.model, False)
    ms._grad_fns.clear()
    loss, grads = ms.value_and_grad(prep.model, prep.params, batch)
    ms._grad_fns.clear()
    monkeypatch.setattr(backend_module, "frozen_encoder", lambda model, params: None)
    whole_loss, whole_grads = ms.value_and_grad(prep.model, prep.params, batch)
    ms._grad_fns.clear()
    assert ms.to_float(loss) == ms.to_float(whole_loss)
    assert any(np.abs(ms.to_numpy(g)).max() > 0 for g in grads)
    for g, w in zip(grads, whole_grads):
        np.testing.assert_allclose(ms.to_numpy(g), ms.to_numpy(w), rtol=1e-6, atol=1e-9)


def test_a_run_and_its_eval_say_only_what_concerns_them(tmp_path, tiny_bert, fin_data):
    out = tmp_path / "run"
    run = dualtune_cli(
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        "--backend",
        "mindspore",
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "train.max_steps=2",
        "--output-dir",
        str(out),
        "--no-progress",
    )
    for noise in ("Modular Diffusers", "mindtorch corrections", "T5Attention"):
        assert noise not in run.stderr
    ev = dualtune_cli("eval", str(out), "--backend", "mindspore")
    assert "newly initialized" not in ev.stderr and "You should probably TRAIN" not in ev.stderr


def test_mixed_precision_is_refused_before_the_model_loads(ms, tmp_path):
    """bf16/fp16 through the library (no `dualtune validate` first): prepare refuses before loading.
    Measured on MindSpore 2.7.0 CPU: MatMul has no bfloat16 kernel, under mindtorch's autocast too."""
    import torch

    with pytest.raises(BackendError) as err:
        prepared(
            ms,
            "t5_lora.yaml",
            f"model.name_or_path={tmp_path / 'no-model-here'}",  # never read: the refusal comes first
            f"data.source={tmp_path / 'no-data-here.jsonl'}",
            "train.precision=bf16",
        )
    assert str(err.value) == (
        "train.precision bf16: the mindspore backend trains in fp32 only (MindSpore's CPU MatMul has no "
        "bfloat16/float16 kernel); use train.precision=fp32 or --backend torch"
    )
    assert ms.precision == "fp32"
    # the fact the refusal rests on: if a MindSpore release adds the kernel, this fails and says so
    layer = torch.nn.Linear(4, 2)
    with pytest.raises(TypeError, match="MatMul"), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.ones(3, 4))
