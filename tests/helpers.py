"""Test helpers shared by the torch and MindSpore suites (no framework imports here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from dualtune import data as datamap
from dualtune.prepare import prepare
from dualtune.recipe import load_recipe
from dualtune.trainer import train

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

# The tiny models' shapes (dualtune.tiny): d_model 32, 2 layers, T5 d_ff 64 and 4 attention blocks in
# its decoder + 2 in its encoder, BERT intermediate 64, Llama 2 of 4 heads for keys/values (16 wide).
BERT_HEAD = 32 * 3 + 3  # classifier weight + bias, 3 labels
LLAMA_HEAD = 32 * 3  # score, no bias
MLP_ENCODER = 3 * (32 * 32 + 32)  # p-tuning's MLP: three Linear(32, 32) layers
# (model kind, method) -> (recipe, extra overrides, trainable parameters counted by hand)
METHOD_CASES = {
    ("t5", "prompt"): ("t5_lora.yaml", [], 20 * 2 * 32),  # virtual tokens x (encoder, decoder) x d_model
    ("t5", "p_tuning"): ("t5_lora.yaml", [], 20 * 2 * 32 + MLP_ENCODER),
    ("t5", "ia3"): ("t5_lora.yaml", [], 6 * (32 + 32) + 4 * 64),  # k, v in 6 attention blocks; wo's input
    ("bert", "prompt"): ("minilm_demo.yaml", [], 20 * 32 + BERT_HEAD),
    ("bert", "p_tuning"): ("minilm_demo.yaml", [], 20 * 32 + MLP_ENCODER + BERT_HEAD),
    # key, value (outputs), attention.output.dense and output.dense (inputs: both match "output.dense")
    ("bert", "ia3"): ("minilm_demo.yaml", [], 2 * (32 + 32 + 32 + 64) + BERT_HEAD),
    ("llama", "lora"): (
        "minilm_demo.yaml",
        ["peft.lora.target_modules=null"],
        2 * (8 * (32 + 32) + 8 * (32 + 16)) + LLAMA_HEAD,
    ),  # q_proj 32->32, v_proj 32->16
    ("llama", "prefix"): (
        "minilm_demo.yaml",
        [],
        20 * 2 * 2 * 16 + LLAMA_HEAD,
    ),  # tokens x layers x (k, v) x kv width
    ("llama", "prompt"): ("minilm_demo.yaml", [], 20 * 32 + LLAMA_HEAD),
    ("llama", "p_tuning"): ("minilm_demo.yaml", [], 20 * 32 + MLP_ENCODER + LLAMA_HEAD),
    ("llama", "ia3"): (
        "minilm_demo.yaml",
        [],
        2 * (16 + 16 + 64) + LLAMA_HEAD,
    ),  # k_proj, v_proj, down_proj's input
}

# The offline demo (recipes/minilm_demo.yaml, real MiniLM) with the methods it must learn with.
DEMO_METHODS = {
    "lora": [],
    "prefix": ["peft.method=prefix", "optim.lr=1e-2"],
    "full": ["peft.method=none", "optim.lr=5e-5"],
}


def method_overrides(kind: str, method: str, model_dir: str, data: str) -> tuple[str, list[str]]:
    """The recipe and overrides that run ``method`` on a tiny model of ``kind`` (a METHOD_CASES key)."""
    recipe, extra, _ = METHOD_CASES[(kind, method)]
    overrides = [
        f"model.name_or_path={model_dir}",
        f"data.source={data}",
        f"peft.method={method}",
        "train.max_steps=2",
        "train.eval_every=1000",
        "optim.weight_decay=0",
        *extra,
    ]
    if kind == "llama":
        overrides.append("model.pad_token_as_eos=true")  # Llama ships without a pad token
    if recipe == "minilm_demo.yaml":
        overrides += ["data.max_rows=null", "schedule.warmup_ratio=null"]
    return recipe, overrides


def dualtune_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (one backend per process)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dualtune.cli", *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dualtune {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def prepared(backend, recipe_name: str, *overrides: str):
    return prepare(load_recipe(RECIPES / recipe_name, list(overrides)), backend)


def snapshot(backend, model) -> dict[str, np.ndarray]:
    return {n: backend.to_numpy(p).copy() for n, p in model.named_parameters()}


def first_batch(backend, prep) -> dict:
    r = prep.recipe
    np_batch = next(
        datamap.batches(
            prep.train_set,
            r.train.batch_size,
            prep.tokenizer.pad_token_id,
            r.data,
            r.model.task,
            shuffle_seed=r.train.seed,
        )
    )
    return backend.to_tensors(np_batch)


def steps_on_one_batch(backend, prep, steps: int, lr: float) -> list[float]:
    """AdamW steps on one fixed batch with dropout off: the loss must fall if gradients are real."""
    batch = first_batch(backend, prep)
    optimizer = backend.make_optimizer(prep.params, prep.recipe.optim)
    backend.set_training(prep.model, False)
    losses = []
    for _ in range(steps):
        loss, grads = backend.value_and_grad(prep.model, prep.params, batch)
        grads, _ = backend.clip_grads(grads, None)
        backend.apply_update(optimizer, grads, lr)
        losses.append(backend.to_float(loss))
    return losses


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {n for n in before if not np.array_equal(before[n], after[n])}


def is_key_bias(name: str) -> bool:
    # Adding a constant to every key shifts each query's attention scores by one constant, which
    # softmax ignores: the key bias has an exactly-zero gradient in exact arithmetic (round-off only),
    # so it is trainable but is not required to move.
    return name.endswith((".k.bias", ".key.bias"))


def assert_moved_exactly(before: dict, after: dict, trainable) -> None:
    """Every trainable tensor moved (key biases may not: see is_key_bias) and nothing else did."""
    moved, trainable = changed(before, after), set(trainable)
    assert trainable, "nothing to train"
    assert moved - trainable == set(), f"frozen tensors changed: {sorted(moved - trainable)[:5]}"
    must_move = {n for n in trainable if not is_key_bias(n)}
    assert must_move - moved == set(), f"trainable tensors did not change: {sorted(must_move - moved)[:5]}"


def assert_method_trains_exactly(backend, prep, expected: int) -> None:
    """``expected`` trainable parameters (also peft's own count); four AdamW steps on one batch move
    exactly those and make the loss fall."""
    n_trainable = sum(prep.trainable.values())
    assert n_trainable == expected
    assert prep.model.get_nb_trainable_parameters()[0] == n_trainable  # peft's own count
    before = snapshot(backend, prep.model)
    losses = steps_on_one_batch(backend, prep, steps=4, lr=1e-2)
    assert_moved_exactly(before, snapshot(backend, prep.model), prep.trainable)
    assert losses[-1] < losses[0] - 1e-3, f"loss did not fall on {backend.name}: {losses}"


# Gradient checkpointing (tests/test_gradient_checkpointing.py and its MindSpore twin): LoRA trains inside
# every layer; prompt tuning only before the first, so its gradient crosses every checkpointed layer.
CHECKPOINT_CASES = {
    ("t5", "lora"): "t5_lora.yaml",
    ("t5", "prompt"): "t5_lora.yaml",
    ("bert", "lora"): "minilm_demo.yaml",
}
CHECKPOINTED_LAYERS = ("T5Block", "BertLayer")
# |checkpointed - plain| per gradient tensor, relative to the tensor's largest entry: measured up to 2.8e-7
# (MindSpore, T5 LoRA; torch 2.6e-7, T5 prompt), 0 on BERT.
CHECKPOINT_GRAD_TOL = 2e-6


def count_layer_calls(model) -> list[int]:
    """A counter of the first checkpointable layer's calls, by a forward pre-hook (torch's recompute
    stops as soon as it has what the backward needs, before the layer's forward hooks run)."""
    layer = next(m for m in model.modules() if type(m).__name__ in CHECKPOINTED_LAYERS)
    calls = [0]

    def count(module, args):
        calls[0] += 1

    layer.register_forward_pre_hook(count)
    return calls


def checkpointing_overrides(kind: str, method: str, model_dir: str, data: str, on: bool) -> list[str]:
    overrides = [
        f"model.name_or_path={model_dir}",
        f"data.source={data}",
        f"peft.method={method}",
        f"train.gradient_checkpointing={str(on).lower()}",
        "train.eval_every=1000",
    ]
    return overrides + (["data.max_rows=null", "schedule.warmup_ratio=null"] if kind == "bert" else [])


def gradients_with_checkpointing(backend, kind: str, method: str, model_dir: str, data: str, on: bool):
    """(loss, gradients, calls of the first layer) of one value_and_grad in train mode, dropout off."""
    recipe = CHECKPOINT_CASES[(kind, method)]
    prep = prepared(
        backend, recipe, *checkpointing_overrides(kind, method, model_dir, data, on), "train.dropout=false"
    )
    calls = count_layer_calls(prep.model)
    backend.set_training(prep.model, True)  # transformers checkpoints in train mode only
    loss, grads = backend.value_and_grad(prep.model, prep.params, first_batch(backend, prep))
    return backend.to_float(loss), [backend.to_numpy(g).copy() for g in grads], calls[0]


def assert_same_gradients(plain, checkpointed) -> None:
    """One step with checkpointing is the step without, and the layer really ran twice in it."""
    (loss, grads, calls), (ck_loss, ck_grads, ck_calls) = plain, checkpointed
    assert (calls, ck_calls) == (1, 2), "checkpointing did not recompute the layer"
    np.testing.assert_allclose(ck_loss, loss, rtol=1e-6)
    assert len(ck_grads) == len(grads) and any(np.abs(g).max() > 0 for g in grads)
    for g, ck_g in zip(grads, ck_grads):
        scale = float(np.abs(g).max())
        np.testing.assert_allclose(ck_g, g, rtol=0, atol=CHECKPOINT_GRAD_TOL * scale)


def run_losses_with_checkpointing(backend, model_dir: str, data: str, on: bool, steps: int = 4):
    """(losses, calls of the first layer) of a short T5 LoRA run, dropout on: the recomputed forward
    must draw the masks the first one drew."""
    overrides = checkpointing_overrides("t5", "lora", model_dir, data, on)
    recipe = load_recipe(RECIPES / "t5_lora.yaml", [*overrides, f"train.max_steps={steps}", "optim.lr=1e-2"])
    prep = prepare(recipe, backend)
    calls = count_layer_calls(prep.model)
    records, _ = train(backend, prep)
    return np.array([r["loss"] for r in records]), calls[0]
