"""``dualtune compare RECIPE``: the recipe on both backends from one start, judged in numbers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dualtune.errors import CompareError

NAME = "compare"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from dualtune.backend import backend_names

    reference, other = backend_names()[:2]
    cmp = sub.add_parser(
        NAME,
        help="run a recipe on both backends and compare the numbers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Run RECIPE on {reference} and on {other} (separate processes) from the "
        "same initial adapter with dropout off, then report per-step losses, "
        "gradient norms and final metrics side by side against tolerances. "
        "Exit status 0 only if every check passes.",
        epilog="writes OUT/report.txt, OUT/report.json, OUT/loss_curves.png and both runs",
    )
    cmp.add_argument("recipe")
    cmp.add_argument("overrides", nargs="*", metavar="key=value")
    cmp.add_argument("--out", default=None, help="output directory (default: runs/compare-{recipe})")
    cmp.add_argument(
        "--steps", type=int, default=20, help="optimizer steps per backend (0: the whole recipe)"
    )
    cmp.add_argument(
        "--layers",
        action="store_true",
        help="also compare every module's output on one batch, to find the first divergence",
    )
    return cmp


def main(args: argparse.Namespace) -> int:
    from dualtune.compare import compare, format_report

    out = Path(args.out or f"runs/compare-{Path(args.recipe).stem}")
    try:
        report = compare(args.recipe, args.overrides, out, steps=args.steps, layers=args.layers)
    except CompareError as err:  # a run failed: the comparison failed, not the user's input
        print(f"dualtune: error: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"report: {out / 'report.txt'}  plot: {out / 'loss_curves.png'}")
    return 0 if report["passed"] else 1
