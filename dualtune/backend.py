"""The seam between the core and a framework.

A backend supplies only what a framework must: tensors, model loading, applying the PEFT spec, a
value-and-grad step, the optimizer update, generation and saving. The core (recipe, data, schedule,
loop, evaluation, run directory) talks to it through this interface and never imports a framework.

Choosing a backend is process-wide: mindnlp redirects ``import torch`` to its MindSpore shim for the
rest of the process, so the backend is activated before transformers is imported and only one
backend can be active per process.
"""

from __future__ import annotations

import importlib
import os
import sys
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

BACKENDS = ("torch", "mindspore")
_active: "Backend | None" = None


class BackendError(RuntimeError):
    """A backend that cannot be used as asked; the message is one line meant for the user."""


class Backend(ABC):
    name: str
    device: str

    # -- tensors and randomness
    @abstractmethod
    def seed(self, seed: int) -> None: ...

    @abstractmethod
    def to_tensors(self, batch: dict[str, np.ndarray]) -> dict[str, Any]: ...

    @abstractmethod
    def to_numpy(self, tensor) -> np.ndarray: ...

    def to_float(self, tensor) -> float:
        """A scalar tensor as a Python float, exactly (mindtorch's float() rounds to 6 digits)."""
        return float(self.to_numpy(tensor).item())

    # -- model
    @abstractmethod
    def load_tokenizer(self, model_spec): ...

    @abstractmethod
    def load_model(self, model_spec, label_names: Sequence[str], tokenizer): ...

    @abstractmethod
    def apply_peft(self, model, peft_spec, task: str, seed: int): ...

    @abstractmethod
    def trainable_parameters(self, model) -> list[tuple[str, Any]]: ...

    @abstractmethod
    def parameter_count(self, model) -> int: ...

    @abstractmethod
    def set_training(self, model, training: bool) -> None: ...

    @abstractmethod
    def disable_dropout(self, model) -> int:
        """Dropout off everywhere (returns how many modules); for runs two backends must match."""

    @abstractmethod
    def set_class_weights(self, model, weights: np.ndarray | None) -> None:
        """Classification loss becomes class-weighted cross-entropy (torch's weighted mean), or plain."""

    @abstractmethod
    def trainable_state(self, model) -> dict[str, np.ndarray]:
        """Every trainable tensor by name, as numpy copies."""

    @abstractmethod
    def assign_trainable(self, model, state: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable tensors with ``state`` (as returned by ``trainable_state``)."""

    # -- the training step: the loop calls these three in order
    @abstractmethod
    def value_and_grad(self, model, params: list, batch: dict) -> tuple[Any, list]:
        """Loss of ``model`` on ``batch`` and its gradients w.r.t. ``params`` (same order).
        Nothing else is updated or accumulated."""

    @abstractmethod
    def clip_grads(self, grads: list, max_norm: float | None) -> tuple[list, float]:
        """Global-norm clipping (torch's rule); returns the clipped grads and the norm before."""

    @abstractmethod
    def make_optimizer(self, params: list, optim_spec):
        """AdamW state for ``params``; see ``dualtune.optim.adamw_reference`` for the math."""

    @abstractmethod
    def apply_update(self, optimizer, grads: list, lr: float) -> None:
        """One AdamW step with learning rate ``lr``."""

    # -- evaluation
    @abstractmethod
    def eval_batch(self, model, batch: dict) -> tuple[float, np.ndarray]:
        """(mean loss, logits as numpy) without gradients; the loss is None when ``batch`` has no labels."""

    @abstractmethod
    def generate(self, model, batch: dict, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding; token ids as numpy (seq2seq)."""

    # -- saving and loading
    @abstractmethod
    def save(self, model, directory: str, peft_spec, exact: bool = False) -> None:
        """Adapters in Hugging Face PEFT format (full fine-tuning: the whole model). ``exact`` also
        writes every trainable tensor as it is, so training can restart from the directory."""

    @abstractmethod
    def load_weights(self, model, directory: str, peft_spec) -> None:
        """Overwrite the method's weights in ``model`` with those ``save`` wrote to ``directory``."""

    @abstractmethod
    def activations(self, model, batch: dict) -> dict[str, np.ndarray]:
        """Each module's output on ``batch`` (eval mode), by module name, plus ``logits``."""

    @abstractmethod
    def load_trained(self, model_spec, label_names: Sequence[str], tokenizer, peft_spec, directory: str):
        """The base model with the weights saved by ``save``, ready for evaluation."""


def torch_flavour() -> str | None:
    """Which ``torch`` this process has imported: None, "torch" (PyTorch) or "mindtorch" (mindnlp's shim)."""
    module = sys.modules.get("torch")
    if module is None:
        return "mindtorch" if "mindnlp" in sys.modules else None
    return "mindtorch" if "mindtorch" in (getattr(module, "__file__", None) or "") else "torch"


def active_backend() -> "Backend | None":
    return _active


def get_backend(name: str | None = None, device: str = "cpu") -> Backend:
    """Activate a backend for this process (``name``, else ``$DUALTUNE_BACKEND``, else torch)."""
    global _active
    name = name or os.environ.get("DUALTUNE_BACKEND") or "torch"
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if _active is not None:
        if _active.name != name:
            raise BackendError(
                f"the {_active.name} backend is already active in this process; {name} needs a "
                f"process of its own (mindnlp takes over `import torch` for the whole process)")
        return _active
    module = importlib.import_module(f"dualtune.backends.{name}")
    _active = module.create(device)
    return _active
