"""``dualtune export RUN_DIR --format merged|onnx``: a run's model for use without dualtune or peft,
verified against the run's own predictions before it is reported."""

from __future__ import annotations

import argparse

from dualtune.commands.common import backend_args, check_saved

NAME = "export"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from dualtune.export import FORMATS

    ex = sub.add_parser(
        NAME,
        help="export a run's model merged into a plain Hugging Face folder, or as ONNX",
        description="Export RUN_DIR's trained model: 'merged' (the adapter folded into the base "
        "weights, a plain Hugging Face folder that transformers loads without peft) or 'onnx' "
        "(classification; inputs input_ids and attention_mask, output logits). Each export runs the "
        "run's eval rows and must give the run's own predictions (labels identical, logits within "
        "1e-4) before it is moved into place, with export.json beside it. Prompt-learning methods "
        "(prefix, prompt, p_tuning) cannot be merged.",
    )
    ex.add_argument("run_dir")
    ex.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        required=True,
        help="merged or onnx; repeat for both",
    )
    ex.add_argument(
        "--out",
        metavar="DIR",
        help="write each format to DIR/FORMAT/ (default: RUN_DIR/export/FORMAT/)",
    )
    ex.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export there (never files dualtune did not write)",
    )
    backend_args(ex)
    return ex


def main(args: argparse.Namespace) -> int:
    from dualtune.backend import get_backend
    from dualtune.export import export_run, plan_export

    # every refusal before a framework loads
    plan = plan_export(args.run_dir, args.formats, args.backend, args.out, args.overwrite)
    check_saved(args.run_dir)
    for record in export_run(plan, get_backend(args.backend, args.device)):
        check = record["verification"]
        print(
            f"{record['format']}: {record['path']} ({check['rows']} rows verified: labels identical, "
            f"max |logit diff| {check['max_abs_logit_diff']:.2e} <= {check['tolerance']:.0e})"
        )
    return 0
