"""dualtune/backends/mindspore/cpu_speed.py: the kernel swaps compute what the model's own code computes,
values and gradients, and the switch turns them off."""

from __future__ import annotations

import numpy as np
import pytest

from dualtune.backends.mindspore import cpu_speed


def test_cpu_settings_are_on_for_cpu_only(ms, monkeypatch):
    from mindtorch._apis import cpu

    assert getattr(cpu.dense, "dualtune_matmul", False)
    assert cpu_speed.enabled("cpu") and not cpu_speed.enabled("ascend")
    monkeypatch.setenv("DUALTUNE_MINDSPORE_CPU_SPEED", "0")
    assert not cpu_speed.enabled("cpu")


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_as_matmul_matches_numpy_with_gradients(ms, shape, bias):
    import torch
    from mindtorch.autograd import value_and_grad

    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=shape), rng.normal(size=(4, 7)), rng.normal(size=4)
    weight = torch.nn.Parameter(torch.tensor(w, dtype=torch.float32))
    params = [weight]
    bias_t = None
    if bias:
        bias_t = torch.nn.Parameter(torch.tensor(b, dtype=torch.float32))
        params.append(bias_t)
    inputs = torch.tensor(x, dtype=torch.float32)
    out = torch.nn.functional.linear(inputs, weight, bias_t)
    np.testing.assert_allclose(out.numpy(), x @ w.T + (b if bias else 0), rtol=1e-5, atol=1e-5)
    # d(sum(linear))/dW = sum of input rows, per output row; d/db = number of rows
    step = value_and_grad(
        lambda *_: torch.nn.functional.linear(inputs, weight, bias_t).sum(), params, attach_grads=False
    )
    _, grads = step()
    rows = x.reshape(-1, 7)
    np.testing.assert_allclose(grads[0].asnumpy(), np.tile(rows.sum(0), (4, 1)), rtol=1e-5, atol=1e-5)
    if bias:
        np.testing.assert_allclose(grads[1].asnumpy(), np.full(4, len(rows)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_rms_norm_by_rows_matches_the_formula(ms, kind):
    import torch

    if kind == "t5":
        from transformers.models.t5.modeling_t5 import T5LayerNorm as Norm
    else:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as Norm
    assert getattr(Norm.forward, "dualtune_rows", False)
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(2, 5, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    norm = Norm(16, eps=1e-6)
    norm.weight = torch.nn.Parameter(torch.tensor(w))
    expected = w * (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6))
    np.testing.assert_allclose(norm(torch.tensor(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def _value_and_grads(fn, *arrays):
    """fn's value and its gradients with respect to each array, through mindtorch."""
    import torch
    from mindtorch.autograd import value_and_grad

    params = [torch.nn.Parameter(torch.tensor(a, dtype=torch.float32)) for a in arrays]
    value, grads = value_and_grad(lambda *_: fn(*params), params, attach_grads=False)()
    return value, [g.asnumpy() for g in grads]


@pytest.mark.parametrize(
    "how", ["transpose(1, 2)", "permute(0, 2, 1, 3)", "permute(2, 0, 1, 3)", "swapaxes(0, 1)"]
)
def test_transposes_keeping_the_last_axis_are_row_gathers_with_gradients(ms, how):
    from mindtorch._apis import cpu

    assert getattr(cpu.transpose_view, "dualtune_rows", False)
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(2, 5, 3, 4)), rng.normal(size=(2, 5, 3, 4))
    name, args = how.split("(")
    axes = tuple(int(a) for a in args.rstrip(")").split(","))
    perm = list(range(4))
    if name in ("transpose", "swapaxes"):
        perm[axes[0]], perm[axes[1]] = perm[axes[1]], perm[axes[0]]
    else:
        perm = list(axes)
    weight = w.transpose(perm)

    def moved(t):
        out = getattr(t, name)(*axes)
        assert out.is_contiguous()  # gathered, not a strided view
        return out

    import torch

    out = moved(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_array_equal(out.numpy(), x.astype(np.float32).transpose(perm))
    # d(sum(w' * moved(x)))/dx = w' moved back
    value, (grad,) = _value_and_grads(
        lambda t: (moved(t) * torch.tensor(weight, dtype=torch.float32)).sum(), x
    )
    assert float(value) == pytest.approx(float((x.transpose(perm) * weight).sum()), rel=1e-5)
    np.testing.assert_allclose(grad, w, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (5, 4)])
def test_matmul_by_a_transposed_view_with_gradients(ms, shape):
    import torch

    rng = np.random.default_rng(3)
    q, k = rng.normal(size=shape), rng.normal(size=shape[:-2] + (6, shape[-1]))
    out = torch.matmul(
        torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32).transpose(-1, -2)
    )
    np.testing.assert_allclose(out.numpy(), q @ np.swapaxes(k, -1, -2), rtol=1e-5, atol=1e-5)
    # d(sum(q k^T))/dq = row sums of k, broadcast; d/dk = row sums of q
    _, (grad_q, grad_k) = _value_and_grads(lambda a, b: torch.matmul(a, b.transpose(-1, -2)).sum(), q, k)
    np.testing.assert_allclose(grad_q, np.broadcast_to(k.sum(-2, keepdims=True), q.shape), rtol=1e-5)
    np.testing.assert_allclose(grad_k, np.broadcast_to(q.sum(-2, keepdims=True), k.shape), rtol=1e-5)


def test_transposes_of_strided_views_and_of_the_last_axis_stay_views(ms):
    import torch

    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    twice = torch.tensor(x).transpose(0, 1).transpose(-1, -2)  # a view of a gathered tensor
    np.testing.assert_array_equal(twice.numpy(), x.transpose(1, 0, 2).transpose(0, 2, 1))
    moved = torch.tensor(x).permute(2, 0, 1)  # last axis moves: a view
    np.testing.assert_array_equal((moved * 2).numpy(), x.transpose(2, 0, 1) * 2)
    empty = torch.zeros(2, 0, 3, 4).transpose(1, 2)  # nothing to gather
    assert tuple(empty.shape) == (2, 3, 0, 4)
