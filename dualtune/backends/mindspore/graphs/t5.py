"""T5 (with LoRA, prefix tuning, BitFit or full fine-tuning) as compiled MindSpore graphs (see
``base``): the loss with its gradient, the teacher-forced forward (evaluation), and one greedy
decoding step (the decoder over ``label_max_length`` positions, one graph for every step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mindspore
import numpy as np
from mindspore import ops

from dualtune.backend import Tensor
from dualtune.backends.mindspore.compat import relative_position_bucket_np
from dualtune.backends.mindspore.graphs.base import (
    FLOAT32_MIN,
    Compiled,
    GraphNet,
    NetCall,
    Plan,
    adapter_why_not,
    base_model,
    pad_batch,
    peft_type,
    pynative_grad_off,
)

MODEL_CLASS = "T5ForConditionalGeneration"
# The recipe's 5 epochs on the real data: 930 s against 1295 s op by op (BENCHMARKS.md)
ON_BY_DEFAULT = True


def why_not(model: Any) -> str | None:
    """None when ``model`` (a T5ForConditionalGeneration) runs as compiled graphs, else why not."""
    base = base_model(model)
    config = base.config
    if config.feed_forward_proj != "relu" or config.num_layers != config.num_decoder_layers:
        return "only T5 with ReLU feed-forward and as many decoder as encoder layers"
    if peft_type(model) == "PREFIX_TUNING":
        return "prefix tuning with prefix_projection" if model.active_peft_config.prefix_projection else None
    return adapter_why_not(model, base)


class T5Plan(Plan):
    def __init__(self, model: Any, trainable: Sequence[Tensor]) -> None:
        super().__init__(trainable)
        base = base_model(model)
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
        add = self.add
        add("shared", base.shared.weight)
        if not self.tied:
            add("lm_head", base.lm_head.weight)
        for stack_name in ("encoder", "decoder"):
            stack = getattr(base, stack_name)
            add(f"{stack_name}.final_norm", stack.final_layer_norm.weight)
            self.site(f"{stack_name}.embed", stack.dropout)
            for i, block in enumerate(stack.block):
                attns = [("self", block.layer[0])]
                if stack_name == "decoder":
                    attns.append(("cross", block.layer[1]))
                for kind, layer in attns:
                    prefix = f"{stack_name}.{i}.{kind}"
                    attn = layer.SelfAttention if kind == "self" else layer.EncDecAttention
                    add(f"{prefix}.norm", layer.layer_norm.weight)
                    for proj in ("q", "k", "v", "o"):
                        self.linear(f"{prefix}.{proj}", getattr(attn, proj))
                    if attn.has_relative_attention_bias:
                        add(f"{stack_name}.bias", attn.relative_attention_bias.weight)
                    self.site(f"{prefix}.weights", attn, "dropout")  # a float on T5Attention
                    self.site(f"{prefix}.out", layer.dropout)
                ff = block.layer[-1]
                add(f"{stack_name}.{i}.ff.norm", ff.layer_norm.weight)
                self.linear(f"{stack_name}.{i}.ff.wi", ff.DenseReluDense.wi)
                self.site(f"{stack_name}.{i}.ff.act", ff.DenseReluDense.dropout)
                self.linear(f"{stack_name}.{i}.ff.wo", ff.DenseReluDense.wo)
                self.site(f"{stack_name}.{i}.ff.out", ff.dropout)
            self.site(f"{stack_name}.final", stack.dropout)
        # Prefix tuning (peft 0.18 on an encoder-decoder): decoder layer i's self-attention gets the
        # key and value rows peft's cat-then-split assigns it (its past_key_values layout).
        self.prefix_tokens = 0
        self.prefix_rows: tuple[tuple[int, int], ...] = ()
        if peft_type(model) == "PREFIX_TUNING":
            peft_config = model.active_peft_config
            add("prefix", model.prompt_encoder[model.active_adapter].embedding.weight)
            self.prefix_tokens = peft_config.num_virtual_tokens
            rows = np.arange(peft_config.num_layers * 2)
            if peft_config.num_transformer_submodules == 2:
                rows = np.concatenate([rows, rows])
            chunks = np.split(rows, len(rows) // (peft_config.num_transformer_submodules * 2))
            self.prefix_rows = tuple((int(c[0]), int(c[1])) for c in chunks)

    def constants(self) -> tuple[Any, ...]:
        return (
            (self.layers, self.heads, self.d_kv, self.d_model, self.eps, self.tied),
            (self.prefix_tokens, self.prefix_rows),
        )

    def mask_shape(self, name: str, *shape: int) -> tuple[int, ...]:
        batch, source, target = shape
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


class T5Graph(GraphNet):
    def __init__(self, plan: T5Plan, sites: tuple[str, ...]) -> None:
        super().__init__(plan, sites)
        self.layers, self.heads, self.d_kv, self.d_model = plan.layers, plan.heads, plan.d_kv, plan.d_model
        self.eps, self.tied, self.out_scale = plan.eps, plan.tied, plan.d_model**-0.5
        self.prefix_tokens, self.prefix_rows = plan.prefix_tokens, plan.prefix_rows

    def norm(self, t: Sequence[Tensor], f: Sequence[Tensor], x: Tensor, name: str) -> Tensor:
        return self.rms_norm(t, f, x, name, self.eps)

    def heads_of(self, x: Tensor, batch: int) -> Tensor:
        return self.split_heads(x, batch, self.heads, self.d_kv)

    def attention(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        x: Tensor,
        kv: Tensor,
        batch: int,
        position_bias: Tensor,
        name: str,
        prefix_kv: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """x: (batch * queries, d_model); kv: the rows keys and values come from."""
        q = self.heads_of(self.linear(t, f, masks, x, name + ".q"), batch)
        k = self.heads_of(self.linear(t, f, masks, kv, name + ".k"), batch)
        v = self.heads_of(self.linear(t, f, masks, kv, name + ".v"), batch)
        if prefix_kv is not None:
            k = ops.concat((prefix_kv[0], k), 2)
            v = ops.concat((prefix_kv[1], v), 2)
        out = self.attend(masks, q, k, v, position_bias, name + ".weights")
        return self.linear(t, f, masks, out, name + ".o")

    def relative_bias(self, t: Sequence[Tensor], f: Sequence[Tensor], name: str, buckets: Tensor) -> Tensor:
        """(1, heads, queries, keys) from the bucket table and host-computed buckets."""
        table = self.w(t, f, name)
        values = ops.gather(table, ops.reshape(buckets, (-1,)), 0)
        values = ops.reshape(values, (buckets.shape[0], buckets.shape[1], self.heads))
        return ops.expand_dims(ops.transpose(values, (2, 0, 1)), 0)

    def block(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        h: Tensor,
        batch: int,
        stack: str,
        i: int,
        self_bias: Tensor,
        enc: Tensor | None = None,
        cross_bias: Tensor | None = None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
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

    def encode(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        input_ids: Tensor,
        enc_mask: Tensor,
        enc_buckets: Tensor,
    ) -> Tensor:
        batch = input_ids.shape[0]
        h = ops.gather(self.w(t, f, "shared"), ops.reshape(input_ids, (-1,)), 0)
        h = self.drop(masks, h, "encoder.embed")
        bias = self.relative_bias(t, f, "encoder.bias", enc_buckets) + enc_mask
        for i in range(self.layers):
            h = self.block(t, f, masks, h, batch, "encoder", i, bias)
        h = self.norm(t, f, h, "encoder.final_norm")
        return self.drop(masks, h, "encoder.final")

    def decode(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        enc: Tensor,
        enc_mask: Tensor,
        dec_ids: Tensor,
        dec_buckets: Tensor,
        causal: Tensor,
        position: Tensor | None = None,
    ) -> Tensor:
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

    def prefix_kv(
        self, t: Sequence[Tensor], f: Sequence[Tensor], batch: int, i: int
    ) -> tuple[Tensor, Tensor]:
        table = ops.reshape(self.w(t, f, "prefix"), (self.prefix_tokens, -1, self.heads, self.d_kv))
        key_row, value_row = self.prefix_rows[i]
        key = ops.expand_dims(ops.transpose(table[:, key_row], (1, 0, 2)), 0)
        value = ops.expand_dims(ops.transpose(table[:, value_row], (1, 0, 2)), 0)
        shape = (batch, self.heads, self.prefix_tokens, self.d_kv)
        return ops.broadcast_to(key, shape), ops.broadcast_to(value, shape)

    def construct(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        input_ids: Tensor,
        enc_mask: Tensor,
        enc_buckets: Tensor,
        dec_ids: Tensor,
        dec_buckets: Tensor,
        causal: Tensor,
        labels: Tensor,
    ) -> tuple[Tensor, Tensor]:
        enc = self.encode(t, f, masks, input_ids, enc_mask, enc_buckets)
        logits = self.decode(t, f, masks, enc, enc_mask, dec_ids, dec_buckets, causal)
        flat = ops.reshape(labels, (-1,))
        valid = ops.cast(flat != -100, mindspore.float32)
        picked = ops.gather_d(ops.log_softmax(logits, -1), 1, ops.expand_dims(ops.maximum(flat, 0), 1))
        loss = -ops.sum(ops.reshape(picked, (-1,)) * valid) / ops.sum(valid)
        return loss, logits


class Encoder(NetCall):
    def construct(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        input_ids: Tensor,
        enc_mask: Tensor,
        enc_buckets: Tensor,
    ) -> Tensor:
        return self.net.encode(t, f, (), input_ids, enc_mask, enc_buckets)


class NextToken(NetCall):
    """Greedy decoding's step: the most likely token at ``position`` of every row."""

    def construct(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        enc: Tensor,
        enc_mask: Tensor,
        dec_ids: Tensor,
        dec_buckets: Tensor,
        causal: Tensor,
        position: Tensor,
    ) -> Tensor:
        logits = self.net.decode(t, f, (), enc, enc_mask, dec_ids, dec_buckets, causal, position)
        return ops.argmax(logits, -1)


