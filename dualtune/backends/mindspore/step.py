"""MindSpore's FrameworkStep, through mindtorch: MindSpore's functional autodiff (``loss.backward()``
is a no-op under mindtorch) and AdamW as one compiled graph over every trainable value at once
(mindtorch's ``torch.optim.AdamW`` has no CPU kernel for addcdiv, and ``zero_grad`` fails).

Imported by ``create`` after activation: its ``import torch`` must resolve to mindtorch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import mindspore
import mindtorch.nn.functional as mindtorch_functional
import numpy as np
import torch  # mindtorch here
from mindspore import communication, ops
from mindtorch.autograd import value_and_grad

from dualtune.backend import Batch, Tensor
from dualtune.backends.hf.backend import HFBackend
from dualtune.backends.mindspore import DEVICES, compat, cpu_speed
from dualtune.backends.mindspore.graphs import bert as bert_graph
from dualtune.backends.mindspore.graphs import llama as llama_graph
from dualtune.backends.mindspore.graphs import t5 as t5_graph
from dualtune.backends.mindspore.graphs.base import Architecture, Compiled, base_model

log = logging.getLogger("dualtune")

# mindspore.jit levels: O0 on CPU (measured here); O1 (operator fusion) on Ascend, as MindSpore
# recommends there; not run on Ascend or GPU.
JIT_LEVELS = {"cpu": "O0", "ascend": "O1", "gpu": "O0"}


def adamw_flat(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    decay: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    one_minus_beta1: Tensor,
    one_minus_beta2: Tensor,
    bc2_sqrt: Tensor,
    eps: Tensor,
    step_size: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """torch.optim.AdamW's arithmetic (``dualtune.optim.adamw_reference``) on one vector of every
    trainable value: (new values, new first and second moments). Compiled per device (``jit``)."""
    p = p * decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + g * g * one_minus_beta2
    denom = ops.sqrt(v) / bc2_sqrt + eps
    return p - m / denom * step_size, m, v


def sizes(tensors: Sequence[Tensor]) -> list[int]:
    """How many values each tensor holds."""
    return [int(np.prod(tuple(t.shape))) for t in tensors]


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """Every value of ``tensors``, in order, as one vector (a copy)."""
    if not tensors:
        return mindspore.Tensor(np.zeros(0, np.float32))
    return ops.concat([ops.reshape(t, (-1,)) for t in tensors])


def frozen_encoder(model: Any, params: Sequence[Tensor]) -> Any:
    """An encoder-decoder's encoder when no trainable parameter is in it or feeds it, else None.

    Prefix tuning feeds the decoder only (``past_key_values``); prompt tuning and p-tuning feed the
    encoder through its input embeddings, so they keep it in the gradient."""
    get_encoder = getattr(model, "get_encoder", None)
    if get_encoder is None or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    peft_config = getattr(model, "active_peft_config", None)
    if (
        getattr(peft_config, "is_prompt_learning", False)
        and getattr(peft_config, "peft_type", None) != "PREFIX_TUNING"
    ):
        return None
    encoder = get_encoder()
    trainable = {id(p) for p in params}
    return None if any(id(p) in trainable for p in encoder.parameters()) else encoder


def encoder_outputs(encoder: Any, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor]:
    """A frozen encoder's hidden states, computed outside the gradient recording: MindSpore
    differentiates every op it records, needed or not (torch skips ops that need no gradient)."""
    with torch.no_grad():
        return (encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,)


class DropoutRNG:
    """Where dropout masks come from on this backend, on every device: mask number ``calls`` of a run
    is drawn on the host from ``numpy.random.default_rng([seed, calls])``, so the whole state is two
    integers.

    mindtorch's own dropout cannot be seeded. On CPU (and, by its code, GPU) it runs MindSpore's
    ``Dropout`` primitive with ``Seed0 = Seed1 = 0``, and that kernel seeds itself
    (``std::random_device``): after ``mindspore.set_seed`` and ``torch.manual_seed`` two processes
    still draw different masks (measured on CPU). Where mindtorch does pass a seed (Ascend), it takes
    (seed, offset) from its default generator's ``_step``, which under MindSpore 2.7 never advances
    (measured on CPU: the offset stays 0), so it could not vary the masks either."""

    def __init__(self) -> None:
        self.seed, self.calls = 0, 0

    def manual_seed(self, seed: int) -> None:
        self.seed, self.calls = int(seed), 0

    def keep_scale(self, shape: tuple[int, ...], p: float) -> np.ndarray:
        """The next mask, already scaled: 0 with probability ``p``, else 1 / (1 - p) (float32)."""
        self.calls += 1
        return self._mask(self.calls - 1, shape, p)

    def keep_scales(self, sites: list[tuple[tuple[int, ...], float]]) -> list[np.ndarray]:
        """The next ``len(sites)`` masks, one per (shape, p): ``keep_scale``'s bytes, drawn on as
        many threads as the kernels use (numpy draws without the GIL). A compiled step takes 5-15 M
        mask values on t5-small: 144 ms on one thread, 49 ms on two (measured)."""
        first = self.calls
        self.calls += len(sites)
        calls = range(first, first + len(sites))
        return list(mask_threads().map(self._mask, calls, *zip(*sites))) if sites else []

    def _mask(self, call: int, shape: tuple[int, ...], p: float) -> np.ndarray:
        rng = np.random.default_rng([self.seed, call])
        keep = rng.random(shape, dtype=np.float32) >= p
        return keep.astype(np.float32) * np.float32(1.0 / (1.0 - p) if p < 1 else 0.0)

    def get_state(self) -> np.ndarray:
        return np.array([self.seed, self.calls], dtype=np.uint64)

    def set_state(self, state: np.ndarray) -> None:
        self.seed, self.calls = (int(v) for v in np.asarray(state, dtype=np.uint64))


DROPOUT_RNG = DropoutRNG()


@functools.cache
def mask_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(cpu_speed.cpu_threads(), thread_name_prefix="dualtune-dropout")


def seeded_dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``torch.nn.functional.dropout`` with its masks from ``DROPOUT_RNG`` (drawn on the host and
    multiplied in, so the gradient is the same mask)."""
    if not training or p == 0:
        return input
    keep = DROPOUT_RNG.keep_scale(tuple(input.shape), float(p))
    mask = torch.tensor(keep, dtype=input.dtype, device=input.device)
    out = input * mask
    if inplace:
        input.copy_(out)
        return input
    return out


