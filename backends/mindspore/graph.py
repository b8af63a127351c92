"""T5 (with LoRA, prefix tuning, BitFit or full fine-tuning) as compiled MindSpore graphs.

Under PyNative every MindSpore op costs about 100 us to launch on CPU (260 us when recorded for a
gradient; torch: 8 us), and a t5-small step runs thousands of them: at real sentence lengths most of
a step is launch cost. transformers' model code cannot be compiled (``mindspore.jit`` rejects its
``try`` statements; bytecode capture was no faster; trace capture fails inside mindtorch), so this
module writes T5's forward once more in MindSpore ops, over the model's own parameters (mindtorch
parameters are MindSpore tensors: no copy), and compiles three graphs with ``mindspore.jit``:
the loss with its gradient, the teacher-forced forward (evaluation), and one greedy decoding step.

Same arithmetic as transformers 4.57 + peft 0.18 in the same order (tests/mindspore/test_graph.py
checks loss, gradients and generations against the PyNative path). Dropout masks come from the
backend's host generator (``DropoutRNG``), one per dropout site in a fixed order, as graph inputs:
seeded, resumable, byte-reproducible. Shapes: each batch is padded to a bucket (multiples of
``BUCKET`` tokens, exact: padded source tokens are masked, padded labels are ignored), so a run
compiles a handful of graphs. ``supported`` says which models and adapters this covers; anything
else runs op by op as before.
"""

from __future__ import annotations

import time

import mindspore
import numpy as np
from mindspore import nn, ops

from dualtune.backends.mindspore.compat import relative_position_bucket_np

# Source lengths are padded up to one of these (past the last, to a multiple of 64), rows to a power
# of two; labels keep their length. Each shape is a compile (17-30 s for a t5-small training step
# here): few shapes, at most a quarter of padding above 32 tokens.
SOURCE_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128)
FLOAT32_MIN = float(np.finfo(np.float32).min)


def _lora_parts(module):
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


