"""The MindSpore backend: transformers + peft on MindSpore through mindnlp's torch-API shim.

``import mindnlp`` makes every later ``import torch`` in this process yield mindtorch, so this
package activates MindSpore (``create``) before ``step`` (its FrameworkStep) is imported.
``compat``: where mindtorch computes differently from PyTorch, corrected; ``cpu_speed``: CPU
kernel and launch settings (verified on CPU; the Ascend path is not run yet).
"""

from __future__ import annotations

import logging
import os
import sys

from dualtune.backend import Backend, BackendError
from dualtune.backends.hf import torch_flavour

log = logging.getLogger("dualtune")

# --device -> (MindSpore device target, mindtorch device name)
DEVICES = {"cpu": ("CPU", "cpu"), "ascend": ("Ascend", "npu"), "gpu": ("GPU", "cuda")}


def launched_by_msrun() -> bool:
    """A worker process that msrun started (its scheduler process has ``MS_ROLE=MS_SCHED``)."""
    return os.environ.get("MS_ROLE") == "MS_WORKER"


def serve_msrun_scheduler() -> None:
    """msrun's scheduler process runs the worker's command too: there ``init`` keeps the cluster's
    registry until every worker has finished, then ends the process."""
    os.environ.setdefault("GLOG_v", "3")
    from mindspore.communication import init

    init()


def unwrap_checkpoint_resolution() -> None:
    """transformers' own checkpoint-file lookup, without mindnlp's wrapper around it.

    Once MindSpore's communication is initialised, mindnlp makes every process but 0 wait in
    ``mindtorch.distributed.barrier`` while process 0 resolves (downloads) a model's files. That
    needs mindtorch's default process group, which has no CPU (mccl) backend: its barrier fails
    ("'ProcessGroup' object has no attribute 'device'", measured under msrun on CPU). Without the
    wrapper each process resolves its own files, as on torch (the hub's cache locks concurrent
    downloads of a file)."""
    import transformers.modeling_utils as modeling

    wrapper = modeling._get_resolved_checkpoint_files
    for cell in getattr(wrapper, "__closure__", None) or ():
        original = cell.cell_contents
        if getattr(original, "__name__", "") == "_get_resolved_checkpoint_files" and original is not wrapper:
            modeling._get_resolved_checkpoint_files = original
            return


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
    if launched_by_msrun():
        # One process per device; gradients are summed by MindSpore's collectives, which ``init``
        # picks from the device: mccl on CPU, hccl on Ascend, nccl on GPU.
        from mindspore.communication import GlobalComm, init

        if not GlobalComm.INITED:
            init()
    import_mindnlp()
    if launched_by_msrun():
        unwrap_checkpoint_resolution()
    if speed:
        settings += [cpu_speed.patch_linear(), cpu_speed.patch_transposes(), cpu_speed.patch_rms_norms()]
        log.info("mindspore CPU settings: %s", ", ".join(settings))


def import_mindnlp() -> None:
    """``import mindnlp`` (from then on ``import torch`` is mindtorch in this process), without its
    side effects on the environment. Every import of mindnlp in the project goes through here."""
    # mindnlp points HF_ENDPOINT at a mirror when it is unset; keep the user's choice (unset means
    # huggingface.co, as everywhere else) and leave the environment as we found it.
    user_endpoint = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = user_endpoint or "https://huggingface.co"
    # mindnlp imports diffusers, whose "Modular Diffusers is ... experimental" notice is not ours.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # diffusers (which mindnlp imports whole) builds its ONNX pipelines when onnxruntime is installed
    # (the export extra), and under mindnlp that fails: "diffusers.pipelines has no attribute
    # OnnxStableDiffusionInpaintPipelineLegacy". Its probe is find_spec, which a None entry answers.
    hide_onnxruntime = "onnxruntime" not in sys.modules
    if hide_onnxruntime:
        sys.modules["onnxruntime"] = None  # type: ignore[assignment]
    try:
        import mindnlp  # noqa: F401  (the redirect)
    finally:
        if hide_onnxruntime:
            del sys.modules["onnxruntime"]
        if user_endpoint is None:
            os.environ.pop("HF_ENDPOINT", None)


def create(device: str = "cpu") -> Backend:
    graphs = os.environ.get("DUALTUNE_MINDSPORE_GRAPH")
    if graphs not in (None, "0", "1"):  # "false" would otherwise turn every graph on
        raise BackendError(
            f"DUALTUNE_MINDSPORE_GRAPH={graphs}: expected 0 (op by op) or 1 (every model written as "
            "graphs); unset, each model's default"
        )
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
