"""``dualtune report RUN_DIR...``: finished runs side by side in one table (loads no framework)."""

from __future__ import annotations

import argparse
import logging

NAME = "report"
log = logging.getLogger("dualtune")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    rep = sub.add_parser(
        NAME,
        help="finished runs side by side in one table",
        description="One row per RUN_DIR (in the order given) from its final_metrics.json, "
        "trainable.json and recipe.yaml: backend, method, the task's main metric "
        "(accuracy; seq2seq exact_match, else teacher_forced_accuracy), macro F1, "
        "trainable parameters, train time, peak memory, steps. Loads no framework.",
    )
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--format", choices=["text", "markdown", "csv"], default="text")
    rep.add_argument(
        "--plot",
        metavar="OUT.png",
        default=None,
        help="also write the runs' curves to one PNG: train loss per step, eval loss and the "
        "judged metric at each evaluation (from each run's metrics.jsonl)",
    )
    rep.add_argument(
        "--anchors",
        nargs="?",
        const="auto",
        metavar="DATASET",
        help="also print the published numbers for the runs' data set (the same data and protocol: "
        "source, model, method, eval split, metric) beside each run's value; the data set is found "
        "from each recipe's data.source, or named: financial_phrasebank/sentences_allagree, "
        "financial_phrasebank/sentences_50agree, disaster_tweets",
    )
    rep.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")
    return rep


def main(args: argparse.Namespace) -> int:
    from dualtune.errors import RunDirError
    from dualtune.report import finished_runs, report

    if args.plot:
        from pathlib import Path

        from dualtune.rundir import check_new_file

        check_new_file(Path(args.plot), args.overwrite, (".png",))
    runs, skipped = finished_runs(args.run_dirs)
    if not runs:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise RunDirError(f"no finished run to report: {skipped[0]}{more}")
    for why in skipped:
        log.warning("skipped %s", why)
    print(report(runs, args.format))
    if args.anchors:
        from dualtune.report import anchor_report

        dataset = None if args.anchors == "auto" else args.anchors
        print()
        print(anchor_report(runs, dataset, args.format))
    if args.plot:
        from dualtune.report import plot_curves

        log.info("plot: %s", plot_curves(runs, args.plot))
    return 0
