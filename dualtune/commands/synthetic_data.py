"""``dualtune synthetic-data OUT.jsonl``: the made-up financial-sentiment dataset."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

NAME = "synthetic-data"
log = logging.getLogger("dualtune")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    syn = sub.add_parser(
        NAME,
        help="write the synthetic financial-sentiment dataset",
        description="Write the SYNTHETIC financial-sentiment dataset (made-up sentences "
        "with financial_phrasebank's fields and labels) as JSONL.",
    )
    syn.add_argument("out", help="output .jsonl path")
    syn.add_argument("--rows", type=int, default=1000)
    syn.add_argument("--seed", type=int, default=0)
    return syn


def main(args: argparse.Namespace) -> int:
    from dualtune import synthetic
    from dualtune.data import write_jsonl

    write_jsonl(synthetic.generate(args.rows, args.seed), Path(args.out))
    log.info("%d synthetic rows written to %s", args.rows, args.out)
    return 0
