"""Llama-style decoders for sequence classification (LlamaForSequenceClassification, with LoRA or
full fine-tuning) as compiled MindSpore graphs (see ``base``): the loss with its gradient, and the
forward (loss and logits) for evaluation and prediction. The head reads the last non-pad token of
each row, as transformers' does; rotary tables are computed on the host from the model's own
``inv_freq``, in float32 as transformers computes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from mindspore import ops

from dualtune.backend import Tensor
from dualtune.backends.mindspore.graphs.base import (
    FLOAT32_MIN,
    CompiledClassifier,
    GraphNet,
    Plan,
    base_model,
    classifier_why_not,
    pad_batch,
)

MODEL_CLASS = "LlamaForSequenceClassification"
# Off unless DUALTUNE_MINDSPORE_GRAPH=1: on SmolLM2-135M's config a step takes 0.56x op by op's
# time, but one training and one eval shape compiled for 624 s (30 layers) at 8.0 GB (BENCHMARKS.md)
ON_BY_DEFAULT = False


def why_not(model: Any) -> str | None:
    """None when ``model`` (a LlamaForSequenceClassification) runs as compiled graphs, else why not."""
    base = base_model(model)
    config = base.config
    if config.hidden_act != "silu" or config.rope_scaling is not None:
        return "only Llama with SiLU and plain rotary embeddings (no rope_scaling)"
    if config.pad_token_id is None:
        return "a Llama classifier needs a pad token"
    return classifier_why_not(model, base)


class LlamaPlan(Plan):
    def __init__(self, model: Any, trainable: Sequence[Tensor]) -> None:
        super().__init__(trainable)
        base = base_model(model)
        cfg = base.config
        decoder = base.model
        attn0 = decoder.layers[0].self_attn
        self.layers, self.heads, self.kv_heads = (
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        )
        self.hidden, self.head_dim, self.inner = cfg.hidden_size, attn0.head_dim, cfg.intermediate_size
        self.eps, self.pad = float(cfg.rms_norm_eps), cfg.pad_token_id
        self.inv_freq = decoder.rotary_emb.inv_freq.asnumpy().astype(np.float32)
        self.rope_scale = float(decoder.rotary_emb.attention_scaling)
        self._rotary: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.add("embed", decoder.embed_tokens.weight)
        for i, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self.add(f"{i}.in_norm", layer.input_layernorm.weight)
            for proj in ("q", "k", "v", "o"):
                self.linear(f"{i}.{proj}", getattr(attn, proj + "_proj"))
            self.site(f"{i}.weights", attn, "attention_dropout")  # a float on LlamaAttention
            self.add(f"{i}.post_norm", layer.post_attention_layernorm.weight)
            for proj in ("gate", "up", "down"):
                self.linear(f"{i}.{proj}", getattr(mlp, proj + "_proj"))
        self.add("final_norm", decoder.norm.weight)
        self.linear("score", base.score)

    def constants(self) -> tuple[Any, ...]:
        return (
            (self.layers, self.heads, self.kv_heads, self.hidden, self.head_dim, self.inner, self.eps),
            (tuple(self.inv_freq.tolist()), self.rope_scale),
        )

    def mask_shape(self, name: str, *shape: int) -> tuple[int, ...]:
        batch, length = shape
        parts = name.split(".")
        if parts[-1] == "weights":
            return (batch, self.heads, length, length)
        width = {"o": self.heads * self.head_dim, "down": self.inner}.get(parts[-2], self.hidden)
        return (batch * length, width)

    def rotary(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin), each (1, 1, length, head_dim) float32, as LlamaRotaryEmbedding computes them;
        made once per length (a bucket), not at every step."""
        if length not in self._rotary:
            freqs = np.arange(length, dtype=np.float32)[:, None] * self.inv_freq[None, :]
            emb = np.concatenate([freqs, freqs], -1)
            cos = (np.cos(emb) * np.float32(self.rope_scale)).astype(np.float32)
            sin = (np.sin(emb) * np.float32(self.rope_scale)).astype(np.float32)
            self._rotary[length] = (cos[None, None], sin[None, None])
        return self._rotary[length]


