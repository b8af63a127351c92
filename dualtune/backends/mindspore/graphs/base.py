"""Models as compiled MindSpore graphs: what every architecture shares.

Under PyNative every MindSpore op costs about 100 us to launch on CPU (260 us when recorded for a
gradient; torch: 8 us), and a step of a real model runs thousands of them: at real sentence lengths
most of a step is launch cost. transformers' model code cannot be compiled (``mindspore.jit``
rejects its ``try`` statements; bytecode capture was no faster; trace capture fails inside
mindtorch), so each architecture module (``t5``, ``bert``, ``llama``) writes
its model's forward once more in MindSpore ops, over the model's own parameters (mindtorch
parameters are MindSpore tensors: no copy), and compiles it with ``mindspore.jit``: the loss with
its gradient, the forward for evaluation, and whatever else the task needs (T5's greedy decoding
step). Each module says whether it is on by default (``ON_BY_DEFAULT``: where whole runs measured
shorter with it).

Same arithmetic as transformers 4.57 + peft 0.18 in the same order (tests/mindspore/test_graph.py
checks losses, gradients, logits and generations against the PyNative path). Dropout masks come
from the backend's host generator (``DropoutRNG``), one per dropout site in a fixed order, as graph
inputs: seeded, resumable, byte-reproducible. Shapes: each batch is padded to a bucket (exact:
padded tokens are masked, padded rows count for nothing), so a run compiles a handful of graphs.
Each architecture's ``why_not`` says which models and adapters it covers; anything else runs op
by op as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import mindspore
import numpy as np
from mindspore import nn, ops

from dualtune.backend import Tensor

# Source lengths are padded up to one of these (past the last, to a multiple of 64), rows to a power
# of two. Each shape is a compile (17-30 s for a t5-small training step here): few shapes, at most a
# quarter of padding above 32 tokens.
SOURCE_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128)
FLOAT32_MIN = float(np.finfo(np.float32).min)


def lora_parts(module: Any) -> tuple[Tensor, Tensor, float, Any] | None:
    """(A, B, scaling, dropout module) of a peft LoRA linear with one plain adapter, else None."""
    adapters = getattr(module, "active_adapters", None)
    if not hasattr(module, "lora_A") or not adapters or len(adapters) != 1:
        return None
    name = adapters[0]
    if getattr(module, "use_dora", {}).get(name) or name not in module.lora_A:
        return None
    return (
        module.lora_A[name].weight,
        module.lora_B[name].weight,
        float(module.scaling[name]),
        module.lora_dropout[name],
    )


def active_module(module: Any) -> Any:
    """The module that runs in ``module``'s place: the active copy of a peft ``ModulesToSaveWrapper``
    (the classification head peft trains and saves), else the module itself."""
    if not hasattr(module, "modules_to_save") or not hasattr(module, "original_module"):
        return module
    adapters = module.active_adapters
    if module.disable_adapters or not adapters or adapters[0] not in module.modules_to_save:
        return module.original_module
    return module.modules_to_save[adapters[0]]


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself: no peft)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def peft_type(model: Any) -> str:
    """The active peft method: NONE (no peft: full fine-tuning, BitFit), LORA, PREFIX_TUNING, ..."""
    config = getattr(model, "active_peft_config", None)
    return str(getattr(config, "peft_type", "NONE")).split(".")[-1]


def lora_why_not(base: Any) -> str | None:
    """None when every LoRA layer in ``base`` is one the graphs write (one plain adapter on a linear)."""
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and lora_parts(module) is None:
            return f"LoRA layer {name} (DoRA, several adapters, an embedding)"
        if hasattr(module, "lora_A") and getattr(module, "lora_bias", {}).get(module.active_adapters[0]):
            return "LoRA with lora_bias"
    return None


def adapter_why_not(model: Any, base: Any) -> str | None:
    """None for no peft adapter (full fine-tuning, BitFit) and plain LoRA, else why not."""
    method = peft_type(model)
    if method == "LORA":
        return lora_why_not(base)
    if method != "NONE":
        return f"{method.lower()} on {type(base).__name__} is not written as a graph"
    return None


def classifier_why_not(model: Any, base: Any) -> str | None:
    """None for a single-label classifier with no adapter or plain LoRA, else why not."""
    if base.num_labels < 2 or base.config.problem_type not in (None, "single_label_classification"):
        return "only single-label classification"
    return adapter_why_not(model, base)


class Plan:
    """Where each weight of a model lives (trainable or frozen, index), which LoRA adapters and
    dropout sites there are. Built in Python once per model; the graph reads it as constants.
    An architecture's plan calls ``add``, ``linear`` and ``site`` for its weights and sites, and
    says each site's mask shape (``mask_shape``)."""

    def __init__(self, trainable: Sequence[Tensor]) -> None:
        self.dropout_refs: dict[str, tuple[Any, str]] = {}
        self.trainable_ids = {id(p): i for i, p in enumerate(trainable)}
        self.trainable: list[Tensor] = list(trainable)
        self.frozen: list[Tensor] = []
        self.index: dict[str, tuple[int, int]] = {}
        self.lora: dict[str, float] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        if id(tensor) in self.trainable_ids:
            self.index[name] = (0, self.trainable_ids[id(tensor)])
        else:
            # A copy, made once: a parameter (``__parameter__``) cannot be a graph input, and
            # frozen weights do not change during a run.
            self.index[name] = (1, len(self.frozen))
            self.frozen.append(graph_tensor(tensor))

    def linear(self, name: str, module: Any) -> None:
        module = active_module(module)
        parts = lora_parts(module) if hasattr(module, "lora_A") else None
        base = module if parts is None else module.base_layer
        self.add(name, base.weight)
        if base.bias is not None:
            self.add(name + ".bias", base.bias)
        if parts is None:
            return
        a, b, scaling, dropout = parts
        self.add(name + ".lora_A", a)
        self.add(name + ".lora_B", b)
        self.lora[name] = scaling
        self.site(name + ".lora", dropout)  # p read at each step (Identity when 0: no p)

    def site(self, name: str, module: Any, attr: str = "p") -> None:
        self.dropout_refs[name] = (module, attr)

    def constants(self) -> tuple[Any, ...]:
        """The architecture's own constants (dimensions, epsilons, ...)."""
        raise NotImplementedError

    def mask_shape(self, name: str, *shape: int) -> tuple[int, ...]:
        raise NotImplementedError

    def signature(self) -> tuple[Any, ...]:
        """Everything a graph compiles in as a constant: models with equal signatures share graphs
        (weights are inputs), so a second model of one structure in a process (a notebook's second
        run, the test suite) compiles nothing new. (Sweep trials are processes of their own.)
        MindSpore's compile cache across processes does not key on these constants (it served a
        LoRA alpha of 16's gradients to a model with alpha 64), so it stays off."""
        return (
            type(self).__name__,
            tuple(sorted(self.index.items())),
            tuple(sorted(self.lora.items())),
            self.constants(),
        )

    def dropout_sites(self, *shape: int) -> list[tuple[str, tuple[int, ...], float]]:
        """(site, mask shape, p) for every dropout that runs, in a fixed order (the masks' draw
        order). p is read from the modules each time: ``disable_dropout`` may have zeroed them."""
        sites: list[tuple[str, tuple[int, ...], float]] = []
        for name, (module, attr) in self.dropout_refs.items():
            p = float(getattr(module, attr, 0.0) or 0.0)
            if p > 0:
                sites.append((name, self.mask_shape(name, *shape), p))
        return sites


