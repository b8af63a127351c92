"""``dualtune tiny KIND OUT_DIR``: a tiny random model and tokenizer for offline smoke runs."""

from __future__ import annotations

import argparse
import logging

from dualtune.commands.common import backend_args
from dualtune.tiny import TINY_KINDS

NAME = "tiny"
# what save_pretrained writes for a tiny model and its tokenizer (--overwrite replaces only these)
TINY_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "merges.txt", "vocab.json",
}  # fmt: skip
log = logging.getLogger("dualtune")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    tiny = sub.add_parser(
        NAME,
        help="write a tiny random model + tokenizer for offline smoke runs",
        description="Write a tiny, randomly initialised T5, BERT or Llama and a word-level "
        "tokenizer built from the synthetic data, for tests and smoke "
        "runs where no model hub is reachable.",
    )
    tiny.add_argument("kind", choices=TINY_KINDS)
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it holds only what dualtune tiny writes"
    )
    backend_args(tiny)
    return tiny


def main(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from dualtune import synthetic
    from dualtune.backend import get_backend
    from dualtune.rundir import check_new_folder, replace_folder

    out = Path(args.out_dir)
    check_new_folder(out, TINY_FILES, args.overwrite)  # before a framework loads
    backend = get_backend(args.backend, args.device)
    texts = [r["sentence"] for r in synthetic.generate()] + synthetic.LABEL_NAMES
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        backend.save_tiny_model(args.kind, tmp, texts, args.seed)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny %s written to %s", args.kind, args.out_dir)
    return 0
