"""The seam between the core and a framework, in two levels.

``FrameworkStep`` is what a new framework writes: its device, seeding (and the generators' state for
checkpoints), numpy batches to tensors, the value-and-grad step, clipping, and AdamW (state, update,
and the state as numpy for checkpoints).
``Backend`` is everything the core calls: the framework step plus the model-level work (loading,
applying the PEFT method, evaluation, generation, saving). For Hugging Face models that model-level
work is written once, through the torch API, in ``dualtune.backends.hf`` (it runs on PyTorch and,
through mindnlp's torch shim, on MindSpore), so a framework whose models are Hugging Face's
subclasses ``HFBackend`` and supplies only the ``FrameworkStep`` methods: see
``dualtune/backends/torch/step.py`` (about 60 lines) and ARCHITECTURE.md.

Every framework package (``dualtune.backends.<name>``) has a module-level ``create(device)`` that
activates the framework in this process and returns its backend. Choosing a backend is
process-wide: mindnlp redirects ``import torch`` to its MindSpore shim for the rest of the process,
so the backend is activated before transformers is imported and only one backend can be active per
process.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualtune.errors import BackendError

__all__ = [
    "Backend",
    "BackendError",
    "Framework",
    "FrameworkStep",
    "backend_names",
    "check_precision",
    "default_backend",
    "framework",
    "frameworks",
    "get_backend",
    "no_pad_token",
]

_active: Backend | None = None


def no_pad_token(name_or_path: str) -> BackendError:
    """The error for a tokenizer without a pad token and no ``model.pad_token_as_eos``."""
    return BackendError(
        f"tokenizer of {name_or_path} has no pad token; set model.pad_token_as_eos=true (decoder LLMs)"
    )


Tensor = Any  # a framework tensor; the core never looks inside one
Batch = dict[str, Tensor]


class FrameworkStep(ABC):
    """What a framework must supply. The core calls these in this order each optimizer step:
    ``to_tensors`` (numpy batch in), ``value_and_grad``, ``clip_grads``, ``apply_update``."""

    name: str  # "torch", "mindspore": the --backend value
    device: str  # the --device value this backend was created for ("cpu", "cuda:0", "ascend")
    # train.precision (set by dualtune.prepare before the model loads): "bf16"/"fp16" autocast the
    # forward and loss in value_and_grad; parameters, gradients and AdamW's state stay float32.
    precision: str = "fp32"

    @abstractmethod
    def seed(self, seed: int) -> None:
        """Seed every random generator the framework draws from (initialisation, dropout), so that
        the same seed gives the same run."""

    @abstractmethod
    def rng_state(self) -> dict[str, np.ndarray]:
        """The state of every generator ``seed`` seeds, as numpy arrays (for a checkpoint); restoring
        it with ``set_rng_state`` makes the following dropout masks the same as without a stop."""

    @abstractmethod
    def set_rng_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore generators from ``rng_state`` of this same framework."""

    @abstractmethod
    def to_tensors(self, batch: dict[str, np.ndarray]) -> Batch:
        """A numpy batch (int64 ``input_ids``, ``attention_mask`` and usually ``labels``) as tensors
        on this backend's device, same keys."""

    @abstractmethod
    def value_and_grad(self, model: Any, params: list[Tensor], batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """The loss of ``model`` on ``batch`` (a scalar tensor) and its gradients with respect to
        ``params``, in the same order. Nothing else is updated or accumulated."""

    def unscale_grads(self, optimizer: Any, grads: list[Tensor]) -> tuple[list[Tensor], bool]:
        """fp16's loss scaling undone (called after the step's gradients are summed, before
        clipping): the gradients of the unscaled loss, and False when one overflowed; the following
        ``apply_update`` then changes nothing and lowers the scale. No loss scaling: (``grads``, True)."""
        return grads, True

    @abstractmethod
    def clip_grads(self, grads: list[Tensor], max_norm: float | None) -> tuple[list[Tensor], float]:
        """Global-norm clipping by torch's rule (``dualtune.optim.clip_scale``): the clipped
        gradients and the norm before clipping. ``max_norm`` None: no clipping, norm still computed."""

    @abstractmethod
    def make_optimizer(self, params: list[Tensor], optim_spec: Any) -> Any:
        """AdamW state for ``params`` (zero moments, step 0); an opaque object the core passes back
        to ``apply_update``. The arithmetic is ``dualtune.optim.adamw_reference``."""

    @abstractmethod
    def apply_update(self, optimizer: Any, grads: list[Tensor], lr: float) -> None:
        """One AdamW step on the parameters with learning rate ``lr`` (the core's schedule)."""

    @abstractmethod
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """AdamW's state as numpy, for a framework-neutral checkpoint: ``{"step": int, "exp_avg":
        [array per param], "exp_avg_sq": [array per param]}`` (torch.optim.AdamW's names)."""

    @abstractmethod
    def load_optimizer_state(self, optimizer: Any, state: dict[str, Any]) -> None:
        """Overwrite ``optimizer`` (from ``make_optimizer``) with ``state`` as ``optimizer_state``
        returns it, possibly written by another framework."""

    # -- data parallel: a framework that launches several processes overrides both
    def world(self) -> tuple[int, int]:
        """(this process's rank, number of processes); one process: (0, 1)."""
        return 0, 1

    def all_reduce_sum(self, tensors: list[Tensor], scalars: list[float]) -> tuple[list[Tensor], list[float]]:
        """Each tensor and each float summed over every process (the same result on each)."""
        if self.world()[1] != 1:
            raise NotImplementedError(
                f"{type(self).__name__} runs several processes but has no all_reduce_sum"
            )
        return tensors, scalars


class Backend(FrameworkStep):
    """Everything the core calls. ``dualtune.backends.hf.HFBackend`` implements all but the
    ``FrameworkStep`` methods for Hugging Face models."""

    def peak_device_memory_mb(self) -> float | None:
        """The accelerator's peak allocated memory in this process so far (MiB), or None where the
        framework reports none (CPU)."""
        return None

    def device_info(self) -> dict[str, Any]:
        """What a run record says of the device and the framework's settings: the accelerator's model
        and toolkit versions (CUDA, CANN), the determinism settings in force. Framework-free facts
        (packages, CPU, environment variables) come from ``dualtune.environment``."""
        return {}

    def compile_seconds(self, model: Any) -> float | None:
        """Seconds spent compiling ``model``'s graphs (each graph's first call per shape, its run
        included), or None where the backend compiles none for it."""
        return None

    # -- tensors
    @abstractmethod
    def to_numpy(self, tensor: Tensor) -> np.ndarray: ...

    def to_float(self, tensor: Tensor) -> float:
        """A scalar tensor as a Python float, exactly (mindtorch's float() rounds to 6 digits)."""
        return float(self.to_numpy(tensor).item())

    # -- model
    @abstractmethod
    def load_tokenizer(self, model_spec: Any) -> Any: ...

    @abstractmethod
    def load_model(self, model_spec: Any, label_names: Sequence[str], tokenizer: Any) -> Any: ...

    @abstractmethod
    def apply_peft(self, model: Any, peft_spec: Any, task: str, seed: int) -> Any:
        """``model`` with the recipe's method applied (seeded); only the method's tensors (and a
        classification head) stay trainable."""

    @abstractmethod
    def trainable_parameters(self, model: Any) -> list[tuple[str, Tensor]]: ...

    @abstractmethod
    def parameter_count(self, model: Any) -> int: ...

    @abstractmethod
    def set_training(self, model: Any, training: bool) -> None:
        """Train mode (dropout on) or eval mode; the core uses ``dualtune.evaluation.eval_mode``."""

    def enable_gradient_checkpointing(self, model: Any) -> None:
        """Recompute each layer's activations in the backward pass instead of keeping them
        (``train.gradient_checkpointing``); called on the loaded model before the method is applied."""
        raise BackendError(f"train.gradient_checkpointing: the {self.name} backend cannot checkpoint")

    @abstractmethod
    def disable_dropout(self, model: Any) -> int:
        """Dropout off everywhere (returns how many modules); for runs two backends must match."""

    @abstractmethod
    def set_class_weights(self, model: Any, weights: np.ndarray | None) -> None:
        """Classification loss becomes class-weighted cross-entropy (torch's weighted mean), or plain."""

    @abstractmethod
    def trainable_state(self, model: Any) -> dict[str, np.ndarray]:
        """Every trainable tensor by name, as numpy copies."""

    @abstractmethod
    def assign_trainable(self, model: Any, state: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable tensors with ``state`` (as returned by ``trainable_state``)."""

    # -- evaluation
    @abstractmethod
    def eval_batch(self, model: Any, batch: Batch) -> tuple[float | None, np.ndarray]:
        """(mean loss, logits as numpy) without gradients; the loss is None when ``batch`` has no labels."""

    @abstractmethod
    def generate(self, model: Any, batch: Batch, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding of at most ``max_new_tokens`` tokens, stopping at the model's EOS; the
        new token ids as numpy (seq2seq: the decoder's; causal_lm: those after the left-padded prompt)."""

    @abstractmethod
    def activations(self, model: Any, batch: Batch) -> dict[str, np.ndarray]:
        """Each module's output on ``batch`` (eval mode), by module name, plus ``logits``."""

    # -- saving and loading
    @abstractmethod
    def save(self, model: Any, directory: Path, peft_spec: Any, exact: bool = False) -> None:
        """Adapters in Hugging Face PEFT format (full fine-tuning: the whole model). ``exact`` also
        writes every trainable tensor as it is, so training can restart from the directory."""

    @abstractmethod
    def load_weights(self, model: Any, directory: Path, peft_spec: Any) -> None:
        """Overwrite the method's weights in ``model`` with those ``save`` wrote to ``directory``."""

    @abstractmethod
    def load_trained(
        self, model_spec: Any, label_names: Sequence[str], tokenizer: Any, peft_spec: Any, directory: Path
    ) -> Any:
        """The base model with the weights saved by ``save``, ready for evaluation."""

    @abstractmethod
    def save_tiny_model(self, kind: str, directory: Path, vocab_texts: Sequence[str], seed: int = 0) -> None:
        """A tiny random model of ``kind`` (``dualtune.tiny.TINY_KINDS``) and its tokenizer."""

    # -- export (``dualtune export``): only frameworks whose descriptor lists ``export_formats``
    def merge_trained(self, model: Any, peft_spec: Any) -> Any:
        """``load_trained``'s model as the plain model class, the method's weights folded into its
        own tensors (a weight-level method: LoRA, IA3, BitFit, none)."""
        raise cannot_export(self.name)

    def export(
        self, model: Any, tokenizer: Any, task: str, fmt: str, directory: Path, name_or_path: str
    ) -> list[str]:
        """Write ``merge_trained``'s ``model`` as ``fmt`` (``Framework.export_formats``) into the new
        folder ``directory``, with its config and tokenizer; the names written. ``name_or_path``: the
        base model as the recipe names it, for the config (not this machine's path to it)."""
        raise cannot_export(self.name)

    def load_exported(
        self, directory: Path, fmt: str, task: str
    ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """What ``export`` wrote, loaded as its users will load it (without dualtune or peft): a
        function from a numpy batch (``input_ids``, ``attention_mask``; seq2seq also ``labels``,
        teacher forcing) to its logits as numpy."""
        raise cannot_export(self.name)


class Framework:
    """What the core knows of a framework without loading it: each backend package's ``descriptor``
    module holds one (``DESCRIPTOR``), importing nothing heavier than the standard library, so the
    CLI, ``validate`` and the launchers can ask before any framework is in the process."""

    name: str  # the --backend value
    order: int = 100  # place in --backend's choices; the lowest is the default backend
    device_help: str  # "cpu | cuda[:N]": the --device values, for --help
    launcher: str  # how --nproc N starts N processes ("torchrun", "msrun"), for --help
    packages: tuple[str, ...] = ()  # the distributions whose versions a run records
    # why it cannot share a process with another framework (the end of that one-line refusal)
    process_note: str = "one framework per process"
    # what ``dualtune export`` can write on it ("merged", "onnx"); none: it cannot export
    export_formats: tuple[str, ...] = ()

    def check_device(self, device: str) -> None:
        """Refuse, as one ``BackendError`` line, a --device this framework cannot use or that this
        machine visibly lacks (a cheap probe: the framework's own check still runs when it loads)."""

    def precisions(self, device: str) -> tuple[str, ...]:
        """The ``train.precision`` values it trains in on ``device``."""
        return ("fp32",)

    def precision_refusal(self, device: str, precision: str) -> str:
        """Why ``precision`` is refused on ``device``: the end of the one error line."""
        return f"the {self.name} backend trains in {', '.join(self.precisions(device))}"

    def launched_rank(self) -> int | None:
        """This process's rank when this framework's launcher started it, else None."""
        return None

    def serve_launcher_process(self) -> bool:
        """A process the launcher starts to serve the others (not a worker): serve, return True."""
        return False

    def launch(self, nproc: int, argv: list[str], output: Path) -> int:
        """Run ``dualtune <argv>`` on ``nproc`` processes of this machine (data parallel), writing
        the run directory ``output``; the job's exit status (128 + a signal passed on)."""
        raise BackendError(f"--nproc {nproc}: the {self.name} backend runs in one process only")


def cannot_export(backend: str) -> BackendError:
    """The one line for a backend without ``dualtune export``, naming those that have it."""
    able = [f.name for f in frameworks() if f.export_formats]
    hint = f"; export with --backend {' or '.join(able)}" if able else ""
    return BackendError(f"the {backend} backend cannot export a run{hint}")


def frameworks() -> list[Framework]:
    """Every framework package under ``dualtune/backends`` that describes itself, default first."""
    if not _frameworks:
        import dualtune.backends

        for info in pkgutil.iter_modules(dualtune.backends.__path__):
            try:
                module = importlib.import_module(f"dualtune.backends.{info.name}.descriptor")
            except ModuleNotFoundError as err:
                if err.name != f"dualtune.backends.{info.name}.descriptor":
                    raise
                continue  # a shared package (hf), not a framework
            _frameworks.append(module.DESCRIPTOR)
        _frameworks.sort(key=lambda f: (f.order, f.name))
    return list(_frameworks)


_frameworks: list[Framework] = []


def backend_names() -> tuple[str, ...]:
    return tuple(f.name for f in frameworks())


def default_backend() -> str:
    """``$DUALTUNE_BACKEND``, else the first framework."""
    return os.environ.get("DUALTUNE_BACKEND") or frameworks()[0].name


def framework(name: str) -> Framework:
    for f in frameworks():
        if f.name == name:
            return f
    raise BackendError(f"unknown backend {name!r}: expected one of {', '.join(backend_names())}")


def launched_rank() -> int | None:
    """This process's rank when a framework's launcher started it (data parallel), else None."""
    for f in frameworks():
        rank = f.launched_rank()
        if rank is not None:
            return rank
    return None


def check_precision(backend: str, device: str, precision: str) -> None:
    """``train.precision`` must be one ``backend`` trains in: one line otherwise (before any model loads).
    A backend no framework package describes (a library user's own ``HFBackend``) trains in fp32 only."""
    if backend not in backend_names():
        if precision != "fp32":
            raise BackendError(
                f"train.precision {precision}: backend {backend!r} is not a registered framework "
                "(dualtune/backends/<name>/descriptor.py); only fp32 is assumed"
            )
        return
    fw = framework(backend)
    if precision not in fw.precisions(device):
        raise BackendError(f"train.precision {precision}: {fw.precision_refusal(device, precision)}")


def get_backend(name: str | None = None, device: str = "cpu") -> Backend:
    """Activate a backend for this process (``name``, else ``$DUALTUNE_BACKEND``, else the default)."""
    global _active
    name = name or default_backend()
    wanted = framework(name)  # an unknown name: one line
    if _active is not None:
        if _active.name != name:
            active = framework(_active.name)
            why = (
                active.process_note if active.process_note != Framework.process_note else wanted.process_note
            )
            raise BackendError(
                f"the {_active.name} backend is already active in this process; {name} needs a "
                f"process of its own ({why})"
            )
        return _active
    module = importlib.import_module(f"dualtune.backends.{name}")
    backend: Backend = module.create(device)
    _active = backend
    return backend
