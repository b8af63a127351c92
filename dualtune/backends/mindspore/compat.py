"""Where mindtorch computes something differently from PyTorch, the correction, in one place.

Gradient checkpointing: mindtorch's ``torch.utils.checkpoint.checkpoint`` only calls the function,
so transformers' checkpointed layers keep every activation. MindSpore's own recompute
(``mindspore.recompute``) is put in its place, layer by layer (``recompute_checkpointed_layers``).

T5 relative-position buckets: transformers truncates ``log(rp / 8) / log(128 / 8) * 8`` to an
integer. At rp = 16, 32, 64 the exact value is an integer, and float32 ``log`` on MindSpore's CPU
kernel lands just below it (bucket 25 instead of 26): same weights and input, hidden states off by
~0.1. The buckets depend only on integer positions, so they are computed on the host in float64.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import mindspore
import numpy as np

from dualtune.backend import Tensor

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


def _bucket_float64(
    relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    import torch  # mindtorch here

    out = relative_position_bucket_np(
        relative_position.cpu().numpy(), bidirectional, num_buckets, max_distance
    )
    return torch.tensor(out, dtype=torch.long, device=relative_position.device)


def model_classes(names: list[tuple[str, str]]) -> Iterator[Any]:
    """The (module, class) pairs that this transformers version has, as classes."""
    for module_name, cls_name in names:
        try:
            yield getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            continue


class RecomputedCall(mindspore.nn.Cell):
    """One call of a checkpointed layer, in the form ``mindspore.recompute`` takes: a Cell whose
    trainable parameters are the layer's. ``construct`` runs twice: in the forward pass (recording no
    gradient, keeping only the inputs) and again in the backward pass, where the second run replays
    the dropout masks of the first (``rng``: get_state / set_state, the backend's dropout generator)."""

    def __init__(
        self, function: Callable[..., Any], params: list[Tensor], devices: list[Any], rng: Any
    ) -> None:
        super().__init__(auto_prefix=False)
        # Plain attributes: a Cell would otherwise try to adopt the (mindtorch) tensors as its own.
        self.__dict__.update(function=function, layer_params=params, devices=devices, rng=rng, rng_state=None)

    def trainable_params(self, recurse: bool = True) -> list[Tensor]:
        return list(self.layer_params)

    def construct(self, *args: Tensor) -> Any:
        # MindSpore replays detached copies of the inputs, bare tensors: give them mindtorch's device back.
        for arg, device in zip(args, self.devices):
            if device is not None and not hasattr(arg, "_device"):
                arg._device = device
        if self.rng_state is None:  # the forward pass
            self.__dict__["rng_state"] = self.rng.get_state()
            return self.function(*args)
        after = self.rng.get_state()
        self.rng.set_state(self.rng_state)
        try:
            return self.function(*args)
        finally:
            self.rng.set_state(after)


def recompute_checkpoint(layer: Any, rng: Any) -> Callable[..., Any]:
    """A ``_gradient_checkpointing_func`` for ``layer`` (transformers calls it with the layer's call
    and its positional inputs) that runs the call under ``mindspore.recompute``."""
    import torch  # mindtorch here

    def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
        if not torch.is_grad_enabled():  # a frozen encoder's pass (step.encoder_outputs)
            return function(*args)
        params = [p for p in layer.parameters() if p.requires_grad]  # peft adds its layers after this is set
        devices = [a.device if isinstance(a, torch.Tensor) else None for a in args]
        out = mindspore.recompute(RecomputedCall(function, params, devices, rng), *args)
        device = next(d for d in devices if d is not None)
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and not hasattr(tensor, "_device"):
                # mindtorch's Tensor has _device; mypy reads PyTorch's stubs for torch
                tensor._device = device  # type: ignore[attr-defined]
        return out

    return checkpoint


def recompute_checkpointed_layers(model: Any, rng: Any) -> int:
    """Route every layer transformers checkpoints through MindSpore's recompute; returns how many."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for layer in layers:
        layer._gradient_checkpointing_func = recompute_checkpoint(layer, rng)
    return len(layers)


def apply() -> list[str]:
    """Install the corrections; returns the names of the patched classes."""
    patched = []
    for cls in model_classes(BUCKET_USERS):
        cls._relative_position_bucket = staticmethod(_bucket_float64)
        patched.append(cls.__name__)
    return patched
