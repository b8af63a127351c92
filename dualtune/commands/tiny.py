"""``dualtune tiny KIND OUT_DIR``: a tiny random model and tokenizer for offline smoke runs."""

from __future__ import annotations

import argparse
import logging

from dualtune.commands.common import backend_args
from dualtune.tiny import TINY_KINDS

NAME = "tiny"
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
    backend_args(tiny)
    return tiny


def main(args: argparse.Namespace) -> int:
    from dualtune import synthetic
    from dualtune.backend import get_backend

    texts = [r["sentence"] for r in synthetic.generate()] + synthetic.LABEL_NAMES
    get_backend(args.backend, args.device).save_tiny_model(args.kind, args.out_dir, texts, args.seed)
    log.info("tiny %s written to %s", args.kind, args.out_dir)
    return 0
