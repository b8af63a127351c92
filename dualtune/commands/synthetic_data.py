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
    syn.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return syn


def main(args: argparse.Namespace) -> int:
    import json

    from dualtune import synthetic
    from dualtune.errors import RecipeError
    from dualtune.rundir import check_new_file, write_atomic

    out = Path(args.out)
    if args.rows < 1:
        raise RecipeError(f"--rows {args.rows}: expected 1 or more")
    check_new_file(out, args.overwrite, (".jsonl",))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(row) + "\n" for row in synthetic.generate(args.rows, args.seed)))
    log.info("%d synthetic rows written to %s", args.rows, args.out)
    return 0
