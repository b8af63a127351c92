"""Tiny random Hugging Face models written through the active framework (``dualtune tiny``), so
both backends can load the very same weights. Configs and tokenizers: ``dualtune.tiny``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import transformers

from dualtune.tiny import tiny_config, tiny_tokenizer

MODEL_CLASSES = {
    "t5": "T5ForConditionalGeneration",
    "bert": "BertModel",
    "llama": "LlamaForCausalLM",
    "mpnet": "MPNetModel",
}


def write_tiny_model(kind: str, directory: str | Path, vocab_texts: Sequence[str]) -> None:
    """A tiny ``kind`` model (random weights from the framework's seeded generator) and tokenizer."""
    tok = tiny_tokenizer(vocab_texts, decoder=kind == "llama")
    getattr(transformers, MODEL_CLASSES[kind])(tiny_config(kind, tok)).save_pretrained(directory)
    tok.save_pretrained(directory)
