"""Test helpers shared by the torch and MindSpore suites (no framework imports here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from dualtune import data as datamap
from dualtune.recipe import load_recipe
from dualtune.trainer import prepare

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def dualtune_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (one backend per process)."""
    proc = subprocess.run([sys.executable, "-m", "dualtune.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"dualtune {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def prepared(backend, recipe_name: str, *overrides: str):
    return prepare(load_recipe(RECIPES / recipe_name, list(overrides)), backend)


def snapshot(backend, model) -> dict[str, np.ndarray]:
    return {n: backend.to_numpy(p).copy() for n, p in model.named_parameters()}


def first_batch(backend, prep) -> dict:
    r = prep.recipe
    np_batch = next(datamap.batches(prep.train, r.train.batch_size, prep.tokenizer.pad_token_id, r.data,
                                    r.model.task, shuffle_seed=r.train.seed))
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