def install_seeded_dropout() -> None:
    """Route mindtorch's dropout through ``seeded_dropout``. The patch goes on mindtorch's own module:
    ``torch.nn.functional`` is a proxy that forwards reads to it but keeps writes to itself.
    ``nn.Dropout`` (transformers' dropouts, peft's LoRA dropout) and mindtorch's
    ``scaled_dot_product_attention`` look ``dropout`` up there at call time, transformers through
    the proxy; nothing imports the name itself."""
    if not getattr(mindtorch_functional.dropout, "dualtune_seeded", False):
        mindtorch_functional.dropout = cpu_speed.marked(seeded_dropout, "dualtune_seeded")


def _mt_words(keys: Sequence[int] | np.ndarray, pos: int, has_gauss: int, gauss: float) -> np.ndarray:
    """A Mersenne Twister state as one uint32 array: 624 key words, position, has-gauss flag and
    the cached gaussian (a float64 as two words)."""
    extra = np.array([pos, has_gauss], dtype=np.uint32)
    gauss_words = np.array([gauss], dtype=np.float64).view(np.uint32)
    return np.concatenate([np.asarray(keys, dtype=np.uint32), extra, gauss_words])


def _mt_unwords(words: np.ndarray) -> tuple[np.ndarray, int, int, float]:
    words = np.ascontiguousarray(words, dtype=np.uint32)
    return words[:624], int(words[624]), int(words[625]), float(words[626:628].view(np.float64)[0])


def numpy_state() -> np.ndarray:
    # legacy=True (the default): the MT19937 tuple, not the dict numpy's stubs also allow
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    _, keys, pos, has_gauss, gauss = state
    return _mt_words(keys, pos, has_gauss, gauss)


def set_numpy_state(words: np.ndarray) -> None:
    keys, pos, has_gauss, gauss = _mt_unwords(words)
    np.random.set_state(("MT19937", keys, pos, has_gauss, gauss))


def python_state() -> np.ndarray:
    _, internal, gauss = random.getstate()  # version 3: 624 key words and the position
    return _mt_words(internal[:624], internal[624], gauss is not None, gauss or 0.0)