def why_not(model) -> str | None:
    """None when ``model`` runs as compiled graphs here, else why it does not (one phrase)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", "") != "t5" or type(base).__name__ != "T5ForConditionalGeneration":
        return f"{type(base).__name__} is not written as a graph (T5ForConditionalGeneration is)"
    if config.feed_forward_proj != "relu" or config.num_layers != config.num_decoder_layers:
        return "only T5 with ReLU feed-forward and as many decoder as encoder layers"
    peft_config = getattr(model, "active_peft_config", None)
    peft_type = str(getattr(peft_config, "peft_type", "NONE")).split(".")[-1]
    if peft_type == "PREFIX_TUNING":
        if peft_config.prefix_projection:
            return "prefix tuning with prefix_projection"
    elif peft_type == "LORA":
        for name, module in base.named_modules():
            if hasattr(module, "lora_A") and _lora_parts(module) is None:
                return f"LoRA layer {name} (DoRA, several adapters)"
            if hasattr(module, "lora_A") and getattr(module, "lora_bias", {}).get(module.active_adapters[0]):
                return "LoRA with lora_bias"
    elif peft_type != "NONE":
        return f"{peft_type.lower()} is not written as a graph"
    return None


class Plan:
    """Where each weight of a peft T5 lives (trainable or frozen, index) and which dropout sites run.

    Built in Python once per model; the graph reads it as constants."""

    def __init__(self, model, trainable):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        self.layers, self.heads, self.d_kv = cfg.num_layers, cfg.num_heads, cfg.d_kv
        self.d_model, self.eps, self.tied = (
            cfg.d_model,
            float(cfg.layer_norm_epsilon),
            cfg.tie_word_embeddings,
        )
        self.num_buckets, self.max_distance = (
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        self.pad, self.start, self.eos = cfg.pad_token_id, cfg.decoder_start_token_id, cfg.eos_token_id
        self.dropout_refs: dict[str, tuple] = {}
        trainable_ids = {id(p): i for i, p in enumerate(trainable)}
        self.trainable, self.frozen = list(trainable), []
        self.index: dict[str, tuple[int, int]] = {}
        self.lora: dict[str, tuple] = {}

        def add(name, tensor):
            if id(tensor) in trainable_ids:
                self.index[name] = (0, trainable_ids[id(tensor)])
            else:
                # A copy, made once: a parameter (``__parameter__``) cannot be a graph input, and
                # frozen weights do not change during a run.
                self.index[name] = (1, len(self.frozen))
                self.frozen.append(_graph_tensor(tensor))

        add("shared", base.shared.weight)
        if not self.tied:
            add("lm_head", base.lm_head.weight)
        for stack_name in ("encoder", "decoder"):
            stack = getattr(base, stack_name)
            add(f"{stack_name}.final_norm", stack.final_layer_norm.weight)
            self._site(f"{stack_name}.embed", stack.dropout)
            for i, block in enumerate(stack.block):
                attns = [("self", block.layer[0])]
                if stack_name == "decoder":
                    attns.append(("cross", block.layer[1]))
                for kind, layer in attns:
                    prefix = f"{stack_name}.{i}.{kind}"
                    attn = layer.SelfAttention if kind == "self" else layer.EncDecAttention
                    add(f"{prefix}.norm", layer.layer_norm.weight)
                    for proj in ("q", "k", "v", "o"):
                        self._linear(add, f"{prefix}.{proj}", getattr(attn, proj))
                    if attn.has_relative_attention_bias:
                        add(f"{stack_name}.bias", attn.relative_attention_bias.weight)
                    self._site(f"{prefix}.weights", attn, "dropout")  # a float on T5Attention
                    self._site(f"{prefix}.out", layer.dropout)
                ff = block.layer[-1]
                add(f"{stack_name}.{i}.ff.norm", ff.layer_norm.weight)
                self._linear(add, f"{stack_name}.{i}.ff.wi", ff.DenseReluDense.wi)
                self._site(f"{stack_name}.{i}.ff.act", ff.DenseReluDense.dropout)
                self._linear(add, f"{stack_name}.{i}.ff.wo", ff.DenseReluDense.wo)
                self._site(f"{stack_name}.{i}.ff.out", ff.dropout)
            self._site(f"{stack_name}.final", stack.dropout)
        # Prefix tuning (peft 0.18 on an encoder-decoder): decoder layer i's self-attention gets the
        # key and value rows peft's cat-then-split assigns it (its past_key_values layout).
        self.prefix_tokens, self.prefix_rows = 0, ()
        peft_config = getattr(model, "active_peft_config", None)
        if str(getattr(peft_config, "peft_type", "")).endswith("PREFIX_TUNING"):
            add("prefix", model.prompt_encoder[model.active_adapter].embedding.weight)
            self.prefix_tokens = peft_config.num_virtual_tokens
            rows = np.arange(peft_config.num_layers * 2)
            if peft_config.num_transformer_submodules == 2:
                rows = np.concatenate([rows, rows])
            chunks = np.split(rows, len(rows) // (peft_config.num_transformer_submodules * 2))
            self.prefix_rows = tuple((int(c[0]), int(c[1])) for c in chunks)
            self.prefix_layers = peft_config.num_layers

    def signature(self) -> tuple:
        """Everything a graph compiles in as a constant: models with equal signatures share graphs
        (weights are inputs), so a second model of one structure in a process (a notebook's second
        run, the test suite) compiles nothing new. (Sweep trials are processes of their own.)
        MindSpore's compile cache across processes does not key on these constants (it served a
        LoRA alpha of 16's gradients to a model with alpha 64), so it stays off."""
        return (
            tuple(sorted(self.index.items())),
            tuple(sorted(self.lora.items())),
            (self.layers, self.heads, self.d_kv, self.d_model, self.eps, self.tied),
            (self.prefix_tokens, self.prefix_rows),
        )

    def _linear(self, add, name, module):
        parts = _lora_parts(module) if hasattr(module, "lora_A") else None
        base = module if parts is None else module.base_layer
        add(name, base.weight)
        if base.bias is not None:  # T5 has none; models built with them (the tests' tiny T5) do
            add(name + ".bias", base.bias)
        if parts is None:
            return
        a, b, scaling, dropout = parts
        add(name + ".lora_A", a)
        add(name + ".lora_B", b)
        self.lora[name] = scaling
        self._site(name + ".lora", dropout)  # p read at each step (Identity when 0: no p)

    def _site(self, name, module, attr="p"):
        self.dropout_refs[name] = (module, attr)

    def dropout_sites(self, batch: int, source: int, target: int) -> list[tuple[str, tuple, float]]:
        """(site, mask shape, p) for every dropout that runs, in a fixed order (the masks' draw
        order). p is read from the modules each time: ``disable_dropout`` may have zeroed them."""
        sites = []
        for name, (module, attr) in self.dropout_refs.items():
            p = float(getattr(module, attr, 0.0) or 0.0)
            if p > 0:
                sites.append((name, self._mask_shape(name, batch, source, target), p))
        return sites

    def _mask_shape(self, name, batch, source, target):
        parts = name.split(".")
        stack, where = parts[0], parts[-1]
        length = source if stack == "encoder" else target
        if where == "weights":
            keys = (
                source if parts[2] == "cross" else length + (self.prefix_tokens if stack == "decoder" else 0)
            )
            return (batch, self.heads, length, keys)
        if where == "lora":
            proj = parts[-2]
            rows = batch * (source if parts[2] == "cross" and proj in ("k", "v") else length)
            width = {"o": self.heads * self.d_kv, "wo": self._d_ff()}.get(proj, self.d_model)
            return (rows, width)
        if where == "act":
            return (batch * length, self._d_ff())
        return (batch * length, self.d_model)

    def _d_ff(self) -> int:
        which, i = self.index["encoder.0.ff.wi"]
        return int((self.trainable if which == 0 else self.frozen)[i].shape[0])

    def position_buckets(self, queries: int, keys: int, first_query: int, bidirectional: bool) -> np.ndarray:
        context = np.arange(first_query, first_query + queries)[:, None]
        memory = np.arange(keys)[None, :]
        return relative_position_bucket_np(
            memory - context, bidirectional, self.num_buckets, self.max_distance
        ).astype(np.int32)


