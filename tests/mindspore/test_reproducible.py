"""MindSpore runs are reproducible with dropout on: one recipe and seed give the same losses and the
same adapter bytes in two processes, and ``rng_state``/``set_rng_state`` repeat the next dropout mask.

mindtorch's own dropout draws from a kernel that seeds itself (``std::random_device``), so the
backend draws the masks itself (``dualtune.backends.mindspore.step.DropoutRNG``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import RECIPES, dualtune_cli


def train_losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if "split" not in r]


@pytest.fixture(scope="module")
def runs(tiny_bert, fin_data, tmp_path_factory):
    """Three steps of LoRA on the tiny BERT (LoRA dropout and BERT's dropouts on, as by default):
    twice with seed 42, once with seed 7, once with dropout off. name -> (losses, adapter bytes)."""
    overrides = [
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "schedule.warmup_ratio=null",
        "train.max_steps=3",
        "train.eval_every=1000",
    ]
    root = tmp_path_factory.mktemp("reproducible")
    result = {}
    for name, extra in {
        "a": [],
        "b": [],
        "seed7": ["train.seed=7"],
        "no_dropout": ["train.dropout=false"],
    }.items():
        out = root / name
        dualtune_cli(
            "run",
            str(RECIPES / "minilm_demo.yaml"),
            "--backend",
            "mindspore",
            "--output-dir",
            str(out),
            "--no-progress",
            *overrides,
            *extra,
        )
        result[name] = (train_losses(out), (out / "adapter" / "adapter_model.safetensors").read_bytes())
    return result


def test_same_seed_same_losses_and_adapter(runs):
    (losses_a, adapter_a), (losses_b, adapter_b) = runs["a"], runs["b"]
    assert len(losses_a) == 3
    assert losses_a == losses_b
    assert adapter_a == adapter_b


def test_other_seed_other_first_loss(runs):
    assert runs["seed7"][0][0] != runs["a"][0][0]


def test_dropout_is_on_in_those_runs(runs):
    # Otherwise the first test would pass without any dropout mask drawn.
    assert runs["no_dropout"][0][0] != runs["a"][0][0]


def masks(ms, x, drop):
    import torch

    return [ms.to_numpy(drop(x)).copy(), ms.to_numpy(torch.nn.functional.dropout(x, 0.5, True)).copy()]


def test_rng_state_round_trip_repeats_the_next_dropout_mask(ms, tmp_path):
    import torch
    from safetensors.numpy import load_file, save_file

    x = torch.ones(4, 16, 32)
    drop = torch.nn.Dropout(0.1)
    drop.train()
    ms.seed(3)
    first = masks(ms, x, drop)
    for _ in range(3):
        masks(ms, x, drop)
    state = ms.rng_state()
    assert state and all(isinstance(v, np.ndarray) for v in state.values())
    save_file(state, str(tmp_path / "rng.safetensors"))  # as a checkpoint stores it
    a = masks(ms, x, drop)
    ms.set_rng_state(load_file(str(tmp_path / "rng.safetensors")))
    b = masks(ms, x, drop)
    assert all(np.array_equal(m, n) for m, n in zip(a, b))
    assert not np.array_equal(a[0], first[0])  # each call draws a new mask
    assert set(np.unique(a[0])) == {0.0, np.float32(1 / 0.9)}
    assert 0.85 < (a[0] > 0).mean() < 0.95  # p = 0.1 of 2048 elements


def test_seed_repeats_masks_and_another_seed_does_not(ms):
    import torch

    x = torch.ones(4, 16, 32)
    drop = torch.nn.Dropout(0.1)
    drop.train()
    ms.seed(5)
    a = masks(ms, x, drop)
    ms.seed(5)
    b = masks(ms, x, drop)
    ms.seed(6)
    c = masks(ms, x, drop)
    assert all(np.array_equal(m, n) for m, n in zip(a, b))
    assert not np.array_equal(a[0], c[0])