def set_python_state(words: np.ndarray) -> None:
    keys, pos, has_gauss, gauss = _mt_unwords(words)
    random.setstate((3, (*(int(k) for k in keys), pos), gauss if has_gauss else None))


GRAPH_ARCHITECTURES: tuple[Architecture, ...] = (t5_graph, bert_graph, llama_graph)


def graph_architecture(model: Any) -> tuple[Architecture, None] | tuple[None, str]:
    """(the module that writes ``model`` as compiled graphs, None), or (None, why none does)."""
    base = base_model(model)
    name = type(base).__name__
    for architecture in GRAPH_ARCHITECTURES:
        if architecture.MODEL_CLASS == name:
            reason = architecture.why_not(model)
            return (architecture, None) if reason is None else (None, reason)
    written = ", ".join(a.MODEL_CLASS for a in GRAPH_ARCHITECTURES)
    return None, f"{name} is not written as a graph ({written} are)"


class MindSporeBackend(HFBackend):
    name = "mindspore"

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self._grad_fns: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._adamw = mindspore.jit(adamw_flat, jit_level=JIT_LEVELS[device])

    def compile_seconds(self, model: Any) -> float | None:
        stats = getattr(model, "_dualtune_compile_stats", None)
        return stats["compile_seconds"] if stats and stats["compiles"] else None

    def compiled(self, model: Any, params: list[Tensor] | None = None) -> Compiled[Any] | None:
        """The model's compiled graphs (``CompiledT5``, ``CompiledBert``, ``CompiledLlama``), or
        None where they do not apply: switched off (``DUALTUNE_MINDSPORE_GRAPH=0``; unset, each
        architecture's ``ON_BY_DEFAULT``; ``1`` turns on every one), a model or adapter not
        written as a graph, gradient checkpointing (the graphs keep their own activations). Built
        once per model and trainable set; the reason for None is logged once."""
        if params is None:
            params = [p for _, p in self.trainable_parameters(model)]
        key = tuple(id(p) for p in params)
        cached = getattr(model, "_dualtune_graph", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        architecture, reason = graph_architecture(model)
        switch = os.environ.get("DUALTUNE_MINDSPORE_GRAPH")
        if switch == "0":
            reason = "off (DUALTUNE_MINDSPORE_GRAPH=0)"
        elif switch is None and architecture is not None and not architecture.ON_BY_DEFAULT:
            reason = (
                f"off by default for {architecture.MODEL_CLASS} (DUALTUNE_MINDSPORE_GRAPH=1 turns them on)"
            )
        elif os.environ.get("DUALTUNE_MINDSPORE_COMPAT", "1") == "0":
            reason = "mindtorch corrections off (the graphs always compute T5's buckets in float64)"
        elif getattr(model, "is_gradient_checkpointing", False):
            reason = "gradient checkpointing runs op by op"
        if architecture is not None and reason is None:
            if getattr(model, "_dualtune_compile_stats", None) is None:
                model._dualtune_compile_stats = {"compiles": 0, "compile_seconds": 0.0}
            compiled = architecture.COMPILED(
                model,
                params,
                DROPOUT_RNG,
                jit_level=JIT_LEVELS[self.device],
                stats=model._dualtune_compile_stats,
            )
            log.info(
                "mindspore: %s as compiled graphs (each new batch shape compiles once: seconds to minutes)",
                architecture.MODEL_CLASS,
            )
        else:
            compiled = None
            if cached is None:
                log.info("mindspore: op by op, no compiled graphs: %s", reason)
        model._dualtune_graph = (key, compiled)
        return compiled

    @property
    def torch_device(self) -> str:
        return DEVICES[self.device][1]

    def seed(self, seed: int) -> None:
        # numpy's and Python's global generators (mindtorch's CPU normal_ initialisation draws from
        # numpy), MindSpore's own op seeds
        mindspore.set_seed(seed)
        torch.manual_seed(seed)  # mindtorch's default generator: uniform_ initialisation (LoRA A), randperm
        DROPOUT_RNG.manual_seed(seed)  # dropout, which mindtorch cannot seed (see DropoutRNG)
        install_seeded_dropout()

    def rng_state(self) -> dict[str, np.ndarray]:
        # The default generator's state is a bare MindSpore tensor (no mindtorch device): asnumpy().
        return {
            # mindtorch's get_rng_state has asnumpy; mypy reads PyTorch's stubs for torch
            "mindtorch": torch.get_rng_state().asnumpy().copy(),  # type: ignore[attr-defined]
            "dropout": DROPOUT_RNG.get_state(),
            "numpy": numpy_state(),
            "python": python_state(),
        }

    def set_rng_state(self, state: dict[str, np.ndarray]) -> None:
        torch.set_rng_state(mindspore.Tensor(np.asarray(state["mindtorch"], dtype=np.uint8)))
        DROPOUT_RNG.set_state(state["dropout"])
        set_numpy_state(state["numpy"])
        set_python_state(state["python"])
        install_seeded_dropout()

    def enable_gradient_checkpointing(self, model: Any) -> None:
        super().enable_gradient_checkpointing(model)
        compat.recompute_checkpointed_layers(model, DROPOUT_RNG)  # mindtorch's checkpoint keeps everything

    def to_tensors(self, batch: dict[str, np.ndarray]) -> Batch:
        return {k: torch.tensor(v, dtype=torch.long, device=self.torch_device) for k, v in batch.items()}

    def value_and_grad(self, model: Any, params: list[Tensor], batch: Batch) -> tuple[Tensor, list[Tensor]]:
        compiled = self.compiled(model, params)
        if compiled is not None:
            input_ids, attention_mask, labels = (
                batch[k].asnumpy() for k in ("input_ids", "attention_mask", "labels")
            )
            loss, grads = compiled.value_and_grad(input_ids, attention_mask, labels, training=model.training)
            # the graph's outputs are bare MindSpore tensors: give them a device for mindtorch ops
            device = params[0].device
            return torch.tensor(loss, device=device), [torch.tensor(g, device=device) for g in grads]
        key = (id(model), len(params))
        if key not in self._grad_fns:

            def loss_fn(
                input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *encoder_outputs: Tensor
            ) -> Tensor:
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
                if encoder_outputs:
                    inputs["encoder_outputs"] = encoder_outputs
                return self._forward(model, inputs).loss

            self._grad_fns[key] = (
                value_and_grad(loss_fn, params, attach_grads=False),
                frozen_encoder(model, params),
            )
        grad_fn, encoder = self._grad_fns[key]
        hidden = (
            () if encoder is None else encoder_outputs(encoder, batch["input_ids"], batch["attention_mask"])
        )
        loss, grads = grad_fn(batch["input_ids"], batch["attention_mask"], batch["labels"], *hidden)
        # MindSpore hands back bare tensors; give them the parameters' device for mindtorch ops.
        return loss, [torch.tensor(g, device=p.device) for p, g in zip(params, grads)]

    def eval_batch(self, model: Any, batch: Batch) -> tuple[float | None, np.ndarray]:
        compiled = self.compiled(model)
        if compiled is None or ("labels" not in batch and compiled.needs_labels):
            return super().eval_batch(model, batch)
        return compiled.loss_and_logits(
            *(batch[k].asnumpy() for k in ("input_ids", "attention_mask", "labels") if k in batch)
        )

    def generate(self, model: Any, batch: Batch, max_new_tokens: int) -> np.ndarray:
        compiled = self.compiled(model)
        if compiled is None:
            return super().generate(model, batch, max_new_tokens)
        return compiled.generate(
            batch["input_ids"].asnumpy(), batch["attention_mask"].asnumpy(), max_new_tokens
        )

    def clip_grads(self, grads: list[Tensor], max_norm: float | None) -> tuple[list[Tensor], float]:
        # One vector, one host read: per tensor, each op is a launch and a float() a device sync.
        values = flat(grads)
        norm = math.sqrt(float(ops.sum(ops.square(values)).asnumpy()))
        if max_norm is not None:
            scale = min(1.0, max_norm / (norm + 1e-6))
            if scale < 1.0:
                grads = [g * scale for g in grads]
        return grads, norm

    def make_optimizer(self, params: list[Tensor], optim_spec: Any) -> dict[str, Any]:
        # The moments as one vector each, in the parameters' order (optimizer_state splits them).
        return {
            "params": params,
            "spec": optim_spec,
            "step": 0,
            "m": mindspore.Tensor(np.zeros(sum(sizes(params)), np.float32)),
            "v": mindspore.Tensor(np.zeros(sum(sizes(params)), np.float32)),
        }

    def apply_update(self, optimizer: Any, grads: list[Tensor], lr: float) -> None:
        # AdamW on one vector of every trainable value in one compiled graph, then copied back into
        # the parameters. Op by op, each of its 14 ops was a launch per tensor (t5_lora's 72
        # tensors: 190-260 ms a step); this way 31-41 ms, compiled in 0.1 s, and the same bytes
        # (elementwise arithmetic does not depend on how the values are laid out; measured). The
        # copy is ops.assign: a parameter handed the graph's output memory (assign_value) read NaN
        # once another model had been freed.
        spec = optimizer["spec"]
        b1, b2 = spec.betas
        optimizer["step"] += 1
        step = optimizer["step"]
        bc1, bc2_sqrt = 1.0 - b1**step, math.sqrt(1.0 - b2**step)
        scalars = (1.0 - lr * spec.weight_decay, b1, b2, 1.0 - b1, 1.0 - b2, bc2_sqrt, spec.eps, lr / bc1)
        params = optimizer["params"]
        values, optimizer["m"], optimizer["v"] = self._adamw(
            flat(params),
            flat(grads),
            optimizer["m"],
            optimizer["v"],
            *(mindspore.Tensor(x, mindspore.float32) for x in scalars),
        )
        for p, part in zip(params, ops.split(values, sizes(params))):
            ops.assign(p, ops.reshape(part, tuple(p.shape)))

    def peak_device_memory_mb(self) -> float | None:
        # MindSpore's device memory pool; on CPU it reports 0 (measured, 2.7.0): not a number to show.
        if self.device == "cpu":
            return None
        return mindspore.runtime.max_memory_allocated() / 2**20

    def device_info(self) -> dict:
        info: dict = {
            "device_target": mindspore.get_context("device_target"),
            "deterministic": mindspore.get_context("deterministic"),
            "mode": "pynative" if mindspore.get_context("mode") == mindspore.PYNATIVE_MODE else "graph",
        }
        if self.device == "ascend":
            # CANN's version file, where the toolkit is installed (the default prefix)
            for path in ("/usr/local/Ascend/ascend-toolkit/latest/version.cfg",):
                with contextlib.suppress(OSError), open(path) as f:
                    info["cann"] = f.read().strip().splitlines()[-1]
        return info

    def world(self) -> tuple[int, int]:
        if not communication.GlobalComm.INITED:
            return 0, 1
        return communication.get_rank(), communication.get_group_size()

    def all_reduce_flat(self, flat: Tensor) -> Tensor:
        # MindSpore's AllReduce primitive, the one that runs on CPU (mccl, measured under msrun):
        # ``communication.comm_func.all_reduce`` has no CPU kernel in MindSpore 2.7 ("Create
        # kernelmod for op InnerCommAllReduce failed"), and mindtorch's ``torch.distributed`` on an
        # mccl group fails ("'ProcessGroup' object has no attribute 'device'").
        return torch.tensor(mindspore.ops.AllReduce()(flat), device=flat.device)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return {
            "step": optimizer["step"],
            "exp_avg": per_parameter(optimizer["m"].asnumpy(), optimizer["params"]),
            "exp_avg_sq": per_parameter(optimizer["v"].asnumpy(), optimizer["params"]),
        }

    def load_optimizer_state(self, optimizer: Any, state: dict[str, Any]) -> None:
        optimizer["step"] = int(state["step"])
        for key, name in (("m", "exp_avg"), ("v", "exp_avg_sq")):
            values = [np.asarray(a, np.float32).reshape(-1) for a in state[name]]
            optimizer[key] = mindspore.Tensor(np.concatenate(values) if values else np.zeros(0, np.float32))


def per_parameter(values: np.ndarray, params: Sequence[Tensor]) -> list[np.ndarray]:
    """One vector of every parameter's values (``flat``'s layout) as one array per parameter."""
    ends = np.cumsum(sizes(params))
    return [part.reshape(tuple(p.shape)).copy() for part, p in zip(np.split(values, ends[:-1]), params)]