class CompiledT5(Compiled[T5Plan]):
    """The compiled graphs of one peft T5 model and the host-side inputs they take."""

    plan_class = T5Plan
    Net = T5Graph
    cells = {"encode": Encoder, "next": NextToken}
    needs_labels = True  # the teacher-forced forward; prediction generates

    def __init__(
        self,
        model: Any,
        trainable: Sequence[Tensor],
        dropout_rng: Any,
        jit_level: str = "O0",
        stats: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, trainable, dropout_rng, jit_level, stats)
        self._buckets: dict[tuple[int, int, bool], tuple[Tensor, Tensor, Tensor]] = {}

    def host_inputs(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """numpy batch -> padded graph inputs: source length and rows rounded up to their buckets.
        Exact: padded tokens are masked out of attention, padded rows' labels are all ignored
        (-100), so they add nothing to the loss, the gradients or a real row's outputs."""
        plan = self.plan
        batch, target = labels.shape
        ids, mask = pad_batch(input_ids, attention_mask, plan.pad)
        rows = ids.shape[0]
        lab = np.full((rows, target), -100, np.int32)
        lab[:batch] = labels
        dec = np.full((rows, target), plan.pad, np.int32)  # transformers' _shift_right
        dec[:, 0] = plan.start
        dec[:, 1:] = np.where(lab[:, :-1] == -100, plan.pad, lab[:, :-1])
        enc_mask = ((1.0 - mask) * FLOAT32_MIN)[:, None, None, :].astype(np.float32)
        return ids, enc_mask, dec, lab

    def shape_inputs(
        self, source: int, target: int, generating: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
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

    def graph_inputs(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray | None
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        assert labels is not None  # teacher-forced: loss_and_logits and value_and_grad take labels
        ids, enc_mask, dec, lab = self.host_inputs(input_ids, attention_mask, labels)
        batch, source = ids.shape
        enc_buckets, dec_buckets, causal = self.shape_inputs(source, lab.shape[1])
        inputs = (
            mindspore.Tensor(ids),
            mindspore.Tensor(enc_mask),
            enc_buckets,
            mindspore.Tensor(dec),
            dec_buckets,
            causal,
            mindspore.Tensor(lab),
        )
        return inputs, (batch, source, lab.shape[1])

    def loss_and_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray | None = None
    ) -> tuple[float | None, np.ndarray]:
        """Teacher-forced evaluation: the loss and (batch, label tokens, vocab) logits, numpy."""
        if labels is None:  # needs_labels: the backend runs evaluation without labels op by op
            raise ValueError("T5's compiled forward is teacher-forced: it needs labels")
        loss, logits = self._run("forward", input_ids, attention_mask, labels, False)
        batch, target = labels.shape
        return float(loss.asnumpy()), logits.asnumpy().reshape(-1, target, logits.shape[-1])[:batch]

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
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
        weights = self.weights()
        enc_mask = mindspore.Tensor(enc_mask)
        with pynative_grad_off():
            enc = self.call(("encode", ()), (*weights, mindspore.Tensor(ids), enc_mask, enc_buckets))
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
                token = self.call(("next", ()), (*weights, *args)).asnumpy().astype(np.int64)
                token = np.where(unfinished, token, plan.pad)
                out.append(token)
                unfinished &= token != plan.eos
                if not unfinished.any() or step + 1 == max_new_tokens:
                    break
                dec[:, step + 1] = token
        return np.stack(out, 1)[:real_rows]


COMPILED = CompiledT5
