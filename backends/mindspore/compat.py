"""Where mindtorch computes something differently from PyTorch, the correction, in one place.

T5 relative-position buckets: transformers truncates ``log(rp / 8) / log(128 / 8) * 8`` to an
integer. At rp = 16, 32, 64 the exact value is an integer, and float32 ``log`` on MindSpore's CPU
kernel lands just below it (bucket 25 instead of 26): same weights and input, hidden states off by
~0.1. The buckets depend only on integer positions, so they are computed on the host in float64.
"""

from __future__ import annotations

import importlib
import math

import numpy as np

# Attention classes that share T5's bucket function (each model file has its own copy).
BUCKET_USERS = [
    ("transformers.models.t5.modeling_t5", "T5Attention"),
    ("transformers.models.mt5.modeling_mt5", "MT5Attention"),
    ("transformers.models.umt5.modeling_umt5", "UMT5Attention"),
    ("transformers.models.longt5.modeling_longt5", "LongT5Attention"),
]


def relative_position_bucket_np(
    relative_position: np.ndarray, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """transformers' ``T5Attention._relative_position_bucket``, in numpy float64."""
    rp = relative_position.astype(np.int64)
    buckets = np.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        buckets += (rp > 0).astype(np.int64) * num_buckets
        rp = np.abs(rp)
    else:
        rp = -np.minimum(rp, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(rp.astype(np.float64) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        )
    large = np.minimum(np.where(rp < max_exact, 0, large).astype(np.int64), num_buckets - 1)
    return buckets + np.where(rp < max_exact, rp, large)


def _bucket_float64(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    import torch  # mindtorch here

    out = relative_position_bucket_np(
        relative_position.cpu().numpy(), bidirectional, num_buckets, max_distance
    )
    return torch.tensor(out, dtype=torch.long, device=relative_position.device)


def model_classes(names: list[tuple[str, str]]):
    """The (module, class) pairs that this transformers version has, as classes."""
    for module_name, cls_name in names:
        try:
            yield getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            continue


def apply() -> list[str]:
    """Install the corrections; returns the names of the patched classes."""
    patched = []
    for cls in model_classes(BUCKET_USERS):
        cls._relative_position_bucket = staticmethod(_bucket_float64)
        patched.append(cls.__name__)
    return patched
