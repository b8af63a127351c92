"""``dualtune run RECIPE``: fine-tune as a recipe says and write a run directory."""

from __future__ import annotations

import argparse
import logging

from dualtune.backend import default_backend, framework, frameworks, launched_rank
from dualtune.commands.common import backend_args, recipe_args
from dualtune.errors import UserError

NAME = "run"
log = logging.getLogger("dualtune")


def _epilog() -> str:
    b = default_backend()
    return f"""\
overrides are key=value pairs on the recipe's dotted keys, read as YAML:
  dualtune run recipes/t5_lora.yaml --backend {b} optim.lr=3e-4 train.epochs=1 \\
      model.name_or_path=/models/t5-small data.source=/data/FinancialPhraseBank-v1.0.zip

the run directory (train.output_dir, default runs/{{recipe}}-{{backend}}) receives recipe.yaml,
metrics.jsonl, final_metrics.json, predictions.jsonl, classification_report.json,
confusion_matrix.png, trainable.json, run.log, adapter/ (peft format) and checkpoints/. It is
written aside and moved into place only when the run succeeds. dualtune replaces only a finished
run of its own, and only with --overwrite; any other folder or file at the path is refused.

interrupted runs: SIGTERM, SIGHUP or Ctrl-C finish the current step, write a checkpoint and exit
(143, 129, 130); train.save_every=N also checkpoints every N steps. Continue with the same command
and --resume (on either backend):
  dualtune run recipes/t5_lora.yaml --backend {b} train.save_every=50
  dualtune run recipes/t5_lora.yaml --backend {b} train.save_every=50 --resume"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    run = sub.add_parser(
        NAME,
        help="fine-tune as a recipe says",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a model as RECIPE says and write a run directory.",
    )
    recipe_args(run)
    backend_args(run)
    run.add_argument("--output-dir", help="run directory (overrides train.output_dir)")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output directory if it holds a finished dualtune run (never anything else)",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint: RUN_DIR, or by default the "
        "unfinished run of the output directory (<dir>.failed, <dir>.partial-PID)",
    )
    run.add_argument("--no-progress", action="store_true", help="progress lines instead of a bar")
    launchers = ", ".join(f"{f.launcher} on --backend {f.name}" for f in frameworks())
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help=f"data parallel on N processes: {launchers}; each takes train.batch_size rows of every step",
    )
    return run


def main(args: argparse.Namespace) -> int:
    from dualtune.backend import get_backend
    from dualtune.recipe import load_recipe
    from dualtune.runner import run_recipe
    from dualtune.validate import validate

    fw = framework(args.backend)
    if fw.serve_launcher_process():  # a launcher's helper process (msrun's scheduler) runs this too
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: expected 1 or more")
    rank = launched_rank()
    if rank not in (None, 0):  # a data-parallel process other than 0: process 0 checks
        run_recipe(recipe, get_backend(args.backend, args.device), args.output_dir, resume=args.resume)
        return 0
    # Everything checkable (output, data, labels, lengths, device) is checked before a framework
    # loads: a refusal costs a second and leaves no run directory.
    # (launched as process 0, this one does not know the others yet: the run checks the step batch)
    processes = args.nproc if rank is None else None
    plan = validate(
        recipe, args.backend, args.device, args.output_dir, args.overwrite, args.resume, processes=processes
    )
    for warning in plan.warnings:
        log.warning("%s", warning)
    assert plan.run is not None  # validate planned the output
    out = plan.run.target
    if args.nproc > 1 and rank is None:
        return fw.launch(args.nproc, _without_nproc(args.argv), out)
    backend = get_backend(args.backend, args.device)
    log.info("recipe %s on %s (%s) -> %s", recipe.name, backend.name, backend.device, out)
    run_recipe(
        recipe,
        backend,
        out,
        progress=False if args.no_progress else None,
        plan=plan.run,
    )
    log.info("run directory: %s", out)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line each launched process runs: the same, less --nproc."""
    return [
        a
        for i, a in enumerate(argv)
        if not (a == "--nproc" or a.startswith("--nproc=") or (i and argv[i - 1] == "--nproc"))
    ]
