"""PyTorch's FrameworkStep: autograd, torch's own AdamW (foreach), global-norm clipping; bf16/fp16
through torch.autocast, fp16's dynamic loss scaling through torch.amp.GradScaler."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualtune.backend import Batch, Tensor
from dualtune.backends.hf.backend import HFBackend
from dualtune.backends.torch import export as exporting

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchBackend(HFBackend):
    name = "torch"
    fp16_init_scale = 2.0**16  # GradScaler's default; a test raises it to force overflows

    def __init__(self, device: str):
        super().__init__(device)
        self.scaler: torch.amp.GradScaler | None = None  # fp16: made with the optimizer

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # also seeds every CUDA device

    def rng_state(self) -> dict[str, np.ndarray]:
        state = {"cpu": torch.get_rng_state().numpy().copy()}
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            state["cuda"] = torch.cuda.get_rng_state(self.torch_device).numpy().copy()
        return state

    def set_rng_state(self, state: dict[str, np.ndarray]) -> None:
        torch.set_rng_state(torch.from_numpy(np.asarray(state["cpu"], dtype=np.uint8)))
        if "cuda" in state and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(
                torch.from_numpy(np.asarray(state["cuda"], dtype=np.uint8)), self.torch_device
            )

    def to_tensors(self, batch: dict[str, np.ndarray]) -> Batch:
        return {k: torch.from_numpy(v).to(self.torch_device) for k, v in batch.items()}

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward's autocast for ``precision`` (fp32: none)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def value_and_grad(self, model: Any, params: list[Tensor], batch: Batch) -> tuple[Tensor, list[Tensor]]:
        for p in params:
            p.grad = None
        with self.autocast():
            loss = self._forward(model, batch).loss
        # fp16: the gradients of the scaled loss; the trainer sums micro-batches and processes
        # (linear, one scale per step), then unscale_grads divides the scale out.
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return loss.detach().float(), [p.grad for p in params]

    def unscale_grads(self, optimizer: Any, grads: list[Tensor]) -> tuple[list[Tensor], bool]:
        if self.scaler is None:
            return grads, True
        params = optimizer.param_groups[0]["params"]
        for p, g in zip(params, grads):
            p.grad = g
        self.scaler.unscale_(optimizer)  # in place; records the overflow that scaler.step skips on
        grads = [p.grad for p in params]
        return grads, bool(torch.stack([g.isfinite().all() for g in grads]).all())

    def clip_grads(self, grads: list[Tensor], max_norm: float | None) -> tuple[list[Tensor], float]:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if max_norm is not None:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(scale)
        return grads, float(norm)

    def make_optimizer(self, params: list[Tensor], optim_spec: Any) -> torch.optim.AdamW:
        # A new optimizer, a new scale; none unless fp16 (the backend outlives a run in one process).
        self.scaler = (
            torch.amp.GradScaler(self.torch_device.type, init_scale=self.fp16_init_scale)
            if self.precision == "fp16"
            else None
        )
        return torch.optim.AdamW(
            params,
            lr=optim_spec.lr,
            betas=tuple(optim_spec.betas),
            eps=optim_spec.eps,
            weight_decay=optim_spec.weight_decay,
            foreach=True,
        )

    def apply_update(self, optimizer: Any, grads: list[Tensor], lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(optimizer.param_groups[0]["params"], grads):
            p.grad = g
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)  # skipped when unscale_grads found an overflow
            self.scaler.update()  # the scale halves after an overflow, doubles after 2000 clean steps
        for p in optimizer.param_groups[0]["params"]:
            p.grad = None

    def peak_device_memory_mb(self) -> float | None:
        if self.torch_device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.torch_device) / 2**20

    def device_info(self) -> dict:
        info: dict = {
            "threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        }
        if self.torch_device.type == "cuda":
            info.update(
                accelerator=torch.cuda.get_device_name(self.torch_device),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
                cudnn_deterministic=torch.backends.cudnn.deterministic,
            )
        return info

    def world(self) -> tuple[int, int]:
        if not torch.distributed.is_initialized():
            return 0, 1
        return torch.distributed.get_rank(), torch.distributed.get_world_size()

    def all_reduce_flat(self, flat: Tensor) -> Tensor:
        torch.distributed.all_reduce(flat)
        return flat

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        params = optimizer.param_groups[0]["params"]
        states = [optimizer.state.get(p, {}) for p in params]
        step = int(states[0]["step"]) if states and "step" in states[0] else 0
        moments = {
            key: [
                self.to_numpy(s[key]).copy() if key in s else np.zeros(tuple(p.shape), np.float32)
                for p, s in zip(params, states)
            ]
            for key in ("exp_avg", "exp_avg_sq")
        }
        return {"step": step, **moments}

    def load_optimizer_state(self, optimizer: Any, state: dict[str, Any]) -> None:
        params = optimizer.param_groups[0]["params"]
        for i, p in enumerate(params):
            optimizer.state[p] = {
                "step": torch.tensor(float(state["step"]), dtype=torch.float32),
                "exp_avg": torch.tensor(state["exp_avg"][i], device=p.device),
                "exp_avg_sq": torch.tensor(state["exp_avg_sq"][i], device=p.device),
            }

    # -- dualtune export
    def merge_trained(self, model: Any, peft_spec: Any) -> Any:
        return exporting.merge_trained(model, peft_spec)

    def export(
        self, model: Any, tokenizer: Any, task: str, fmt: str, directory: Path, name_or_path: str
    ) -> list[str]:
        return exporting.export(model, tokenizer, task, fmt, directory, name_or_path)

    def load_exported(
        self, directory: Path, fmt: str, task: str
    ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        return exporting.load_exported(directory, fmt, task, self.torch_device)
