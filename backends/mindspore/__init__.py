"""The MindSpore backend: transformers + peft on MindSpore through mindnlp's torch-API shim.

``import mindnlp`` makes every later ``import torch`` in this process yield mindtorch, so this
package activates MindSpore (``create``) before ``step`` (its FrameworkStep) is imported.
``compat``: where mindtorch computes differently from PyTorch, corrected; ``cpu_speed``: CPU
kernel and launch settings (verified on CPU; the Ascend path is not run yet).
"""

from __future__ import annotations

import logging
import os

from dualtune.backend import BackendError, torch_flavour

log = logging.getLogger("dualtune")

# --device -> (MindSpore device target, mindtorch device name)
DEVICES = {"cpu": ("CPU", "cpu"), "ascend": ("Ascend", "npu"), "gpu": ("GPU", "cuda")}


def activate(device: str) -> None:
    """Point MindSpore at ``device``, tune it for CPU, install mindnlp's ``import torch`` redirect."""
    if torch_flavour() == "torch":
        raise BackendError(
            "the mindspore backend cannot start: PyTorch is already imported in this "
            "process, and mindnlp would mix it with mindtorch; run mindspore in a separate process"
        )
    if device not in DEVICES:
        raise BackendError(f"--device {device}: the mindspore backend runs on {', '.join(DEVICES)}")
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logging: errors only
    import mindspore

    mindspore.set_device(DEVICES[device][0])
    from dualtune.backends.mindspore import cpu_speed

    speed = cpu_speed.enabled(device)
    if speed:
        settings = cpu_speed.configure_runtime()
    # mindnlp points HF_ENDPOINT at a mirror when it is unset; keep the user's choice (unset means
    # huggingface.co, as everywhere else) and leave the environment as we found it.
    user_endpoint = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = user_endpoint or "https://huggingface.co"
    # mindnlp imports diffusers, whose "Modular Diffusers is ... experimental" notice is not ours.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import mindnlp  # noqa: F401  (the redirect)

    if user_endpoint is None:
        del os.environ["HF_ENDPOINT"]
    if speed:
        settings += [cpu_speed.patch_linear(), cpu_speed.patch_transposes(), cpu_speed.patch_rms_norms()]
        log.info("mindspore CPU settings: %s", ", ".join(settings))


def create(device: str = "cpu"):
    activate(device)
    from dualtune.backends.mindspore import compat

    # DUALTUNE_MINDSPORE_COMPAT=0 runs mindtorch as it is: to see what a correction is worth.
    if os.environ.get("DUALTUNE_MINDSPORE_COMPAT", "1") != "0":
        # Installed for every model that could need them; not news on a run that does not (BERT).
        log.debug("mindtorch corrections: %s", ", ".join(compat.apply()) or "none needed")
    else:
        log.warning("mindtorch corrections OFF (DUALTUNE_MINDSPORE_COMPAT=0): numbers may differ from torch")
    from dualtune.backends.mindspore.step import MindSporeBackend

    return MindSporeBackend(device)
