"""``dualtune``: run a recipe on PyTorch or MindSpore, and make offline test material."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from dualtune.backend import BACKENDS
from dualtune.errors import DataError, UserError
from dualtune.rundir import RunInterrupted
from dualtune.tiny import TINY_KINDS

log = logging.getLogger("dualtune")

EPILOG_RUN = """\
overrides are key=value pairs on the recipe's dotted keys, read as YAML:
  dualtune run recipes/t5_lora.yaml --backend torch optim.lr=3e-4 train.epochs=1 \\
      model.name_or_path=/models/t5-small data.source=/data/FinancialPhraseBank-v1.0.zip

the run directory (train.output_dir, default runs/{recipe}-{backend}) receives recipe.yaml,
metrics.jsonl, final_metrics.json, predictions.jsonl, classification_report.json,
confusion_matrix.png, trainable.json, run.log, adapter/ (peft format) and checkpoints/. It is
written aside and moved into place only when the run succeeds. dualtune replaces only a finished
run of its own, and only with --overwrite; any other folder or file at the path is refused.

interrupted runs: SIGTERM, SIGHUP or Ctrl-C finish the current step, write a checkpoint and exit
(143, 129, 130); train.save_every=N also checkpoints every N steps. Continue with the same command
and --resume (on either backend):
  dualtune run recipes/t5_lora.yaml --backend torch train.save_every=50
  dualtune run recipes/t5_lora.yaml --backend torch train.save_every=50 --resume"""


EPILOG_SWEEP = """\
  dualtune sweep recipes/minilm_demo.yaml --space recipes/spaces/lora_seed001.yaml --trials 20

