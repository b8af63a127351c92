"""``dualtune eval RUN_DIR``: evaluate a run's adapter (or a checkpoint) on its eval split."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dualtune.commands.common import backend_args, check_saved

NAME = "eval"
log = logging.getLogger("dualtune")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ev = sub.add_parser(
        NAME,
        help="evaluate a run directory on either backend",
        description="Evaluate RUN_DIR's adapter on its recipe's eval split, on either "
        "backend (whichever trained it). Writes RUN_DIR/eval/BACKEND/.",
    )
    ev.add_argument("run_dir")
    ev.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="evaluate this checkpoint (RUN_DIR/checkpoints/step-N) instead of the final adapter; "
        "also for unfinished runs",
    )
    backend_args(ev)
    return ev


def main(args: argparse.Namespace) -> int:
    from dualtune.backend import get_backend
    from dualtune.metrics import format_classification_report
    from dualtune.rundir import check_same_data
    from dualtune.runner import check_finished, evaluate_run

    check_finished(args.run_dir, args.checkpoint)  # before loading a framework
    check_saved(args.run_dir, args.checkpoint)
    check_same_data(Path(args.run_dir))
    backend = get_backend(args.backend, args.device)
    out, evaluation = evaluate_run(args.run_dir, backend, args.checkpoint)
    for k, v in evaluation.metrics.items():
        print(f"{k}: {v:.6g}")
    print()
    print(format_classification_report(evaluation.report))
    log.info("written to %s/", out)
    return 0
