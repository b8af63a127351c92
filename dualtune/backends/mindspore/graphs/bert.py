"""BERT-style encoders for sequence classification (BertForSequenceClassification: BERT, MiniLM,
with LoRA, BitFit or full fine-tuning) as compiled MindSpore graphs (see ``base``): the loss with
its gradient, and the forward (loss and logits) for evaluation and prediction."""

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

MODEL_CLASS = "BertForSequenceClassification"
# Off unless DUALTUNE_MINDSPORE_GRAPH=1: a step takes 0.6x op by op's time, but compiling ate the
# gain on the recipes (minilm_fpb's 3 epochs: 692 s against about 718 s; the 90-step demo: 188 s
# against 163 s) and peak memory was 7.4 GB against 1.9 (BENCHMARKS.md)
ON_BY_DEFAULT = False


def why_not(model: Any) -> str | None:
    """None when ``model`` (a BertForSequenceClassification) runs as compiled graphs, else why not."""
    base = base_model(model)
    config = base.config
    if config.hidden_act != "gelu" or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return "only BERT with GELU and absolute position embeddings"
    if base.bert.pooler is None or config.is_decoder:
        return "only BERT with its pooler, as an encoder"
    return classifier_why_not(model, base)


class BertPlan(Plan):
    def __init__(self, model: Any, trainable: Sequence[Tensor]) -> None:
        super().__init__(trainable)
        base = base_model(model)
        cfg = base.config
        self.layers, self.heads, self.hidden = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
        self.inner, self.eps, self.pad = cfg.intermediate_size, float(cfg.layer_norm_eps), cfg.pad_token_id
        bert = base.bert
        emb = bert.embeddings
        self.add("word", emb.word_embeddings.weight)
        self.add("position", emb.position_embeddings.weight)
        self.add("type", emb.token_type_embeddings.weight)
        self.norm("embed.norm", emb.LayerNorm)
        self.site("embed", emb.dropout)
        for i, layer in enumerate(bert.encoder.layer):
            attn = layer.attention.self
            for proj, module in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
                self.linear(f"{i}.{proj}", module)
            # eager attention: a Dropout module; sdpa: the float it hands to the kernel
            if hasattr(attn, "dropout_prob"):
                self.site(f"{i}.weights", attn, "dropout_prob")
            else:
                self.site(f"{i}.weights", attn.dropout)
            out = layer.attention.output
            self.linear(f"{i}.ao", out.dense)
            self.site(f"{i}.ao.out", out.dropout)
            self.norm(f"{i}.ao.norm", out.LayerNorm)
            self.linear(f"{i}.wi", layer.intermediate.dense)
            self.linear(f"{i}.wo", layer.output.dense)
            self.site(f"{i}.out", layer.output.dropout)
            self.norm(f"{i}.out.norm", layer.output.LayerNorm)
        self.linear("pooler", bert.pooler.dense)
        self.site("classifier.in", base.dropout)
        self.linear("classifier", base.classifier)

    def norm(self, name: str, module: Any) -> None:
        self.add(name, module.weight)
        self.add(name + ".bias", module.bias)

    def constants(self) -> tuple[Any, ...]:
        return (self.layers, self.heads, self.hidden, self.inner, self.eps)

    def mask_shape(self, name: str, *shape: int) -> tuple[int, ...]:
        batch, length = shape
        parts = name.split(".")
        if parts[0] in ("pooler", "classifier"):
            return (batch, self.hidden)
        if parts[-1] == "weights":
            return (batch, self.heads, length, length)
        if parts[-1] == "lora" and parts[-2] == "wo":
            return (batch * length, self.inner)
        return (batch * length, self.hidden)


class BertGraph(GraphNet):
    def __init__(self, plan: BertPlan, sites: tuple[str, ...]) -> None:
        super().__init__(plan, sites)
        self.layers, self.heads, self.hidden = plan.layers, plan.heads, plan.hidden
        self.head_dim = plan.hidden // plan.heads
        self.scale = self.head_dim**-0.5
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=plan.eps)

    def norm(self, t: Sequence[Tensor], f: Sequence[Tensor], x: Tensor, name: str) -> Tensor:
        return self.layer_norm(x, self.w(t, f, name), self.w(t, f, name + ".bias"))[0]

    def heads_of(self, x: Tensor, batch: int) -> Tensor:
        return self.split_heads(x, batch, self.heads, self.head_dim)

    def layer(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        h: Tensor,
        batch: int,
        mask: Tensor,
        i: int,
    ) -> Tensor:
        q = self.heads_of(self.linear(t, f, masks, h, f"{i}.q"), batch)
        k = self.heads_of(self.linear(t, f, masks, h, f"{i}.k"), batch)
        v = self.heads_of(self.linear(t, f, masks, h, f"{i}.v"), batch)
        context = self.attend(masks, q, k, v, mask, f"{i}.weights", self.scale)
        attn = self.drop(masks, self.linear(t, f, masks, context, f"{i}.ao"), f"{i}.ao.out")
        h = self.norm(t, f, attn + h, f"{i}.ao.norm")
        inner = ops.gelu(self.linear(t, f, masks, h, f"{i}.wi"), approximate="none")
        out = self.drop(masks, self.linear(t, f, masks, inner, f"{i}.wo"), f"{i}.out")
        return self.norm(t, f, out + h, f"{i}.out.norm")

    def construct(
        self,
        t: Sequence[Tensor],
        f: Sequence[Tensor],
        masks: Sequence[Tensor],
        input_ids: Tensor,
        positions: Tensor,
        ext_mask: Tensor,
        labels: Tensor,
        class_weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        batch, length = input_ids.shape
        flat = ops.reshape(input_ids, (-1,))
        h = ops.gather(self.w(t, f, "word"), flat, 0) + ops.gather(self.w(t, f, "type"), flat * 0, 0)
        h = h + ops.gather(self.w(t, f, "position"), positions, 0)
        h = self.drop(masks, self.norm(t, f, h, "embed.norm"), "embed")
        # the padding mask at the scores' own shape once: a broadcasting add is slow on CPU
        mask = ops.broadcast_to(ext_mask, (batch, self.heads, length, length))
        for i in range(self.layers):
            h = self.layer(t, f, masks, h, batch, mask, i)
        first = ops.reshape(h, (batch, length, self.hidden))[:, 0]
        pooled = ops.tanh(self.linear(t, f, masks, first, "pooler"))
        pooled = self.drop(masks, pooled, "classifier.in")
        logits = self.linear(t, f, masks, pooled, "classifier")
        return self.classification_loss(logits, labels, class_weights), logits


class CompiledBert(CompiledClassifier[BertPlan]):
    """The compiled graphs of one (peft) BertForSequenceClassification and the host-side inputs."""

    plan_class = BertPlan
    Net = BertGraph

    def inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """ids, position ids, the additive padding mask."""
        ids, mask = pad_batch(input_ids, attention_mask, self.plan.pad or 0)
        rows, cols = ids.shape
        positions = np.tile(np.arange(cols, dtype=np.int32), rows)
        return ids, positions, ((1.0 - mask) * FLOAT32_MIN)[:, None, None, :].astype(np.float32)


COMPILED = CompiledBert