class GraphNet(nn.Cell):
    """A model's forward in MindSpore ops over (trainable, frozen) weight tuples ``t``, ``f``.
    ``site`` names index the dropout-mask tuple; a site not in ``sites`` does not run (p = 0 or
    evaluation)."""

    def __init__(self, plan: Plan, sites: tuple[str, ...]) -> None:
        super().__init__()
        self.index = plan.index
        self.lora = dict(plan.lora)
        self.sites = {name: i for i, name in enumerate(sites)}
        self.matmul_t = ops.MatMul(transpose_b=True)
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()

    def w(self, t: Sequence[Tensor], f: Sequence[Tensor], name: str) -> Tensor:
        which, i = self.index[name]
        if which == 0:
            return t[i]
        return f[i]

    def drop(self, masks: Sequence[Tensor], x: Tensor, site: str) -> Tensor:
        if site in self.sites:
            return x * masks[self.sites[site]]
        return x

    def linear(
        self, t: Sequence[Tensor], f: Sequence[Tensor], masks: Sequence[Tensor], x: Tensor, name: str
    ) -> Tensor:
        y = self.matmul_t(x, self.w(t, f, name))
        if name + ".bias" in self.index:
            y = ops.bias_add(y, self.w(t, f, name + ".bias"))
        if name in self.lora:
            xa = self.drop(masks, x, name + ".lora")
            lora = self.matmul_t(
                self.matmul_t(xa, self.w(t, f, name + ".lora_A")), self.w(t, f, name + ".lora_B")
            )
            y = y + lora * self.lora[name]
        return y

    def classification_loss(self, logits: Tensor, labels: Tensor, class_weights: Tensor) -> Tensor:
        """Cross-entropy as torch weighs it (sum w[y] * nll / sum w[y]; all ones without class
        weights); padded rows (label -100) weigh nothing."""
        valid = ops.cast(labels != -100, mindspore.float32)
        target = ops.maximum(labels, 0)
        weight = ops.gather(class_weights, target, 0) * valid
        picked = ops.gather_d(ops.log_softmax(logits, -1), 1, ops.expand_dims(target, 1))
        return -ops.sum(ops.reshape(picked, (-1,)) * weight) / ops.sum(weight)

    def rms_norm(self, t: Sequence[Tensor], f: Sequence[Tensor], x: Tensor, name: str, eps: float) -> Tensor:
        """T5's and Llama's RMS norm, every elementwise op on equal shapes: MindSpore's CPU kernels
        take 25-30x as long when an operand broadcasts (cpu_speed.patch_rms_norms); the mean and
        the broadcasts as matmuls (a 1/d column, outer products with ones: exact)."""
        rows, width = x.shape
        mean_column = ops.ones((width, 1), mindspore.float32) * (1.0 / width)
        scale = ops.rsqrt(ops.matmul(x * x, mean_column) + eps)
        scale = ops.matmul(scale, ops.ones((1, width), mindspore.float32))
        weight = ops.matmul(
            ops.ones((rows, 1), mindspore.float32), ops.reshape(self.w(t, f, name), (1, width))
        )
        return weight * (x * scale)

    def split_heads(self, x: Tensor, batch: int, heads: int, head_dim: int) -> Tensor:
        """(batch * length, heads * head_dim) -> (batch, heads, length, head_dim)."""
        return ops.transpose(ops.reshape(x, (batch, -1, heads, head_dim)), (0, 2, 1, 3))

    def attend(
        self,
        masks: Sequence[Tensor],
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor,
        site: str,
        scale: float | None = None,
    ) -> Tensor:
        """Attention over split heads: softmax(q k^T, times ``scale`` where given, + ``bias``), its
        dropout ``site``, times v, the heads merged back: (batch * queries, heads * head_dim)."""
        scores = self.bmm_t(q, k)
        if scale is not None:
            scores = scores * scale
        weights = self.drop(masks, ops.softmax(scores + bias, -1), site)
        out = ops.transpose(self.bmm(weights, v), (0, 2, 1, 3))
        return ops.reshape(out, (-1, q.shape[1] * v.shape[3]))


