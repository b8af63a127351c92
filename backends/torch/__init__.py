"""The PyTorch backend: transformers + peft on real torch, CPU or CUDA."""

from __future__ import annotations

from dualtune.backend import BackendError, torch_flavour

if torch_flavour() == "mindtorch":
    raise BackendError("the torch backend cannot start: MindSpore (mindnlp) is already active in this "
                       "process and `import torch` now means mindtorch; run torch in a separate process")

import torch  # noqa: E402

from dualtune.backends.hf import HFBackend  # noqa: E402


class TorchBackend(HFBackend):
    name = "torch"

    def __init__(self, device: str):
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise BackendError(f"--device {device}: the torch backend runs on cpu or cuda")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"--device {device}: torch sees no CUDA device here")
        super().__init__(device)

    @property
    def torch_device(self):
        return torch.device(self.device)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def to_tensors(self, batch):
        return {k: torch.from_numpy(v).to(self.torch_device) for k, v in batch.items()}

    def value_and_grad(self, model, params, batch):
        for p in params:
            p.grad = None
        loss = self._forward(model, batch).loss
        loss.backward()
        return loss.detach(), [p.grad for p in params]

    def clip_grads(self, grads, max_norm):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if max_norm is not None:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(scale)
        return grads, float(norm)

    def make_optimizer(self, params, optim_spec):
        return torch.optim.AdamW(params, lr=optim_spec.lr, betas=tuple(optim_spec.betas), eps=optim_spec.eps,
                                 weight_decay=optim_spec.weight_decay, foreach=True)

    def apply_update(self, optimizer, grads, lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(optimizer.param_groups[0]["params"], grads):
            p.grad = g
        optimizer.step()
        for p in optimizer.param_groups[0]["params"]:
            p.grad = None


def create(device: str = "cpu") -> TorchBackend:
    return TorchBackend(device)
