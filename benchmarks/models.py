"""The model both sides load (--model): public configs with random weights, dualtune's tiny models,
the recipe's own model or a directory. A generated model is written by real torch in a child process
(``bench.py --make-model KIND DIR``), so both sides and both backends load identical weights."""

from __future__ import annotations

import json
from pathlib import Path

from common import BenchError
from processes import spawn

# t5-small's public config.json (https://huggingface.co/t5-small/blob/main/config.json), without
# task_specific_params. feed_forward_proj "relu" and tied embeddings are the T5Config defaults it relies on.
T5_SMALL_CONFIG = {
    "d_model": 512,
    "d_ff": 2048,
    "d_kv": 64,
    "num_heads": 8,
    "num_layers": 6,
    "num_decoder_layers": 6,
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "feed_forward_proj": "relu",
    "is_encoder_decoder": True,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "n_positions": 512,
}
# sentence-transformers/all-MiniLM-L6-v2's config.json (BERT architecture).
MINILM_CONFIG = {
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_attention_heads": 12,
    "num_hidden_layers": 6,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}
# HuggingFaceTB/SmolLM2-135M's config.json (Llama architecture); its special tokens are the word
# tokenizer's here (pad 0, end 1), as with the other generated models.
SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.041666666666666664,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 1,
}
GENERATED = ("t5-small-config", "minilm-config", "smollm2-config", "tiny")


def word_tokenizer(texts):
    """dualtune's word-level tokenizer over ``texts``, checked to split words (before 95aa88f it
    encoded every sentence as ``<unk> </s>``, which would make a benchmark of two-token inputs)."""
    from dualtune.tiny import tiny_tokenizer

    tok = tiny_tokenizer(texts)
    if tok.unk_token_id in tok("operating profit rose")["input_ids"]:
        raise BenchError(
            "dualtune.tiny.tiny_tokenizer maps known words to <unk>; inputs would be 2 tokens long"
        )
    return tok


def make_model(kind: str, out_dir: str, seed: int = 0) -> None:
    """The child: write a ``kind`` model with random weights and the word-level tokenizer to ``out_dir``."""
    import torch
    import transformers

    from dualtune import synthetic
    from dualtune.tiny import tiny_config

    texts = [r["sentence"] for r in synthetic.generate()] + synthetic.LABEL_NAMES
    tok = word_tokenizer(texts)
    torch.manual_seed(seed)
    if kind == "t5-small-config":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_SMALL_CONFIG))
    elif kind == "minilm-config":
        model = transformers.BertModel(transformers.BertConfig(**MINILM_CONFIG))
    elif kind == "smollm2-config":
        model = transformers.LlamaModel(transformers.LlamaConfig(**SMOLLM2_CONFIG))
    elif kind in ("tiny-t5", "tiny-bert"):
        config = tiny_config(kind.split("-")[1], tok)
        cls = transformers.T5ForConditionalGeneration if kind == "tiny-t5" else transformers.BertModel
        model = cls(config)
    else:
        raise BenchError(f"unknown model kind {kind}")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}))


def resolve_model(choice: str, recipe, work: Path, env: dict, say) -> tuple[str, str, dict]:
    """(kind, directory, info) for --model."""
    task = recipe.model.task
    if choice == "auto":
        own = recipe.model.name_or_path
        if own.startswith("pkg:") or Path(own).is_dir():
            choice = "recipe"
        else:
            choice = "t5-small-config" if task == "seq2seq" else "minilm-config"
    if choice == "recipe":
        from dualtune.hub import resolve_model_path

        return "recipe", resolve_model_path(recipe.model.name_or_path), {}
    if choice in GENERATED:
        kind = choice if choice != "tiny" else ("tiny-t5" if task == "seq2seq" else "tiny-bert")
        if (kind.startswith("tiny-t5") or kind == "t5-small-config") != (task == "seq2seq"):
            raise BenchError(f"--model {choice} does not fit a {task} recipe")
        out = work / "model"
        say(f"writing a {kind} model with random weights (real torch, child process) -> {out}")
        stdout = spawn(["--make-model", kind, str(out)], env, work / "make-model.log", "making the model")
        return kind, str(out), json.loads(stdout.strip().splitlines()[-1])
    if not Path(choice).is_dir():
        raise BenchError(
            f"--model {choice}: not {', '.join(GENERATED + ('recipe', 'auto'))} and not a directory"
        )
    return "path", str(Path(choice).resolve()), {}
