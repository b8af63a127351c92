"""MindSpore's FrameworkStep, through mindtorch: MindSpore's functional autodiff (``loss.backward()``
is a no-op under mindtorch) and AdamW in plain in-place tensor ops (mindtorch's ``torch.optim.AdamW``
has no CPU kernel for addcdiv, and ``zero_grad`` fails).

Imported by ``create`` after activation: its ``import torch`` must resolve to mindtorch.
"""

from __future__ import annotations

import math

import mindspore
import numpy as np
import torch  # mindtorch here
from mindtorch.autograd import value_and_grad

from dualtune.backends.hf.backend import HFBackend
from dualtune.backends.mindspore import DEVICES


def frozen_encoder(model, params):
    """An encoder-decoder's encoder when no trainable parameter is in it or feeds it, else None.

    Prefix tuning feeds the decoder only (``past_key_values``); prompt tuning and p-tuning feed the
    encoder through its input embeddings, so they keep it in the gradient."""
    get_encoder = getattr(model, "get_encoder", None)
    if get_encoder is None or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False) and peft_config.peft_type != "PREFIX_TUNING":
        return None
    encoder = get_encoder()
    trainable = {id(p) for p in params}
    return None if any(id(p) in trainable for p in encoder.parameters()) else encoder


def encoder_outputs(encoder, input_ids, attention_mask) -> tuple:
    """A frozen encoder's hidden states, computed outside the gradient recording: MindSpore
    differentiates every op it records, needed or not (torch skips ops that need no gradient)."""
    with torch.no_grad():
        return (encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,)

class MindSporeBackend(HFBackend):
    name = "mindspore"

    def __init__(self, device: str):
        super().__init__(device)
        self._grad_fns: dict = {}

    @property
    def torch_device(self):
        return DEVICES[self.device][1]

    def seed(self, seed: int) -> None:
        mindspore.set_seed(seed)
        torch.manual_seed(seed)

    def rng_state(self):
        return {"mindtorch": self.to_numpy(torch.get_rng_state()).copy()}

    def set_rng_state(self, state):
        torch.set_rng_state(torch.tensor(np.asarray(state["mindtorch"])))

    def to_tensors(self, batch):
        return {k: torch.tensor(v, dtype=torch.long, device=self.torch_device) for k, v in batch.items()}

    def value_and_grad(self, model, params, batch):
        key = (id(model), len(params))
        if key not in self._grad_fns:
            def loss_fn(input_ids, attention_mask, labels, *encoder_outputs):
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
                if encoder_outputs:
                    inputs["encoder_outputs"] = encoder_outputs
                return self._forward(model, inputs).loss

            self._grad_fns[key] = (value_and_grad(loss_fn, params, attach_grads=False),
                                   frozen_encoder(model, params))
        grad_fn, encoder = self._grad_fns[key]
        hidden = () if encoder is None else encoder_outputs(encoder, batch["input_ids"], batch["attention_mask"])
        loss, grads = grad_fn(batch["input_ids"], batch["attention_mask"], batch["labels"], *hidden)
        # MindSpore hands back bare tensors; give them the parameters' device for mindtorch ops.
        return loss, [torch.tensor(g, device=p.device) for p, g in zip(params, grads)]

    def clip_grads(self, grads, max_norm):
        # One host read for the whole norm (a float() per tensor costs a device sync each).
        norm = math.sqrt(self.to_float(torch.stack([(g * g).sum() for g in grads]).sum()))
        if max_norm is not None:
            scale = min(1.0, max_norm / (norm + 1e-6))
            if scale < 1.0:
                grads = [g * scale for g in grads]
        return grads, norm

    def make_optimizer(self, params, optim_spec):
        return {"params": params, "spec": optim_spec, "step": 0,
                "m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params]}

    def apply_update(self, optimizer, grads, lr):
        # torch.optim.AdamW's arithmetic (see dualtune.optim.adamw_reference), in-place ops only.
        spec = optimizer["spec"]
        b1, b2 = spec.betas
        optimizer["step"] += 1
        step = optimizer["step"]
        bc1, bc2_sqrt = 1.0 - b1**step, math.sqrt(1.0 - b2**step)
        with torch.no_grad():
            for p, g, m, v in zip(optimizer["params"], grads, optimizer["m"], optimizer["v"]):
                p.mul_(1.0 - lr * spec.weight_decay)
                m.mul_(b1).add_(g * (1.0 - b1))
                v.mul_(b2).add_(g * g * (1.0 - b2))
                denom = (v.sqrt() / bc2_sqrt).add_(spec.eps)
                p.sub_(m / denom * (lr / bc1))


    def optimizer_state(self, optimizer):
        return {"step": optimizer["step"], "exp_avg": [self.to_numpy(m).copy() for m in optimizer["m"]],
                "exp_avg_sq": [self.to_numpy(v).copy() for v in optimizer["v"]]}

    def load_optimizer_state(self, optimizer, state):
        optimizer["step"] = int(state["step"])
        optimizer["m"] = [torch.tensor(np.asarray(a), device=p.device) for a, p in zip(state["exp_avg"], optimizer["params"])]
        optimizer["v"] = [torch.tensor(np.asarray(a), device=p.device)
                          for a, p in zip(state["exp_avg_sq"], optimizer["params"])]