OUT (default runs/sweep-{recipe}) receives trial-NNN/ (each trial's run directory), trial-NNN.log,
optuna.db (the study), trials.txt and trials.csv, best_recipe.yaml (the recipe with the best
parameters, for `dualtune run`), history.png and importances.png. The same command continues an
interrupted sweep: finished trials count toward --trials, and a trial whose sweep was stopped runs
again under its number (from its checkpoint). --jobs J runs J worker processes on the storage."""


def _backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("DUALTUNE_BACKEND", "torch"),
        help="framework to run on (default: $DUALTUNE_BACKEND or torch)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch: cpu | cuda[:N]; mindspore: cpu | ascend | gpu (default: cpu)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualtune",
        description="Parameter-efficient fine-tuning of Hugging Face models from one YAML recipe, "
        "on PyTorch or on MindSpore, with the same numbers on both.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also list every trainable tensor")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="fine-tune as a recipe says",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a model as RECIPE says and write a run directory.",
    )
    run.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.lr=3e-4")
    _backend_arg(run)
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
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data parallel on N processes: torchrun on --backend torch (gloo on cpu, nccl on cuda), "
        "msrun on --backend mindspore (mccl on cpu, hccl on ascend, nccl on gpu); each takes "
        "train.batch_size rows of every step",
    )

    val = sub.add_parser(
        "validate",
        help="check a recipe, its data and its output without training",
        description="Check everything about RECIPE that needs no framework and no model "
        "weights (recipe, data, labels, lengths against config.json, label words, "
        "output location, device) and print the plan: rows and classes per split, "
        "steps, evaluation points, token lengths, warnings. Exit 0 or 2. "
        "dualtune run makes the same checks first.",
    )
    val.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    val.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.lr=3e-4")
    _backend_arg(val)
    val.add_argument("--output-dir", help="run directory (overrides train.output_dir)")
    val.add_argument(
        "--overwrite", action="store_true", help="as for run: a finished run there may be replaced"
    )

    ev = sub.add_parser(
        "eval",
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
    _backend_arg(ev)

    pred = sub.add_parser(
        "predict",
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
    _backend_arg(pred)

    rep = sub.add_parser(
        "report",
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

    cmp = sub.add_parser(
        "compare",
        help="run a recipe on both backends and compare the numbers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run RECIPE on torch and on MindSpore (separate processes) from the "
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

    tiny = sub.add_parser(
        "tiny",
        help="write a tiny random model + tokenizer for offline smoke runs",
        description="Write a tiny, randomly initialised T5, BERT or Llama and a word-level "
        "tokenizer built from the synthetic data, for tests and smoke "
        "runs where no model hub is reachable.",
    )
    tiny.add_argument("kind", choices=TINY_KINDS)
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    _backend_arg(tiny)

    syn = sub.add_parser(
        "synthetic-data",
        help="write the synthetic financial-sentiment dataset",
        description="Write the SYNTHETIC financial-sentiment dataset (made-up sentences "
        "with financial_phrasebank's fields and labels) as JSONL.",
    )
    syn.add_argument("out", help="output .jsonl path")
    syn.add_argument("--rows", type=int, default=1000)
    syn.add_argument("--seed", type=int, default=0)

    swp = sub.add_parser(
        "sweep",
        help="search hyperparameters with Optuna, one run per trial",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search the recipe keys SPACE.yaml names (categorical, int, float, log "
        "distributions; metric and direction) with Optuna's seeded TPE sampler and "
        "median pruner. Each trial is a `dualtune run` in a process of its own, in "
        "OUT/trial-NNN; its evaluations feed the pruner as they are written.",
        epilog=EPILOG_SWEEP,
    )
    swp.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    swp.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every trial")
    swp.add_argument(
        "--space", required=True, metavar="SPACE.yaml", help="the search space (see recipes/spaces/)"
    )
    swp.add_argument(
        "--trials",
        type=int,
        required=True,
        metavar="N",
        help="trials in the study, counting those a previous run of the sweep finished",
    )
    _backend_arg(swp)
    swp.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage URL (default: sqlite:///OUT/optuna.db); the study is named after the recipe",
    )
    swp.add_argument("--jobs", type=int, default=1, metavar="J", help="worker processes sharing the storage")
    swp.add_argument("--out", metavar="DIR", help="sweep directory (default: runs/sweep-{recipe})")
    swp.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
    swp.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one of --jobs's processes
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dualtune: %(message)s"))
    log.addHandler(handler)
    # Data parallel: process 0 speaks for the job; the others only warn.
    quiet = _launched_rank() != 0
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _launched_rank() -> int:
    """This process's rank when torchrun (RANK) or msrun (a worker's RANK_ID) started it, else 0."""
    if os.environ.get("MS_ROLE") == "MS_WORKER":
        return int(os.environ.get("RANK_ID", "0"))
    return int(os.environ.get("RANK", "0"))


def _cmd_run(args) -> int:
    from dualtune.backend import get_backend
    from dualtune.recipe import load_recipe
    from dualtune.runner import check_output, run_recipe
    from dualtune.validate import validate

    if os.environ.get("MS_ROLE") == "MS_SCHED":  # msrun's scheduler process runs this command too
        from dualtune.backends.mindspore import serve_msrun_scheduler

        serve_msrun_scheduler()
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: expected 1 or more")
    if _launched_rank() != 0:  # a data-parallel process other than 0: process 0 checks
        run_recipe(recipe, get_backend(args.backend, args.device), args.output_dir, resume=args.resume)
        return 0
    # Everything checkable (output, data, labels, lengths, device) is checked before a framework
    # loads: a refusal costs a second and leaves no run directory.
    plan = validate(recipe, args.backend, args.device, args.output_dir, args.overwrite, args.resume)
    for warning in plan.warnings:
        log.warning("%s", warning)
    out = (
        Path(plan.output)
        if plan.output
        else check_output(recipe, args.backend, args.output_dir, args.overwrite, args.resume)
    )
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ and "MS_ROLE" not in os.environ:
        return _launch_data_parallel(args, out)
    backend = get_backend(args.backend, args.device)
    log.info("recipe %s on %s (%s) -> %s", recipe.name, backend.name, backend.device, out)
    run_recipe(
        recipe,
        backend,
        out,
        progress=False if args.no_progress else None,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    log.info("run directory: %s", out)
    return 0


def _launch_data_parallel(args, out: Path) -> int:
    """``dualtune run --nproc N ...``: the same command on N processes of this machine, under
    torchrun (--backend torch) or msrun (--backend mindspore, ``dualtune.msrun``)."""
    import subprocess

    argv = [
        a
        for i, a in enumerate(args.argv)
        if not (a == "--nproc" or a.startswith("--nproc=") or (i and args.argv[i - 1] == "--nproc"))
    ]
    if args.backend == "mindspore":
        from dualtune import msrun

        return msrun.launch(args.nproc, argv, log, out)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "dualtune.cli",
        *argv,
    ]
    log.info("data parallel on %d processes: %s", args.nproc, " ".join(cmd[1:]))
    import signal

    child = subprocess.Popen(cmd)
    received: list[int] = []

    def forward(signum, frame):  # torchrun stops its processes; they checkpoint (process 0 says where)
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else code


def _cmd_tiny(args) -> int:
    from dualtune import synthetic
    from dualtune.backend import get_backend

    texts = [r["sentence"] for r in synthetic.generate()] + synthetic.LABEL_NAMES
    get_backend(args.backend, args.device).save_tiny_model(args.kind, args.out_dir, texts, args.seed)
    log.info("tiny %s written to %s", args.kind, args.out_dir)
    return 0


def _cmd_eval(args) -> int:
    from dualtune.backend import get_backend
    from dualtune.metrics import format_classification_report
    from dualtune.runner import check_finished, evaluate_run

    check_finished(args.run_dir, args.checkpoint)  # before loading a framework
    _check_saved(args.run_dir, args.checkpoint)
    backend = get_backend(args.backend, args.device)
    out, evaluation = evaluate_run(args.run_dir, backend, args.checkpoint)
    for k, v in evaluation.metrics.items():
        print(f"{k}: {v:.6g}")
    print()
    print(format_classification_report(evaluation.report))
    log.info("written to %s/", out)
    return 0


def _cmd_predict(args) -> int:
    import json

    from dualtune.backend import get_backend
    from dualtune.predict import predict, read_texts
    from dualtune.runner import check_finished

    check_finished(args.run_dir)  # before loading a framework: bad input fails at once
    texts = read_texts(args.texts, args.file)
    if args.batch_size is not None and args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: expected 1 or more")
    _check_saved(args.run_dir)
    for row in predict(args.run_dir, texts, get_backend(args.backend, args.device), args.batch_size):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _check_saved(run_dir: str, checkpoint: str | None = None) -> None:
    """The adapter (or checkpoint) files are whole and fit the run's model: one line, not a traceback."""
    from dualtune.recipe import load_recipe
    from dualtune.validate import check_adapter, safetensors_header

    if checkpoint is not None:
        safetensors_header(Path(checkpoint) / "trainable.safetensors")
        return
    check_adapter(run_dir, load_recipe(Path(run_dir) / "recipe.yaml"))


