"""The seam, shown by a third framework: a backend that writes only the ``FrameworkStep`` methods.

``NumpyStep`` keeps the trainable tensors' update in numpy (clipping by ``dualtune.optim.clip_scale``,
AdamW by ``dualtune.optim.adamw_reference``) and borrows only autograd from torch: everything else
(loading, PEFT, evaluation, saving) comes from ``HFBackend``. The core drives it unchanged, and it
trains to the same losses as the torch backend.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dualtune.backend import Backend, FrameworkStep
from dualtune.backends.hf.backend import HFBackend
from dualtune.optim import adamw_reference, clip_scale
from dualtune.recipe import load_recipe
from dualtune.runner import run_recipe
from helpers import RECIPES


class NumpyStep(HFBackend):
    """The framework step in numpy; the whole file a new framework needs, for Hugging Face models."""

    name = "numpy"
    torch_device = "cpu"

    def seed(self, seed):
        torch.manual_seed(seed)

    def rng_state(self):
        return {"cpu": torch.get_rng_state().numpy().copy()}

    def set_rng_state(self, state):
        torch.set_rng_state(torch.from_numpy(state["cpu"]))

    def to_tensors(self, batch):
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def value_and_grad(self, model, params, batch):
        for p in params:
            p.grad = None
        loss = self._forward(model, batch).loss
        loss.backward()
        return loss.detach(), [p.grad.numpy().astype(np.float64) for p in params]

    def clip_grads(self, grads, max_norm):
        norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads)))
        scale = clip_scale(norm, max_norm)
        return [g * scale for g in grads], norm

    def make_optimizer(self, params, optim_spec):
        return {
            "params": params,
            "spec": optim_spec,
            "step": 0,
            "exp_avg": [np.zeros(tuple(p.shape)) for p in params],
            "exp_avg_sq": [np.zeros(tuple(p.shape)) for p in params],
        }

    def apply_update(self, optimizer, grads, lr):
        optimizer["step"] += 1
        for i, (p, g) in enumerate(zip(optimizer["params"], grads)):
            new, optimizer["exp_avg"][i], optimizer["exp_avg_sq"][i] = adamw_reference(
                p.detach().numpy().astype(np.float64),
                g,
                optimizer["exp_avg"][i],
                optimizer["exp_avg_sq"][i],
                optimizer["step"],
                lr,
                optimizer["spec"],
            )
            with torch.no_grad():
                p.copy_(torch.from_numpy(new.astype(np.float32)))

    def optimizer_state(self, optimizer):
        return {k: optimizer[k] for k in ("step", "exp_avg", "exp_avg_sq")}

    def load_optimizer_state(self, optimizer, state):
        optimizer.update(
            {
                "step": int(state["step"]),
                "exp_avg": [np.asarray(a, np.float64) for a in state["exp_avg"]],
                "exp_avg_sq": [np.asarray(a, np.float64) for a in state["exp_avg_sq"]],
            }
        )


def test_the_framework_step_is_all_a_framework_writes():
    # Every abstract method HFBackend leaves open is a FrameworkStep method, and NumpyStep fills them.
    step_methods = {n for n, v in vars(FrameworkStep).items() if getattr(v, "__isabstractmethod__", False)}
    assert HFBackend.__abstractmethods__ == step_methods
    assert len(step_methods) == 10
    assert not NumpyStep.__abstractmethods__
    assert isinstance(NumpyStep("cpu"), Backend)


def _losses(run) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_core_drives_a_numpy_step_to_torchs_numbers(tiny_bert, fin_data, tmp_path, clip):
    from dualtune.backend import get_backend

    recipe = load_recipe(
        RECIPES / "minilm_demo.yaml",
        [
            f"model.name_or_path={tiny_bert}",
            f"data.source={fin_data}",
            "data.max_rows=null",
            "train.max_steps=6",
            "train.eval_every=3",
            "train.dropout=false",
            "optim.lr=1e-2",
            f"optim.grad_clip={clip or 'null'}",
        ],
    )
    ours = run_recipe(recipe, NumpyStep("cpu"), tmp_path / "numpy", progress=False)
    theirs = run_recipe(recipe, get_backend("torch"), tmp_path / "torch", progress=False)
    a, b = _losses(ours), _losses(theirs)
    assert len(a) == len(b) == 6 and a[-1] < a[0]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    preds = [json.loads(line)["pred"] for line in (ours / "predictions.jsonl").read_text().splitlines()]
    assert preds == [
        json.loads(line)["pred"] for line in (theirs / "predictions.jsonl").read_text().splitlines()
    ]
