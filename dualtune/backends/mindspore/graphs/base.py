"""Models as compiled MindSpore graphs: what every architecture shares.

Under PyNative every MindSpore op costs about 100 us to launch on CPU (260 us when recorded for a
gradient; torch: 8 us), and a step of a real model runs thousands of them: at real sentence lengths
most of a step is launch cost. transformers' model code cannot be compiled (``mindspore.jit``
rejects its ``try`` statements; bytecode capture was no faster; trace capture fails inside
mindtorch), so each architecture module (``t5_graph``, ``bert_graph``, ``llama_graph``) writes
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

import mindspore
import numpy as np
from mindspore import nn, ops

# Source lengths are padded up to one of these (past the last, to a multiple of 64), rows to a power
# of two. Each shape is a compile (17-30 s for a t5-small training step here): few shapes, at most a
# quarter of padding above 32 tokens.
SOURCE_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128)
FLOAT32_MIN = float(np.finfo(np.float32).min)


def lora_parts(module):
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


def active_module(module):
    """The module that runs in ``module``'s place: the active copy of a peft ``ModulesToSaveWrapper``
    (the classification head peft trains and saves), else the module itself."""
    if not hasattr(module, "modules_to_save") or not hasattr(module, "original_module"):
        return module
    adapters = module.active_adapters
    if module.disable_adapters or not adapters or adapters[0] not in module.modules_to_save:
        return module.original_module
    return module.modules_to_save[adapters[0]]


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself: no peft)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def peft_type(model) -> str:
    """The active peft method: NONE (no peft: full fine-tuning, BitFit), LORA, PREFIX_TUNING, ..."""
    config = getattr(model, "active_peft_config", None)
    return str(getattr(config, "peft_type", "NONE")).split(".")[-1]


def lora_why_not(base) -> str | None:
    """None when every LoRA layer in ``base`` is one the graphs write (one plain adapter on a linear)."""
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and lora_parts(module) is None:
            return f"LoRA layer {name} (DoRA, several adapters, an embedding)"
        if hasattr(module, "lora_A") and getattr(module, "lora_bias", {}).get(module.active_adapters[0]):
            return "LoRA with lora_bias"
    return None


def adapter_why_not(model, base) -> str | None:
    """None for no peft adapter (full fine-tuning, BitFit) and plain LoRA, else why not."""
    method = peft_type(model)
    if method == "LORA":
        return lora_why_not(base)
    if method != "NONE":
        return f"{method.lower()} on {type(base).__name__} is not written as a graph"
    return None


def classifier_why_not(model, base) -> str | None:
    """None for a single-label classifier with no adapter or plain LoRA, else why not."""
    if base.num_labels < 2 or base.config.problem_type not in (None, "single_label_classification"):
        return "only single-label classification"
    return adapter_why_not(model, base)


class Plan:
    """Where each weight of a model lives (trainable or frozen, index), which LoRA adapters and
    dropout sites there are. Built in Python once per model; the graph reads it as constants.
    An architecture's plan calls ``add``, ``linear`` and ``site`` for its weights and sites, and
    says each site's mask shape (``mask_shape``)."""

    def __init__(self, trainable):
        self.dropout_refs: dict[str, tuple] = {}
        self.trainable_ids = {id(p): i for i, p in enumerate(trainable)}
        self.trainable, self.frozen = list(trainable), []
        self.index: dict[str, tuple[int, int]] = {}
        self.lora: dict[str, float] = {}

    def add(self, name, tensor):
        if id(tensor) in self.trainable_ids:
            self.index[name] = (0, self.trainable_ids[id(tensor)])
        else:
            # A copy, made once: a parameter (``__parameter__``) cannot be a graph input, and
            # frozen weights do not change during a run.
            self.index[name] = (1, len(self.frozen))
            self.frozen.append(graph_tensor(tensor))

    def linear(self, name, module):
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

    def site(self, name, module, attr="p"):
        self.dropout_refs[name] = (module, attr)

    def constants(self) -> tuple:
        """The architecture's own constants (dimensions, epsilons, ...)."""
        raise NotImplementedError

    def mask_shape(self, name: str, *shape) -> tuple:
        raise NotImplementedError

    def signature(self) -> tuple:
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

    def dropout_sites(self, *shape) -> list[tuple[str, tuple, float]]:
        """(site, mask shape, p) for every dropout that runs, in a fixed order (the masks' draw
        order). p is read from the modules each time: ``disable_dropout`` may have zeroed them."""
        sites = []
        for name, (module, attr) in self.dropout_refs.items():
            p = float(getattr(module, attr, 0.0) or 0.0)
            if p > 0:
                sites.append((name, self.mask_shape(name, *shape), p))
        return sites


class GraphNet(nn.Cell):
    """A model's forward in MindSpore ops over (trainable, frozen) weight tuples ``t``, ``f``.
    ``site`` names index the dropout-mask tuple; a site not in ``sites`` does not run (p = 0 or
    evaluation)."""

    def __init__(self, plan: Plan, sites: tuple[str, ...]):
        super().__init__()
        self.index = plan.index
        self.lora = dict(plan.lora)
        self.sites = {name: i for i, name in enumerate(sites)}
        self.matmul_t = ops.MatMul(transpose_b=True)
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()

    def w(self, t, f, name):
        which, i = self.index[name]
        if which == 0:
            return t[i]
        return f[i]

    def drop(self, masks, x, site):
        if site in self.sites:
            return x * masks[self.sites[site]]
        return x

    def linear(self, t, f, masks, x, name):
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

    def classification_loss(self, logits, labels, class_weights):
        """Cross-entropy as torch weighs it (sum w[y] * nll / sum w[y]; all ones without class
        weights); padded rows (label -100) weigh nothing."""
        valid = ops.cast(labels != -100, mindspore.float32)
        target = ops.maximum(labels, 0)
        weight = ops.gather(class_weights, target, 0) * valid
        picked = ops.gather_d(ops.log_softmax(logits, -1), 1, ops.expand_dims(target, 1))
        return -ops.sum(ops.reshape(picked, (-1,)) * weight) / ops.sum(weight)

    def rms_norm(self, t, f, x, name, eps):
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