class T5Graph(nn.Cell):
    """T5's forward in MindSpore ops over (trainable, frozen) weight tuples. ``site`` names index
    the dropout-mask tuple; a site not in ``sites`` does not run (p = 0 or evaluation)."""

    def __init__(self, plan: Plan, sites: tuple[str, ...]):
        super().__init__()
        self.index = plan.index
        self.lora = dict(plan.lora)
        self.sites = {name: i for i, name in enumerate(sites)}
        self.layers, self.heads, self.d_kv, self.d_model = plan.layers, plan.heads, plan.d_kv, plan.d_model
        self.eps, self.tied, self.out_scale = plan.eps, plan.tied, plan.d_model**-0.5
        self.prefix_tokens, self.prefix_rows = plan.prefix_tokens, plan.prefix_rows
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
            y = y + self.w(t, f, name + ".bias")
        if name in self.lora:
            xa = self.drop(masks, x, name + ".lora")
            lora = self.matmul_t(
                self.matmul_t(xa, self.w(t, f, name + ".lora_A")), self.w(t, f, name + ".lora_B")
            )
            y = y + lora * self.lora[name]
        return y

    def norm(self, t, f, x, name):
        # T5's RMS norm with every elementwise op on equal shapes: MindSpore's CPU kernels take
        # 25-30x as long when an operand broadcasts (cpu_speed.patch_rms_norms); the mean and the
        # broadcasts as matmuls (a 1/d column, outer products with ones: exact).
        rows, width = x.shape
        mean_column = ops.ones((width, 1), mindspore.float32) * (1.0 / width)
        scale = ops.rsqrt(ops.matmul(x * x, mean_column) + self.eps)
        scale = ops.matmul(scale, ops.ones((1, width), mindspore.float32))
        weight = ops.matmul(
            ops.ones((rows, 1), mindspore.float32), ops.reshape(self.w(t, f, name), (1, width))
        )
        return weight * (x * scale)

    def heads_of(self, x, batch):
        return ops.transpose(ops.reshape(x, (batch, -1, self.heads, self.d_kv)), (0, 2, 1, 3))

    def attention(self, t, f, masks, x, kv, batch, position_bias, name, prefix_kv):
        """x: (batch * queries, d_model); kv: the rows keys and values come from."""
        q = self.heads_of(self.linear(t, f, masks, x, name + ".q"), batch)
        k = self.heads_of(self.linear(t, f, masks, kv, name + ".k"), batch)
        v = self.heads_of(self.linear(t, f, masks, kv, name + ".v"), batch)
        if prefix_kv is not None:
            k = ops.concat((prefix_kv[0], k), 2)
            v = ops.concat((prefix_kv[1], v), 2)
        scores = self.bmm_t(q, k) + position_bias
        weights = ops.softmax(scores, -1)
        weights = self.drop(masks, weights, name + ".weights")
        out = ops.reshape(ops.transpose(self.bmm(weights, v), (0, 2, 1, 3)), (-1, self.heads * self.d_kv))
        return self.linear(t, f, masks, out, name + ".o")

    def relative_bias(self, t, f, name, buckets):
        """(1, heads, queries, keys) from the bucket table and host-computed buckets."""
        table = self.w(t, f, name)
        values = ops.gather(table, ops.reshape(buckets, (-1,)), 0)
        values = ops.reshape(values, (buckets.shape[0], buckets.shape[1], self.heads))
        return ops.expand_dims(ops.transpose(values, (2, 0, 1)), 0)

    def block(self, t, f, masks, h, batch, stack, i, self_bias, enc=None, cross_bias=None, prefix_kv=None):
        name = f"{stack}.{i}"
        normed = self.norm(t, f, h, name + ".self.norm")
        attn = self.attention(t, f, masks, normed, normed, batch, self_bias, name + ".self", prefix_kv)
        h = h + self.drop(masks, attn, name + ".self.out")
        if enc is not None:
            normed = self.norm(t, f, h, name + ".cross.norm")
            attn = self.attention(t, f, masks, normed, enc, batch, cross_bias, name + ".cross", None)
            h = h + self.drop(masks, attn, name + ".cross.out")
        normed = self.norm(t, f, h, name + ".ff.norm")
        inner = ops.relu(self.linear(t, f, masks, normed, name + ".ff.wi"))
        inner = self.drop(masks, inner, name + ".ff.act")
        h = h + self.drop(masks, self.linear(t, f, masks, inner, name + ".ff.wo"), name + ".ff.out")
        return h

    def encode(self, t, f, masks, input_ids, enc_mask, enc_buckets):
        batch = input_ids.shape[0]
        h = ops.gather(self.w(t, f, "shared"), ops.reshape(input_ids, (-1,)), 0)
        h = self.drop(masks, h, "encoder.embed")
        bias = self.relative_bias(t, f, "encoder.bias", enc_buckets) + enc_mask
        for i in range(self.layers):
            h = self.block(t, f, masks, h, batch, "encoder", i, bias)
        h = self.norm(t, f, h, "encoder.final_norm")
        return self.drop(masks, h, "encoder.final")

    def decode(self, t, f, masks, enc, enc_mask, dec_ids, dec_buckets, causal, position=None):
        """Logits of every decoder position, or of one (``position``, a scalar tensor) when generating."""
        batch = dec_ids.shape[0]
        h = ops.gather(self.w(t, f, "shared"), ops.reshape(dec_ids, (-1,)), 0)
        h = self.drop(masks, h, "decoder.embed")
        self_bias = self.relative_bias(t, f, "decoder.bias", dec_buckets) + causal
        for i in range(self.layers):
            prefix_kv = None
            if self.prefix_tokens > 0:
                prefix_kv = self.prefix_kv(t, f, batch, i)
            h = self.block(t, f, masks, h, batch, "decoder", i, self_bias, enc, enc_mask, prefix_kv)
        h = self.norm(t, f, h, "decoder.final_norm")
        h = self.drop(masks, h, "decoder.final")
        if position is not None:
            h = ops.gather(ops.reshape(h, (batch, -1, self.d_model)), position, 1)
        if self.tied:
            return self.matmul_t(h * self.out_scale, self.w(t, f, "shared"))
        return self.matmul_t(h, self.w(t, f, "lm_head"))

    def prefix_kv(self, t, f, batch, i):
        table = ops.reshape(self.w(t, f, "prefix"), (self.prefix_tokens, -1, self.heads, self.d_kv))
        key_row, value_row = self.prefix_rows[i]
        key = ops.expand_dims(ops.transpose(table[:, key_row], (1, 0, 2)), 0)
        value = ops.expand_dims(ops.transpose(table[:, value_row], (1, 0, 2)), 0)
        shape = (batch, self.heads, self.prefix_tokens, self.d_kv)
        return ops.broadcast_to(key, shape), ops.broadcast_to(value, shape)

    def construct(self, t, f, masks, input_ids, enc_mask, enc_buckets, dec_ids, dec_buckets, causal, labels):
        enc = self.encode(t, f, masks, input_ids, enc_mask, enc_buckets)
        logits = self.decode(t, f, masks, enc, enc_mask, dec_ids, dec_buckets, causal)
        flat = ops.reshape(labels, (-1,))
        valid = ops.cast(flat != -100, mindspore.float32)
        picked = ops.gather_d(ops.log_softmax(logits, -1), 1, ops.expand_dims(ops.maximum(flat, 0), 1))
        loss = -ops.sum(ops.reshape(picked, (-1,)) * valid) / ops.sum(valid)
        return loss, logits


