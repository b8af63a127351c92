"""The AdamW update both backends implement, written once in numpy as the reference.

Backends use their framework's own ops; tests hold each backend's step against this function.
"""

from __future__ import annotations

import numpy as np

from dualtune.recipe import OptimSpec


def clip_scale(grad_norm: float, max_norm: float | None) -> float:
    """The factor gradients are multiplied by under global-norm clipping (torch's rule)."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


def adamw_reference(
    param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float, spec: OptimSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One AdamW step (``step`` counts from 1), as torch.optim.AdamW computes it.

    Returns the new (param, m, v).
    """
    b1, b2 = spec.betas
    param = param * (1.0 - lr * spec.weight_decay)
    m = b1 * m + (1.0 - b1) * grad
    v = b2 * v + (1.0 - b2) * grad * grad
    m_hat = m / (1.0 - b1**step)
    denom = np.sqrt(v) / np.sqrt(1.0 - b2**step) + spec.eps
    return param - lr * m_hat / denom, m, v
