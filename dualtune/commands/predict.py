"""``dualtune predict RUN_DIR TEXT...``: label new text with a run's adapter, one JSON line each."""

from __future__ import annotations

import argparse

from dualtune.commands.common import backend_args, check_saved
from dualtune.errors import DataError

NAME = "predict"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    pred = sub.add_parser(
        NAME,
        help="label new text with a run directory's adapter",
        description="Label TEXT (or each non-blank line of --file) with RUN_DIR's "
        "trained adapter. Prints one JSON object per text: classification "
        '{"text", "label", "scores": {label: probability}}; seq2seq '
        '{"text", "label": generated text}.',
    )
    pred.add_argument("run_dir")
    pred.add_argument("texts", nargs="*", metavar="TEXT")
    pred.add_argument("--file", help="UTF-8 text file, one text per line (blank lines skipped)")
    pred.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="texts per forward pass (default: the run's eval batch size)",
    )
    backend_args(pred)
    return pred


def main(args: argparse.Namespace) -> int:
    import json

    from dualtune.backend import get_backend
    from dualtune.predict import predict, read_texts
    from dualtune.runner import check_finished

    check_finished(args.run_dir)  # before loading a framework: bad input fails at once
    texts = read_texts(args.texts, args.file)
    if args.batch_size is not None and args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: expected 1 or more")
    check_saved(args.run_dir)
    for row in predict(args.run_dir, texts, get_backend(args.backend, args.device), args.batch_size):
        print(json.dumps(row, ensure_ascii=False))
    return 0