class Encoder(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, t, f, input_ids, enc_mask, enc_buckets):
        return self.net.encode(t, f, (), input_ids, enc_mask, enc_buckets)


class NextToken(nn.Cell):
    """Greedy decoding's step: the most likely token at ``position`` of every row."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, t, f, enc, enc_mask, dec_ids, dec_buckets, causal, position):
        logits = self.net.decode(t, f, (), enc, enc_mask, dec_ids, dec_buckets, causal, position)
        return ops.argmax(logits, -1)


class LossOf(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, *args):
        return self.net(*args)[0]


def _graph_tensor(tensor):
    """A plain MindSpore tensor holding ``tensor``'s values (a copy)."""
    return mindspore.Tensor(tensor)


def _unused():
    return mindspore.Tensor(np.zeros(1, np.float32))


def _pynative_grad_off():
    import torch  # mindtorch here

    return torch.no_grad()


def source_bucket(n: int) -> int:
    for bucket in SOURCE_BUCKETS:
        if n <= bucket:
            return bucket
    return -(-n // 64) * 64


def row_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# (plan signature, jit level, graph kind, dropout sites) -> jitted graph, shared by every model in
# the process with that signature; and the (graph key, input shapes) compiled so far
_GRAPHS: dict = {}
_COMPILED: set = set()


class CompiledT5:
    """The compiled graphs of one peft T5 model and the host-side inputs they take."""

    def __init__(self, model, trainable, dropout_rng, jit_level: str = "O0", stats: dict | None = None):
        self.plan = Plan(model, trainable)
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
        self._buckets: dict = {}

    def _graph(self, kind: str, sites: tuple[str, ...] = ()):
        """kind: "grad" (loss and gradients), "forward" (loss and logits), "encode", "next"."""
        key = (self._signature, kind, sites)
        if key not in _GRAPHS:
            net = T5Graph(self.plan, sites)
            fn = {
                "grad": lambda: mindspore.value_and_grad(LossOf(net), grad_position=0),
                "forward": lambda: net,
                "encode": lambda: Encoder(net),
                "next": lambda: NextToken(net),
            }[kind]()
            _GRAPHS[key] = mindspore.jit(fn, jit_level=self.jit_level)
        return _GRAPHS[key]

    def _weights(self):
        # mutable: a tuple given to a graph is otherwise a constant (compiled in, no gradient)
        return (
            # Neither tuple may be empty (full fine-tuning freezes nothing, a loaded adapter trains
            # nothing): MindSpore fails on an empty input tuple, so an unused zero stands in.
            mindspore.mutable(tuple(_graph_tensor(p) for p in self.plan.trainable) or (_unused(),)),
            mindspore.mutable(tuple(self.plan.frozen) or (_unused(),)),
        )

    def host_inputs(self, input_ids, attention_mask, labels):
        """numpy batch -> padded graph inputs: source length and rows rounded up to their buckets.
        Exact: padded tokens are masked out of attention, padded rows' labels are all ignored
        (-100), so they add nothing to the loss, the gradients or a real row's outputs."""
        plan = self.plan
        batch, source = input_ids.shape
        target = labels.shape[1]
        rows, src = row_bucket(batch), source_bucket(source)
        ids = np.full((rows, src), plan.pad, np.int32)
        ids[:batch, :source] = input_ids
        mask = np.zeros((rows, src), np.float32)
        mask[:batch, :source] = attention_mask
        mask[batch:, 0] = 1  # padded rows: one token, like any row
        lab = np.full((rows, target), -100, np.int32)
        lab[:batch] = labels
        dec = np.full((rows, target), plan.pad, np.int32)  # transformers' _shift_right
        dec[:, 0] = plan.start
        dec[:, 1:] = np.where(lab[:, :-1] == -100, plan.pad, lab[:, :-1])
        enc_mask = ((1.0 - mask) * FLOAT32_MIN)[:, None, None, :].astype(np.float32)
        return ids, enc_mask, dec, lab

    def shape_inputs(self, source: int, target: int, generating: bool = False):
        """Position buckets and the causal mask for a shape. Decoder query i sits at position
        p + i (p prefix tokens) and sees keys 0 .. p + i, except in generation: there peft hands the
        prefix to ``generate`` as a filled cache, while transformers counts cache positions from 0,
        so query i sits at position i and sees keys 0 .. i of the prefix-first key list (measured on
        the op-by-op path, which both stacks run; the same arithmetic here)."""
        key = (source, target, generating)
        if key not in self._buckets:
            plan, p = self.plan, self.plan.prefix_tokens
            first = 0 if generating else p
            enc = plan.position_buckets(source, source, 0, True)
            dec = plan.position_buckets(target, p + target, first, False)
            keys = np.arange(p + target)[None, :]
            queries = np.arange(target)[:, None] + first
            causal = np.where(keys <= queries, 0.0, FLOAT32_MIN).astype(np.float32)[None, None]
            self._buckets[key] = tuple(mindspore.Tensor(a) for a in (enc, dec, causal))
        return self._buckets[key]

    def _masks(self, batch, source, target, training):
        if not training:
            return (), ()
        sites = self.plan.dropout_sites(batch, source, target)
        names = tuple(s[0] for s in sites)
        return names, tuple(mindspore.Tensor(self.rng.keep_scale(shape, p)) for _, shape, p in sites)

    def _run(self, kind, input_ids, attention_mask, labels, training):
        ids, enc_mask, dec, lab = self.host_inputs(input_ids, attention_mask, labels)
        batch, source = ids.shape
        names, masks = self._masks(batch, source, lab.shape[1], training)
        enc_buckets, dec_buckets, causal = self.shape_inputs(source, lab.shape[1])
        args = (
            *self._weights(),
            mindspore.mutable(masks) if masks else masks,
            mindspore.Tensor(ids),
            mindspore.Tensor(enc_mask),
            enc_buckets,
            mindspore.Tensor(dec),
            dec_buckets,
            causal,
            mindspore.Tensor(lab),
        )
        return self._call((kind, names), args)

    def _call(self, key, args):
        # args[:2] are the weight tuples, whose shapes the signature holds
        shapes = tuple(tuple(a.shape) for a in args[2:] if hasattr(a, "shape"))
        compiled_key = (self._signature, key, shapes)
        first = compiled_key not in _COMPILED
        fn = self._graph(*key)  # made outside no_grad: MindSpore refuses to make a gradient inside
        started = time.perf_counter()
        with _pynative_grad_off():  # the graph differentiates itself; PyNative must not record it
            out = fn(*args)
        if first:  # jit compiles on a new shape; count the call, its run included
            _COMPILED.add(compiled_key)
            self.stats["compiles"] += 1
            self.stats["compile_seconds"] += time.perf_counter() - started
        return out

    def value_and_grad(self, input_ids, attention_mask, labels, training=True):
        """The mean loss over the labels and its gradients, one per trainable tensor."""
        return self._run("grad", input_ids, attention_mask, labels, training)

    def loss_and_logits(self, input_ids, attention_mask, labels):
        """Teacher-forced evaluation: the loss and (batch, label tokens, vocab) logits, numpy."""
        loss, logits = self._run("forward", input_ids, attention_mask, labels, False)
        batch, target = labels.shape
        return float(loss.asnumpy()), logits.asnumpy().reshape(-1, target, logits.shape[-1])[:batch]

    def generate(self, input_ids, attention_mask, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding as transformers' ``generate`` does it (decoder start token first, pad
        after a row's end token, stop when every row has ended or after ``max_new_tokens``), with
        the decoder run over a fixed ``max_new_tokens`` positions (causal: later ones do not reach
        earlier ones), so one graph serves every step."""
        plan = self.plan
        real_rows = input_ids.shape[0]
        labels = np.zeros((real_rows, max_new_tokens), np.int32)
        ids, enc_mask, _, _ = self.host_inputs(input_ids, attention_mask, labels)
        batch, source = ids.shape
        enc_buckets, dec_buckets, causal = self.shape_inputs(source, max_new_tokens, generating=True)
        weights = self._weights()
        enc_mask = mindspore.Tensor(enc_mask)
        with _pynative_grad_off():
            enc = self._call(("encode", ()), (*weights, mindspore.Tensor(ids), enc_mask, enc_buckets))
            dec = np.full((batch, max_new_tokens), plan.pad, np.int32)
            dec[:, 0] = plan.start
            out, unfinished = [dec[:, 0].copy()], np.arange(batch) < real_rows  # padded rows end at once
            for step in range(max_new_tokens):
                args = (
                    enc,
                    enc_mask,
                    mindspore.Tensor(dec),
                    dec_buckets,
                    causal,
                    mindspore.Tensor(step, mindspore.int32),
                )
                token = self._call(("next", ()), (*weights, *args)).asnumpy().astype(np.int64)
                token = np.where(unfinished, token, plan.pad)
                out.append(token)
                unfinished &= token != plan.eos
                if not unfinished.any() or step + 1 == max_new_tokens:
                    break
                dec[:, step + 1] = token
        return np.stack(out, 1)[:real_rows]
