"""Tiny models made from a config at run time, with a word-level tokenizer built from the data.

For tests and offline smoke runs only: the weights are random, so they learn the data by heart
rather than understand it. The model files themselves are written by a backend
(``dualtune tiny``), so both backends can load the very same weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
DECODER_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama, which has no pad token


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text.lower())  # tokenizers' Whitespace pre-tokenizer


def tiny_tokenizer(texts: Sequence[str], decoder: bool = False):
    """A fast tokenizer over the words of ``texts`` that appends ``</s>`` like T5's, or (``decoder``)
    prepends ``<s>`` and has no pad token, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(DECODER_SPECIALS if decoder else SPECIALS)}
    for text in texts:
        for w in words(text):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # the same split as words()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if decoder:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(kind: str, tokenizer):
    from transformers import BertConfig, LlamaConfig, MPNetConfig, T5Config

    vocab_size = len(tokenizer)
    if kind == "t5":
        return T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            dropout_rate=0.1,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=256,
            pad_token_id=0,
        )
    if kind == "mpnet":  # all-mpnet-base-v2's architecture (positions start after the pad id, as RoBERTa's)
        return MPNetConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=256 + 1,
            pad_token_id=0,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}: expected {', '.join(TINY_KINDS)}")


TINY_KINDS = ("t5", "bert", "llama", "mpnet")
