"""What the core knows of MindSpore before loading it (imports no mindspore, no mindnlp)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from dualtune.backend import BackendError, Framework

# --device -> the device files that show it is there (a cheap probe, before MindSpore loads)
DEVICE_FILES = {"ascend": ("/dev/davinci[0-9]*", "Ascend NPU"), "gpu": ("/dev/nvidia[0-9]*", "NVIDIA GPU")}


class MindSporeFramework(Framework):
    name = "mindspore"
    order = 1
    device_help = "cpu | ascend | gpu"
    launcher = "msrun (mccl on cpu, hccl on ascend, nccl on gpu)"
    packages = ("mindspore", "mindnlp", "transformers", "peft", "numpy")
    process_note = "mindnlp takes over `import torch` for the whole process"

    def check_device(self, device: str) -> None:
        """MindSpore otherwise fails deep inside with 30 lines ending 'Unsupported device target'. A
        probe for the device files only: a missing driver or CANN toolkit still fails when it loads."""
        if device in DEVICE_FILES:
            pattern, what = DEVICE_FILES[device]
            if not glob.glob(pattern):
                raise BackendError(
                    f"--device {device}: no {what} on this machine (no {pattern.split('[')[0]}*); use --device cpu"
                )
        elif device != "cpu":
            raise BackendError(f"--device {device}: the mindspore backend runs on cpu, ascend, gpu")

    def precisions(self, device: str) -> tuple[str, ...]:
        # Measured on MindSpore 2.7.0: its CPU MatMul has no bfloat16 or float16 kernel ("Select CPU
        # operator[MatMul] fail"), also under mindtorch's autocast; mixed precision on Ascend/GPU is
        # not built (nothing here could test it).
        return ("fp32",)

    def precision_refusal(self, device: str, precision: str) -> str:
        why = (
            "MindSpore's CPU MatMul has no bfloat16/float16 kernel"
            if device == "cpu"
            else f"mixed precision on {device} is not built yet"
        )
        return (
            f"the mindspore backend trains in fp32 only ({why}); use train.precision=fp32 or --backend torch"
        )

    def launched_rank(self) -> int | None:
        # msrun's workers have MS_ROLE=MS_WORKER and RANK_ID; its scheduler MS_ROLE=MS_SCHED
        if os.environ.get("MS_ROLE") == "MS_WORKER":
            return int(os.environ.get("RANK_ID", "0"))
        return None

    def serve_launcher_process(self) -> bool:
        if os.environ.get("MS_ROLE") != "MS_SCHED":  # msrun's scheduler process runs the command too
            return False
        from dualtune.backends.mindspore import serve_msrun_scheduler

        serve_msrun_scheduler()
        return True

    def launch(self, nproc: int, argv: list[str], output: Path) -> int:
        import logging

        from dualtune.backends.mindspore.launch import launch

        return launch(nproc, argv, logging.getLogger("dualtune"), output)


DESCRIPTOR = MindSporeFramework()
