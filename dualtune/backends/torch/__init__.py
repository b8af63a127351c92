"""The PyTorch backend: transformers + peft on real torch, CPU or CUDA. ``step``: its FrameworkStep."""

from __future__ import annotations

import atexit
import os

from dualtune.backend import Backend, BackendError
from dualtune.backends.hf import torch_flavour


def activate(device: str) -> None:
    """Check that real torch can run here, on ``device``."""
    if torch_flavour() == "mindtorch":
        raise BackendError(
            "the torch backend cannot start: MindSpore (mindnlp) is already active in this "
            "process and `import torch` now means mindtorch; run torch in a separate process"
        )
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BackendError(f"--device {device}: the torch backend runs on cpu or cuda")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"--device {device}: torch sees no CUDA device here")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # Under torchrun: one process per device, gradients summed by gloo (CPU) or nccl (CUDA).
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        # Torn down before the interpreter exits: a gloo group left to the C++ destructors at exit
        # aborted a finished worker now and then ("terminate called without an active exception").
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def create(device: str = "cpu") -> Backend:
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: this process's GPU
    activate(device)
    from dualtune.backends.torch.step import TorchBackend

    return TorchBackend(device)