class LlamaGraph(GraphNet):
    def __init__(self, plan: LlamaPlan, sites: tuple[str, ...]) -> None:
        super().__init__(plan, sites)
        self.layers, self.heads, self.kv_heads = plan.layers, plan.heads, plan.kv_heads
        self.hidden, self.head_dim, self.eps = plan.hidden, plan.head_dim, plan.eps
        self.scale = self.head_dim**-0.5

    def heads_of(self, x: Tensor, batch: int, heads: int) -> Tensor:
        return self.split_heads(x, batch, heads, self.head_dim)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = self.head_dim // 2
        rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
        return x * cos + rotated * sin

    def repeat_kv(self, x: Tensor, batch: int, length: int) -> Tensor:
        """(batch, kv heads, length, d) -> (batch, heads, length, d), each kv head repeated in place."""
        groups = self.heads // self.kv_heads
        if groups == 1:
            return x
        x = ops.broadcast_to(ops.expand_dims(x, 2), (batch, self.kv_heads, groups, length, self.head_dim))
        return ops.reshape(x, (batch, self.heads, length, self.head_dim))

    def layer(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        h: Tensor,
        batch: int,
        length: int,
        mask: Tensor,
        rope: tuple[Tensor, Tensor, Tensor, Tensor],
        i: int,
    ) -> Tensor:
        cos_q, sin_q, cos_k, sin_k = rope
        normed = self.rms_norm(t, f, h, f"{i}.in_norm", self.eps)
        q = self.rotate(
            self.heads_of(self.linear(t, f, masks, normed, f"{i}.q"), batch, self.heads), cos_q, sin_q
        )
        k = self.heads_of(self.linear(t, f, masks, normed, f"{i}.k"), batch, self.kv_heads)
        v = self.heads_of(self.linear(t, f, masks, normed, f"{i}.v"), batch, self.kv_heads)
        k = self.repeat_kv(self.rotate(k, cos_k, sin_k), batch, length)
        v = self.repeat_kv(v, batch, length)
        context = self.attend(masks, q, k, v, mask, f"{i}.weights", self.scale)
        h = h + self.linear(t, f, masks, context, f"{i}.o")
        normed = self.rms_norm(t, f, h, f"{i}.post_norm", self.eps)
        gate = ops.silu(self.linear(t, f, masks, normed, f"{i}.gate"))
        inner = gate * self.linear(t, f, masks, normed, f"{i}.up")
        return h + self.linear(t, f, masks, inner, f"{i}.down")

    def construct(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        input_ids: Tensor,
        mask: Tensor,
        cos: Tensor,
        sin: Tensor,
        last: Tensor,
        labels: Tensor,
        class_weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        batch, length = input_ids.shape
        h = ops.gather(self.w(t, f, "embed"), ops.reshape(input_ids, (-1,)), 0)
        # the masks and rotary tables at their operands' own shapes once: broadcasting is slow on CPU
        mask = ops.broadcast_to(mask, (batch, self.heads, length, length))
        rope = (
            ops.broadcast_to(cos, (batch, self.heads, length, self.head_dim)),
            ops.broadcast_to(sin, (batch, self.heads, length, self.head_dim)),
            ops.broadcast_to(cos, (batch, self.kv_heads, length, self.head_dim)),
            ops.broadcast_to(sin, (batch, self.kv_heads, length, self.head_dim)),
        )
        for i in range(self.layers):
            h = self.layer(t, f, masks, h, batch, length, mask, rope, i)
        h = self.rms_norm(t, f, h, "final_norm", self.eps)
        logits = self.linear(t, f, masks, ops.gather(h, last, 0), "score")  # the last non-pad rows
        return self.classification_loss(logits, labels, class_weights), logits


class CompiledLlama(CompiledClassifier[LlamaPlan]):
    """The compiled graphs of one (peft) LlamaForSequenceClassification and the host-side inputs."""

    plan_class = LlamaPlan
    Net = LlamaGraph

    def inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """ids, the additive causal and padding mask, the rotary tables, and the flat index of each
        row's last non-pad token (transformers' rule: the rightmost token that is not padding)."""
        ids, mask = pad_batch(input_ids, attention_mask, self.plan.pad)
        rows, cols = ids.shape
        causal = np.tril(np.ones((cols, cols), bool))
        additive = np.where(causal[None] & (mask[:, None, :] > 0), 0.0, FLOAT32_MIN).astype(np.float32)
        last = (np.arange(cols, dtype=np.int32) * (ids != self.plan.pad)).argmax(-1)
        flat_last = (np.arange(rows) * cols + last).astype(np.int32)
        return (ids, additive[:, None], *self.plan.rotary(cols), flat_last)


COMPILED = CompiledLlama