class LossOf(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, *args):
        return self.net(*args)[0]


def graph_tensor(tensor):
    """A plain MindSpore tensor holding ``tensor``'s values (a copy)."""
    return mindspore.Tensor(tensor)


def _unused():
    return mindspore.Tensor(np.zeros(1, np.float32))


def pynative_grad_off():
    import torch  # mindtorch here

    return torch.no_grad()


def source_bucket(n: int) -> int:
    for bucket in SOURCE_BUCKETS:
        if n <= bucket:
            return bucket
    return -(-n // 64) * 64


def row_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pad_batch(input_ids, attention_mask, pad: int):
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
_GRAPHS: dict = {}
_COMPILED: set = set()


class Compiled:
    """The compiled graphs of one model: an architecture subclass names its ``Net`` (a GraphNet),
    the cells of its graph kinds other than "grad" and "forward" (``cells``), and builds its
    host-side inputs."""

    Net: type[GraphNet]
    cells: dict = {}
    needs_labels = False  # evaluation without labels (prediction) runs op by op where True

    def __init__(self, plan: Plan, dropout_rng, jit_level: str = "O0", stats: dict | None = None):
        self.plan = plan
        self.rng = dropout_rng
        self.jit_level = jit_level
        # graphs this model compiled and the seconds their first calls took (compile + one run),
        # kept on the model (the backend's compile_seconds) so a run reports its own
        self.stats = stats if stats is not None else {"compiles": 0, "compile_seconds": 0.0}
        # the weights' shapes are fixed for a model: read once here, not at every graph call
        weight_shapes = tuple(
            tuple(tuple(w.shape) for w in ws) for ws in (self.plan.trainable, self.plan.frozen)
        )
        self._signature = (self.plan.signature(), jit_level, weight_shapes)

    def _graph(self, kind: str, sites: tuple[str, ...] = ()):
        """kind: "grad" (loss and gradients), "forward" (the net's own outputs), or one of ``cells``."""
        key = (self._signature, kind, sites)
        if key not in _GRAPHS:
            net = self.Net(self.plan, sites)
            if kind == "grad":
                fn = mindspore.value_and_grad(LossOf(net), grad_position=0)
            elif kind == "forward":
                fn = net
            else:
                fn = self.cells[kind](net)
            _GRAPHS[key] = mindspore.jit(fn, jit_level=self.jit_level)
        return _GRAPHS[key]

    def weights(self):
        # mutable: a tuple given to a graph is otherwise a constant (compiled in, no gradient)
        return (
            # Neither tuple may be empty (full fine-tuning freezes nothing, a loaded adapter trains
            # nothing): MindSpore fails on an empty input tuple, so an unused zero stands in.
            mindspore.mutable(tuple(graph_tensor(p) for p in self.plan.trainable) or (_unused(),)),
            mindspore.mutable(tuple(self.plan.frozen) or (_unused(),)),
        )

    def masks(self, training: bool, *shape):
        """(site names, masks) for the dropouts that run in a training step of this shape."""
        if not training:
            return (), ()
        sites = self.plan.dropout_sites(*shape)
        names = tuple(s[0] for s in sites)
        # from_numpy: the tensor takes the array's memory (the masks are 5-15 M floats a step on
        # t5-small; a copy costs 1.5 ns each)
        masks = tuple(mindspore.Tensor.from_numpy(m) for m in self.rng.keep_scales([s[1:] for s in sites]))
        return names, mindspore.mutable(masks) if masks else masks

    def call(self, key, args):
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


class CompiledClassifier(Compiled):
    """Sequence classifiers: the net takes (weights, masks, *inputs, labels, class weights) and
    returns (loss, logits of each row); an architecture says its ``inputs``."""

    def __init__(self, plan: Plan, model, dropout_rng, jit_level: str = "O0", stats: dict | None = None):
        super().__init__(plan, dropout_rng, jit_level, stats)
        self.model = model  # its class weights (set_class_weights) are read at each call
        self.num_labels = base_model(model).num_labels

    def inputs(self, input_ids, attention_mask) -> tuple:
        """numpy arrays the net takes before the labels, the padded ids first."""
        raise NotImplementedError

    def _run(self, kind, input_ids, attention_mask, labels, training):
        inputs = self.inputs(input_ids, attention_mask)
        rows = inputs[0].shape[0]
        padded_labels = np.full((rows,), -100, np.int32)
        if labels is not None:
            padded_labels[: len(labels)] = labels
        weights = getattr(self.model, "_dualtune_class_weights", None)
        weights = np.ones(self.num_labels, np.float32) if weights is None else weights.asnumpy()
        names, masks = self.masks(training, *inputs[0].shape)
        tensors = (mindspore.Tensor(a) for a in (*inputs, padded_labels, weights))
        return self.call((kind, names), (*self.weights(), masks, *tensors))

    def value_and_grad(self, input_ids, attention_mask, labels, training=True):
        """The mean loss over the rows and its gradients, one per trainable tensor."""
        return self._run("grad", input_ids, attention_mask, labels, training)

    def loss_and_logits(self, input_ids, attention_mask, labels=None):
        """Evaluation: the loss (None without labels) and the (batch, classes) logits, numpy."""
        loss, logits = self._run("forward", input_ids, attention_mask, labels, False)
        return (None if labels is None else float(loss.asnumpy())), logits.asnumpy()[: input_ids.shape[0]]
