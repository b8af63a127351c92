"""The MindSpore backend: transformers + peft on MindSpore through mindnlp's torch-API shim.

``import mindnlp`` makes every later ``import torch`` in this process yield mindtorch. Under it
``loss.backward()`` does nothing, ``torch.optim.AdamW`` has no CPU kernel (addcdiv) and
``zero_grad`` fails, so gradients come from MindSpore's functional autodiff and the AdamW update
is written here with plain in-place tensor ops (verified on CPU; the Ascend path is not run yet).
"""

from __future__ import annotations

import logging
import math
import os

from dualtune.backend import BackendError, torch_flavour

log = logging.getLogger("dualtune")

# --device -> (MindSpore device target, mindtorch device name)
DEVICES = {"cpu": ("CPU", "cpu"), "ascend": ("Ascend", "npu"), "gpu": ("GPU", "cuda")}


def activate(device: str) -> None:
    """Point MindSpore at ``device``, tune it for CPU, install mindnlp's ``import torch`` redirect."""
    if torch_flavour() == "torch":
        raise BackendError("the mindspore backend cannot start: PyTorch is already imported in this "
                           "process, and mindnlp would mix it with mindtorch; run mindspore in a separate process")
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
        log.info("mindtorch corrections: %s", ", ".join(compat.apply()) or "none needed")
    else:
        log.warning("mindtorch corrections OFF (DUALTUNE_MINDSPORE_COMPAT=0): numbers may differ from torch")
    return _backend_class()(device)


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
    import torch  # mindtorch here

    with torch.no_grad():
        return (encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,)


def _backend_class():
    # Defined after activation: its module-level `import torch` must resolve to mindtorch.
    import mindspore
    import torch
    from mindtorch.autograd import value_and_grad

    from dualtune.backends.hf import HFBackend

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

    return MindSporeBackend