class NetCall(nn.Cell):
    """A graph kind other than the net's own forward: ``construct`` calls into ``net``."""

    def __init__(self, net: GraphNet) -> None:
        super().__init__()
        self.net = net


class LossOf(NetCall):
    def construct(self, *args: Tensor) -> Tensor:
        return self.net(*args)[0]


def graph_tensor(tensor: Tensor) -> Tensor:
    """A plain MindSpore tensor holding ``tensor``'s values (a copy)."""
    return mindspore.Tensor(tensor)


def _unused() -> Tensor:
    return mindspore.Tensor(np.zeros(1, np.float32))


def pynative_grad_off() -> Any:
    import torch  # mindtorch here

    return torch.no_grad()


def source_bucket(n: int) -> int:
    for bucket in SOURCE_BUCKETS:
        if n <= bucket:
            return bucket
    return -(-n // 64) * 64


def row_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pad_batch(input_ids: np.ndarray, attention_mask: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) with rows rounded up to a power of two and the length to its bucket: padded
    tokens are pad tokens, masked out (0); padded rows have one token, like any row."""
    batch, length = input_ids.shape
    rows, cols = row_bucket(batch), source_bucket(length)
    ids = np.full((rows, cols), pad, np.int32)
    ids[:batch, :length] = input_ids
    mask = np.zeros((rows, cols), np.float32)
    mask[:batch, :length] = attention_mask
    mask[batch:, 0] = 1
    return ids, mask


# (plan signature, jit level, graph kind, dropout sites) -> jitted graph, shared by every model in
# the process with that signature; and the (graph key, input shapes) compiled so far
_GRAPHS: dict[tuple[Any, ...], Any] = {}
_COMPILED: set[tuple[Any, ...]] = set()

PlanT = TypeVar("PlanT", bound=Plan)


class Compiled(Generic[PlanT]):
    """The compiled graphs of one model. An architecture subclass names its plan (``plan_class``),
    its ``Net`` (a GraphNet) and the cells of its graph kinds other than "grad" and "forward"
    (``cells``), and builds the net's host-side inputs (``graph_inputs``); the rest is here."""

    plan_class: Callable[[Any, Sequence[Tensor]], PlanT]
    Net: type[GraphNet]
    cells: dict[str, type[NetCall]] = {}
    needs_labels = False  # evaluation without labels (prediction) runs op by op where True

    def __init__(
        self,
        model: Any,
        trainable: Sequence[Tensor],
        dropout_rng: Any,
        jit_level: str = "O0",
        stats: dict[str, Any] | None = None,
    ) -> None:
        self.plan = self.plan_class(model, trainable)
        self.model = model  # a classifier's class weights (set_class_weights) are read at each call
        self.rng = dropout_rng  # the backend's DropoutRNG
        self.jit_level = jit_level
        # graphs this model compiled and the seconds their first calls took (compile + one run),
        # kept on the model (the backend's compile_seconds) so a run reports its own
        self.stats = stats if stats is not None else {"compiles": 0, "compile_seconds": 0.0}
        # the weights' shapes are fixed for a model: read once here, not at every graph call
        weight_shapes = tuple(
            tuple(tuple(w.shape) for w in ws) for ws in (self.plan.trainable, self.plan.frozen)
        )
        self._signature = (self.plan.signature(), jit_level, weight_shapes)

    def _graph(self, kind: str, sites: tuple[str, ...] = ()) -> Any:
        """kind: "grad" (loss and gradients), "forward" (the net's own outputs), or one of ``cells``."""
        key = (self._signature, kind, sites)
        if key not in _GRAPHS:
            net = self.Net(self.plan, sites)
            fn: Any
            if kind == "grad":
                fn = mindspore.value_and_grad(LossOf(net), grad_position=0)
            elif kind == "forward":
                fn = net
            else:
                fn = self.cells[kind](net)
            _GRAPHS[key] = mindspore.jit(fn, jit_level=self.jit_level)
        return _GRAPHS[key]

    def weights(self) -> tuple[Any, Any]:
        # mutable: a tuple given to a graph is otherwise a constant (compiled in, no gradient)
        return (
            # Neither tuple may be empty (full fine-tuning freezes nothing, a loaded adapter trains
            # nothing): MindSpore fails on an empty input tuple, so an unused zero stands in.
            mindspore.mutable(tuple(graph_tensor(p) for p in self.plan.trainable) or (_unused(),)),
            mindspore.mutable(tuple(self.plan.frozen) or (_unused(),)),
        )

    def masks(self, training: bool, *shape: int) -> tuple[tuple[str, ...], Any]:
        """(site names, masks) for the dropouts that run in a training step of this shape."""
        if not training:
            return (), ()
        sites = self.plan.dropout_sites(*shape)
        names = tuple(s[0] for s in sites)
        # from_numpy: the tensor takes the array's memory (the masks are 5-15 M floats a step on
        # t5-small; a copy costs 1.5 ns each)
        masks = tuple(mindspore.Tensor.from_numpy(m) for m in self.rng.keep_scales([s[1:] for s in sites]))
        return names, mindspore.mutable(masks) if masks else masks

    def call(self, key: tuple[str, tuple[str, ...]], args: tuple[Any, ...]) -> Any:
        """Run graph ``key`` ((kind, dropout sites)) on ``args`` (the weight tuples first)."""
        # args[:2] are the weight tuples, whose shapes the signature holds
        shapes = tuple(tuple(a.shape) for a in args[2:] if hasattr(a, "shape"))
        compiled_key = (self._signature, key, shapes)
        first = compiled_key not in _COMPILED
        fn = self._graph(*key)  # made outside no_grad: MindSpore refuses to make a gradient inside
        started = time.perf_counter()
        with pynative_grad_off():  # the graph differentiates itself; PyNative must not record it
            out = fn(*args)
        if first:  # jit compiles on a new shape; count the call, its run included
            _COMPILED.add(compiled_key)
            self.stats["compiles"] += 1
            self.stats["compile_seconds"] += time.perf_counter() - started
        return out

    def graph_inputs(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray | None
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """(the net's inputs after the weight tuples and the masks, as MindSpore tensors; the batch
        shape its dropout masks are drawn for, as the plan's ``mask_shape`` takes it)."""
        raise NotImplementedError

    def _run(
        self,
        kind: str,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        labels: np.ndarray | None,
        training: bool,
    ) -> Any:
        inputs, shape = self.graph_inputs(input_ids, attention_mask, labels)
        names, masks = self.masks(training, *shape)
        return self.call((kind, names), (*self.weights(), masks, *inputs))

    def value_and_grad(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, training: bool = True
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The mean loss (over the label tokens, or the rows) and its gradients, one per trainable
        tensor."""
        return self._run("grad", input_ids, attention_mask, labels, training)

    def loss_and_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray | None = None
    ) -> tuple[float | None, np.ndarray]:
        """Evaluation: the loss (None without labels) and the logits of the real rows, numpy."""
        raise NotImplementedError

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding (the generative architectures: T5)."""
        raise NotImplementedError


class CompiledClassifier(Compiled[PlanT]):
    """Sequence classifiers: the net takes (weights, masks, *inputs, labels, class weights) and
    returns (loss, logits of each row); an architecture says its ``inputs``."""

    def inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """numpy arrays the net takes before the labels, the padded ids first."""
        raise NotImplementedError

    def graph_inputs(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray | None
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        inputs = self.inputs(input_ids, attention_mask)
        rows = inputs[0].shape[0]
        padded_labels = np.full((rows,), -100, np.int32)
        if labels is not None:
            padded_labels[: len(labels)] = labels
        weights = getattr(self.model, "_dualtune_class_weights", None)
        weights = (
            np.ones(base_model(self.model).num_labels, np.float32) if weights is None else weights.asnumpy()
        )
        tensors = tuple(mindspore.Tensor(a) for a in (*inputs, padded_labels, weights))
        return tensors, inputs[0].shape

    def loss_and_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray | None = None
    ) -> tuple[float | None, np.ndarray]:
        """Evaluation: the loss (None without labels) and the (batch, classes) logits, numpy."""
        loss, logits = self._run("forward", input_ids, attention_mask, labels, False)
        return (None if labels is None else float(loss.asnumpy())), logits.asnumpy()[: input_ids.shape[0]]


class Architecture(Protocol):
    """What an architecture module (``t5``, ``bert``, ``llama``) provides to the backend."""

    MODEL_CLASS: str  # the transformers class it writes, by name
    ON_BY_DEFAULT: bool  # where whole runs measured shorter with the graphs

    @property
    def COMPILED(self) -> type[Compiled[Any]]: ...

    def why_not(self, model: Any) -> str | None: ...
