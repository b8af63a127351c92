"""backends/mindspore/cpu_speed.py: the kernel swaps compute what the model's own code computes,
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
    step = value_and_grad(lambda *_: torch.nn.functional.linear(inputs, weight, bias_t).sum(), params,
                          attach_grads=False)
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
