"""What the core knows of PyTorch before loading it (imports no torch)."""

from __future__ import annotations

import os
from pathlib import Path

from dualtune.backend import BackendError, Framework


class TorchFramework(Framework):
    name = "torch"
    order = 0  # the default backend
    device_help = "cpu | cuda[:N]"
    launcher = "torchrun (gloo on cpu, nccl on cuda)"
    packages = ("torch", "transformers", "peft", "numpy")
    process_note = "mindnlp takes over `import torch` for the whole process"
    export_formats = ("merged", "onnx")  # dualtune.backends.torch.export

    def check_device(self, device: str) -> None:
        # cuda: torch's own check (torch.cuda.is_available) is one line and comes before any run
        # directory; device files are no proof either way (WSL's GPU has no /dev/nvidia*).
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise BackendError(f"--device {device}: the torch backend runs on cpu or cuda")

    def precisions(self, device: str) -> tuple[str, ...]:
        return ("fp32", "bf16", "fp16")

    def launched_rank(self) -> int | None:
        # torchrun sets RANK and WORLD_SIZE for each worker
        return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None

    def launch(self, nproc: int, argv: list[str], output: Path) -> int:
        import logging

        from dualtune.backends.torch.launch import launch

        return launch(nproc, argv, logging.getLogger("dualtune"), output)


DESCRIPTOR = TorchFramework()
