"""The MindSpore reference: a plain mindnlp loop. The HF model + peft under mindtorch,
``mindtorch.autograd.value_and_grad`` over the trainable parameters (it fills ``p.grad``), a
hand-written in-place AdamW (``torch.optim.AdamW`` has no CPU kernel under mindtorch), the linear /
constant schedule by hand; then the notebooks' plain generate loop."""

from __future__ import annotations

import math
import os
import time

from common import WARMUP_STEPS

from dualtune.rundir import peak_rss_mb
from sides.hf_reference import (
    evaluate_and_report,
    reference_inputs,
    reference_model,
)  # no framework at import


def scheduled_lr(step: int, total: int, recipe) -> float:
    """The schedule by hand, as transformers' linear / constant schedules with warmup (0-based step)."""
    s = recipe.schedule
    warm = (
        s.warmup_steps
        if s.warmup_steps is not None
        else (math.ceil(total * s.warmup_ratio) if s.warmup_ratio is not None else 0)
    )
    if step < warm:
        return recipe.optim.lr * step / max(1, warm)
    if s.name == "constant":
        return recipe.optim.lr
    return recipe.optim.lr * max(0.0, (total - step) / max(1, total - warm))


class InPlaceAdamW:
    """AdamW written with in-place mul_ / add_ / sub_ (what runs on CPU under mindtorch), with the
    recipe's betas, eps, weight decay and clipping; ``step(lr)`` uses and clears ``p.grad``."""

    def __init__(self, params: list, optim):
        import torch

        self.params, self.o, self.t = params, optim, 0
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def step(self, lr: float) -> None:
        import torch

        o, (b1, b2) = self.o, self.o.betas
        grads = [p.grad for p in self.params]
        if o.grad_clip is not None:
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            scale = min(1.0, o.grad_clip / (norm + 1e-6))
            grads = [g * scale for g in grads]
        self.t += 1
        bc1, bc2_sqrt = 1.0 - b1**self.t, math.sqrt(1.0 - b2**self.t)
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
                p.mul_(1.0 - lr * o.weight_decay)
                m.mul_(b1).add_(g * (1.0 - b1))
                v.mul_(b2).add_(g * g * (1.0 - b2))
                p.sub_(m / (v.sqrt() / bc2_sqrt).add_(o.eps) * (lr / bc1))
        for p in self.params:
            p.grad = None


def epoch_order(inputs, epoch: int):
    """One epoch's row order: shuffled by the seed, length-grouped as dualtune's loader groups."""
    import numpy as np

    recipe = inputs.recipe
    order = np.random.default_rng(recipe.train.seed + epoch).permutation(len(inputs.train_feats))
    if recipe.train.group_by_length:  # dualtune's data loader's grouping (framework-free)
        from dualtune.data import length_grouped

        order = length_grouped(
            order, [len(f["input_ids"]) for f in inputs.train_feats], recipe.train.batch_size
        )
    return order


def run_reference_mindspore(cfg: dict) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindspore

    mindspore.set_device("CPU")
    from dualtune.backends.mindspore import import_mindnlp

    import_mindnlp()  # from here on, `import torch` is mindtorch
    from mindtorch.autograd import value_and_grad

    inputs = reference_inputs(cfg)
    recipe = inputs.recipe
    mindspore.set_seed(recipe.train.seed)
    model = reference_model(inputs, cfg["model_dir"])
    rss = {"setup": peak_rss_mb()}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_fn(input_ids, attention_mask, labels):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    grad_fn = value_and_grad(forward_fn, params)  # fills p.grad
    optimizer = InPlaceAdamW(params, recipe.optim)
    total = cfg["steps"] + WARMUP_STEPS
    bs = recipe.train.batch_size
    step, epoch, step_ends, step_tokens, losses = 0, 0, [], [], []
    while step < total:
        order = epoch_order(inputs, epoch)
        for start in range(0, len(order), bs):
            if step >= total:
                break
            batch = inputs.collator([inputs.train_feats[i] for i in order[start : start + bs]])
            step_tokens.append(inputs.tokens(batch))
            loss = grad_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
            optimizer.step(scheduled_lr(step, total, recipe))
            step += 1
            losses.append(loss.item())
            step_ends.append(time.perf_counter())
        epoch += 1
    rss["train"] = peak_rss_mb()
    what = (
        "plain mindnlp loop: HF model + peft under mindtorch, mindtorch.autograd.value_and_grad, "
        "in-place AdamW; plain generate loop"
    )
    return evaluate_and_report(cfg, inputs, model, what, step_ends, step_tokens, losses, rss)