def _cmd_validate(args) -> int:
    from dualtune.recipe import load_recipe
    from dualtune.validate import validate

    plan = validate(
        load_recipe(args.recipe, args.overrides), args.backend, args.device, args.output_dir, args.overwrite
    )
    print("\n".join(plan.lines()))
    return 0


def _cmd_report(args) -> int:
    from dualtune.report import report

    print(report(args.run_dirs, args.format))
    if args.plot:
        from dualtune.report import plot_curves

        log.info("plot: %s", plot_curves(args.run_dirs, args.plot))
    return 0


def _cmd_compare(args) -> int:
    from dualtune.compare import compare, format_report

    out = Path(args.out or f"runs/compare-{Path(args.recipe).stem}")
    try:
        report = compare(args.recipe, args.overrides, out, steps=args.steps, layers=args.layers)
    except RuntimeError as err:
        print(f"dualtune: error: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"report: {out / 'report.txt'}  plot: {out / 'loss_curves.png'}")
    return 0 if report["passed"] else 1


def _cmd_sweep(args) -> int:
    from dualtune.sweep import make_sweep, sweep, work

    sw = make_sweep(
        args.recipe,
        args.overrides,
        args.space,
        args.trials,
        args.backend,
        args.device,
        args.storage,
        args.out,
        args.seed,
    )
    if args.worker is not None:
        return work(sw, args.worker)
    return sweep(sw, args.jobs)


def _cmd_synthetic(args) -> int:
    from dualtune import synthetic
    from dualtune.data import write_jsonl

    write_jsonl(synthetic.generate(args.rows, args.seed), Path(args.out))
    log.info("%d synthetic rows written to %s", args.rows, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run R --backend ms a=1`): collect the strays.
    args, extra = parser.parse_known_args(argv)
    # The rest are overrides, checked like the others (`justtext` gets the one-line override error).
    stray = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra
    # `--resume train.epochs=7`: an override, not a run directory (--resume takes an optional value).
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        args.overrides.append(resume)
        args.resume = True
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    commands = {
        "run": _cmd_run,
        "eval": _cmd_eval,
        "predict": _cmd_predict,
        "report": _cmd_report,
        "compare": _cmd_compare,
        "tiny": _cmd_tiny,
        "synthetic-data": _cmd_synthetic,
        "validate": _cmd_validate,
    }
    commands["sweep"] = _cmd_sweep
    try:
        return commands[args.command](args)
    except UserError as err:
        print(f"dualtune: error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        where = f"; checkpoint {stop.checkpoint}" if stop.checkpoint else ""
        print(f"dualtune: {stop}{where}; continue with the same command and --resume", file=sys.stderr)
        return 128 + stop.signum
    except OSError as err:  # the output's file system: read-only, full, no permission
        if err.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES):
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"dualtune: error: {where}{err.strerror or os.strerror(err.errno)}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the loop's "loss is nan at step N; lower optim.lr ..."
        print(f"dualtune: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dualtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
