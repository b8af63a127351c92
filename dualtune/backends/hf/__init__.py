"""What both backends share: Hugging Face models driven through the torch API (PyTorch, or mindtorch
under MindSpore). ``backend``: the model-level ``HFBackend``; ``methods``: per-method knowledge (peft
configs, BitFit); ``tiny``: tiny random models. Those modules import torch: import them only after a
framework is active. This one imports nothing (both frameworks' ``activate`` ask ``torch_flavour``)."""

from __future__ import annotations

import sys


def torch_flavour() -> str | None:
    """Which ``torch`` this process has imported: None, "torch" (PyTorch) or "mindtorch" (mindnlp's shim)."""
    module = sys.modules.get("torch")
    if module is None:
        return "mindtorch" if "mindnlp" in sys.modules else None
    return "mindtorch" if "mindtorch" in (getattr(module, "__file__", None) or "") else "torch"
