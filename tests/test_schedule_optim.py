"""The learning-rate schedule against transformers' own schedulers, and the torch backend's AdamW
step against the numpy reference in ``dualtune.optim``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualtune.optim import adamw_reference, clip_scale
from dualtune.recipe import OptimSpec, ScheduleSpec
from dualtune.schedule import lr_at, warmup_steps
from torch_helpers import torch_backend

BASE_LR = 3e-3


def hf_warmup(spec: ScheduleSpec, total: int, tmp_path) -> int:
    """The warmup transformers would use: TrainingArguments turns a ratio into steps."""
    from transformers import TrainingArguments

    if spec.warmup_ratio is None:
        return spec.warmup_steps or 0
    args = TrainingArguments(output_dir=str(tmp_path), warmup_ratio=spec.warmup_ratio, report_to=[])
    return args.get_warmup_steps(total)


def hf_lrs(spec: ScheduleSpec, total: int, warmup: int) -> list[float]:
    """The learning rate a real torch optimizer sees at each of ``total`` steps under transformers'
    scheduler."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=BASE_LR)
    if spec.name == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        sched = get_constant_schedule_with_warmup(opt, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        opt.step()
        sched.step()
    return lrs


SCHEDULES = [
    (dict(name="linear", warmup_steps=4), 12),
    (dict(name="linear", warmup_steps=0), 7),
    (dict(name="linear"), 9),
    (dict(name="linear", warmup_ratio=0.25), 10),  # 2.5 steps: transformers rounds up to 3
    (dict(name="linear", warmup_ratio=0.1), 60),  # the demo recipe: 6 steps
    (dict(name="linear", warmup_ratio=0.1), 23),  # 2.3 steps: 3
    (dict(name="constant", warmup_steps=3), 8),
    (dict(name="constant", warmup_ratio=0.2), 11),
    (dict(name="constant"), 5),
]


@pytest.mark.parametrize("kwargs, total", SCHEDULES)
def test_lr_at_matches_transformers_scheduler(kwargs, total, tmp_path):
    spec = ScheduleSpec(**kwargs)
    warmup = hf_warmup(spec, total, tmp_path)
    assert warmup_steps(spec, total) == warmup
    expected = hf_lrs(spec, total, warmup)
    ours = [lr_at(step, BASE_LR, spec, total) for step in range(total)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("kwargs, total", [(dict(warmup_steps=4), 12), (dict(warmup_ratio=0.25), 10)])
def test_linear_warmup_boundaries(kwargs, total):
    spec = ScheduleSpec(name="linear", **kwargs)
    w = warmup_steps(spec, total)
    assert lr_at(0, BASE_LR, spec, total) == 0.0
    assert lr_at(w - 1, BASE_LR, spec, total) == pytest.approx(BASE_LR * (w - 1) / w)
    assert lr_at(w, BASE_LR, spec, total) == BASE_LR  # the peak, exactly at the end of warmup
    assert lr_at(w + 1, BASE_LR, spec, total) == pytest.approx(BASE_LR * (total - w - 1) / (total - w))
    assert lr_at(total, BASE_LR, spec, total) == 0.0


# ---------------------------------------------------------------- AdamW + clipping


@pytest.mark.parametrize("weight_decay, grad_clip", [(0.01, 1.0), (0.1, 0.5), (0.0, None)])
def test_torch_adamw_matches_numpy_reference(weight_decay, grad_clip):
    backend = torch_backend()
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (4,), (2, 2, 2)]
    init = [rng.normal(size=s) for s in shapes]
    params = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in init]
    spec = OptimSpec(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=weight_decay, grad_clip=grad_clip)
    optimizer = backend.make_optimizer(params, spec)

    # the reference starts from the very float32 values torch holds, in float64
    ref = [p.detach().numpy().astype(np.float64) for p in params]
    m = [np.zeros_like(x) for x in ref]
    v = [np.zeros_like(x) for x in ref]
    schedule = ScheduleSpec(name="linear", warmup_steps=2)
    scales = []
    for step in range(1, 7):
        size = 3.0 if step % 2 else 0.05  # alternately clipped and not
        grads = [rng.normal(scale=size, size=s).astype(np.float32) for s in shapes]
        lr = lr_at(step, spec.lr, schedule, 8)

        clipped, norm = backend.clip_grads([torch.tensor(g) for g in grads], spec.grad_clip)
        ref_norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)))
        assert norm == pytest.approx(ref_norm, rel=1e-6)
        scale = clip_scale(ref_norm, spec.grad_clip)
        scales.append(scale)
        ref_grads = [g.astype(np.float64) * scale for g in grads]
        for c, rg in zip(clipped, ref_grads):
            np.testing.assert_allclose(c.numpy(), rg, rtol=1e-6, atol=1e-9)

        backend.apply_update(optimizer, clipped, lr)
        for i in range(len(ref)):
            ref[i], m[i], v[i] = adamw_reference(ref[i], ref_grads[i], m[i], v[i], step, lr, spec)
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-6, atol=1e-7)
            assert p.grad is None  # apply_update leaves no gradients behind

    if grad_clip is None:
        assert scales == [1.0] * 6
    else:
        assert min(scales) < 0.5 and max(scales) == 1.0  # both branches of clipping ran
    # the parameters really moved (a few lr-sized steps), so the comparison above means something
    moved = max(float(np.abs(p.detach().numpy() - x).max()) for p, x in zip(params, init))
    assert moved > 1e-2


def test_clip_scale_follows_torch_clip_grad_norm():
    grads = [torch.full((3,), 2.0), torch.full((4,), -1.0)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = float(torch.nn.utils.clip_grad_norm_(params, 0.7))
    scale = clip_scale(norm, 0.7)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad.numpy(), g.numpy() * scale, rtol=1e-6)
    assert clip_scale(norm, None) == 1.0
    assert clip_scale(0.1, 5.0) == 1.0
