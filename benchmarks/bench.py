#!/usr/bin/env python
"""Benchmark one recipe on one backend against the plain Hugging Face way of doing the same thing.

    .venv/bin/python benchmarks/bench.py recipes/t5_prefix.yaml --backend torch --steps 10 --eval-batches 2
    .venv/bin/python benchmarks/bench.py recipes/t5_prefix.yaml --backend mindspore --out bench-ms.json

Two sides, each in a child process of its own (so peak RSS is per side, and mindnlp never shares a
process with real torch), on the same model weights, data, batch size and sequence lengths:

* ``dualtune`` (``sides/dualtune_side.py``): ``dualtune.prepare.prepare`` + ``dualtune.trainer.train``,
  the real loop timed through a loop callback, then ``backend.generate`` / ``eval_batch`` over N eval
  batches.
* ``reference``: on torch, ``transformers`` (Seq2Seq)``Trainer`` + ``peft`` (``sides/reference_torch.py``);
  on mindspore, a plain mindnlp loop (``sides/reference_mindspore.py``); both from the notebooks'
  pieces in ``sides/hf_reference.py``, then the plain generate loop. With ``--against torch`` (and
  ``--backend mindspore``) the reference side is dualtune itself on the torch backend; with
  ``--against fp32`` (and ``train.precision=bf16`` or ``fp16``) it is dualtune on the same backend
  in fp32: mixed precision against full precision, side by side. With ``--against nproc1 --nproc N``
  (torch) the dualtune side is data parallel, N processes under torchrun with batch B/N and T/N
  threads each, against dualtune on 1 process with batch B and T threads: the same rows per step.

Only the steps after one warm-up step are timed (each side syncs on the loss every step); eval
times N batches after one warm-up batch. Reported per side: steps/s, tokens/s (non-pad input
tokens + label tokens of the timed steps, per second), eval samples/s, peak RSS (``ru_maxrss`` of
the child), and the ratios dualtune / reference. A table goes to stdout, everything to ``--out``.

Models: ``--model t5-small-config`` (default for seq2seq recipes whose model is not on this disk)
writes, once per run, a T5 built from t5-small's public config.json with random weights, paired
with dualtune's word-level tokenizer over the synthetic data; ``minilm-config`` does the same with
all-MiniLM-L6-v2's config, ``smollm2-config`` with SmolLM2-135M's (Llama); ``tiny`` uses dualtune's tiny config; ``recipe`` keeps the recipe's own
model; anything else is a model directory. The model is written by real torch in a child process,
so both sides and both backends load identical weights. Data defaults to ``data.source=synthetic``
and ``data.padding=max_length`` (every batch is batch_size x max_length); ``k=v`` overrides after
the recipe take precedence.

This file is the command line and the parent's orchestration; beside it: ``common.py`` (what the
parent and the sides share), ``processes.py`` (child processes, the machine's CPU), ``models.py``
(--model), ``report.py`` (medians, ratios, table) and ``sides/`` (the child processes' work). When run
as a script, this directory is on ``sys.path``: the modules import one another by their plain names.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from common import WARMUP_EVAL_BATCHES, WARMUP_STEPS, BenchError
from models import make_model, resolve_model
from processes import BUSY_RETRIES, BUSY_SHARE, child_env, spawn, wait_quiet
from report import MEDIAN_FIELDS, METRICS, NPROC_METRICS, format_table, machine, ratios, summarize, versions
from sides import run_child

# The bench's defaults, before the user's overrides: synthetic data (the word-level tokenizer's
# vocabulary), every batch padded to max_length.
DATA_DEFAULTS = ["data.source=synthetic", "data.padding=max_length"]
AGAINST = {
    "reference": "plain HF reference",
    "torch": "dualtune on torch",
    "fp32": "dualtune in fp32",
    "nproc1": "dualtune on 1 process",
}


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark a recipe's training and evaluation on one backend against "
        "the plain HF reference (Trainer + peft on torch; a plain mindnlp loop on MindSpore).",
        epilog="overrides are recipe key=value pairs (after the bench's data.source=synthetic, "
        "data.padding=max_length defaults); --model wins over model.name_or_path",
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--backend", choices=["torch", "mindspore"], default="torch")
    p.add_argument(
        "--device",
        default="cpu",
        help="torch: cpu | cuda, for both sides (each side's peak GPU memory is reported); mindspore: cpu",
    )
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 1 warm-up step)")
    p.add_argument("--eval-batches", type=int, default=2, help="timed eval batches (after 1 warm-up batch)")
    p.add_argument(
        "--model",
        default="auto",
        help="t5-small-config | minilm-config | smollm2-config | tiny | recipe | PATH | auto (default: the "
        "recipe's model if it is on this disk, else t5-small-config / minilm-config)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="intra-op threads for both sides (torch.set_num_threads, OMP_NUM_THREADS)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each side this many times, alternating; the medians are reported (default 1)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each side, wait up to SECONDS for other processes to use < 10 %% of the "
        "cores, and run a side again (twice at most) if they used more while it ran",
    )
    p.add_argument(
        "--reference",
        nargs="+",
        default=[],
        metavar="key=value",
        help="overrides for the reference side only, e.g. data.padding=max_length (the "
        "notebooks' way) against dualtune's data.padding=longest train.group_by_length=true",
    )
    p.add_argument(
        "--against",
        choices=list(AGAINST),
        default="reference",
        help="what the reference side runs: the plain HF reference (default); with "
        "--backend mindspore, dualtune on the torch backend (ratios are then MindSpore / torch); "
        "fp32: dualtune in fp32 against the recipe's train.precision (e.g. train.precision=bf16); "
        "nproc1: dualtune on 1 process against --nproc N processes",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="with --against nproc1 (torch): the dualtune side runs data parallel on N processes "
        "(torchrun), each with train.batch_size / N and --threads / N threads",
    )
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--only", choices=["dualtune", "reference"], help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    # Overrides may also come after the options (`bench.py R --backend torch a=1`), as with dualtune.
    args, extra = parser.parse_known_args(argv)
    if any(e.startswith("-") for e in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra
    return args


def usage_error(args: argparse.Namespace) -> str | None:
    if min(args.steps, args.eval_batches, args.threads, args.repeat, args.nproc) < 1:
        return "--steps, --eval-batches, --threads, --repeat and --nproc must be >= 1"
    if args.device != "cpu" and (args.backend != "torch" or not args.device.startswith("cuda")):
        return "--device: the bench runs torch on cpu or cuda, mindspore on cpu"
    if args.against == "torch" and args.backend != "mindspore":
        return "--against torch compares the mindspore backend with torch; add --backend mindspore"
    if (args.nproc > 1) != (args.against == "nproc1"):
        return "--against nproc1 and --nproc N (N >= 2) go together: N processes against 1"
    if args.nproc > 1 and args.backend != "torch":
        return "--nproc: the bench runs data parallel on torch (torchrun) only; msrun is not wired in"
    if args.nproc > 1 and (args.threads % args.nproc or args.device != "cpu"):
        return f"--nproc {args.nproc} shares --threads on cpu: --threads {args.threads} is not a multiple"
    return None


def set_up(args: argparse.Namespace, work: Path, env: dict) -> tuple[object, dict, dict]:
    """The recipe, the children's config (written to ``work``) and the model, made if need be."""
    from dualtune.backend import check_precision
    from dualtune.recipe import RecipeError, load_recipe

    overrides = DATA_DEFAULTS + list(args.overrides)
    recipe = load_recipe(args.recipe, overrides)
    check_precision(args.backend, "cpu", recipe.train.precision)  # MindSpore: fp32 only, said now
    if args.against == "fp32":
        if recipe.train.precision == "fp32":
            raise RecipeError(
                "train.precision fp32: --against fp32 compares mixed precision with fp32; "
                "add train.precision=bf16 or fp16"
            )
        args.reference = [*args.reference, "train.precision=fp32"]
    own = []  # the dualtune side's own overrides: --nproc N takes B/N rows per process
    if args.nproc > 1:
        batch = recipe.train.batch_size
        if batch % args.nproc:
            raise RecipeError(
                f"train.batch_size {batch}: --nproc {args.nproc} needs a multiple of {args.nproc} "
                "(each process takes batch_size / nproc rows of the step)"
            )
        own = [
            f"train.batch_size={batch // args.nproc}",
            f"train.eval_batch_size={recipe.train.eval_batch_size or batch}",
        ]
    kind, model_dir, model_info = resolve_model(args.model, recipe, work, env, say)
    overrides.append(f"model.name_or_path={model_dir}")
    recipe = load_recipe(args.recipe, overrides)
    load_recipe(args.recipe, overrides + list(args.reference))  # bad reference overrides: fail now
    load_recipe(args.recipe, overrides + own)
    cfg = {
        "recipe": str(Path(args.recipe).resolve()),
        "overrides": overrides,
        "reference_overrides": list(args.reference),
        "dualtune_overrides": own,
        "nproc": args.nproc,
        "backend": args.backend,
        "device": args.device,
        "steps": args.steps,
        "eval_batches": args.eval_batches,
        "threads": args.threads,
        "model_dir": model_dir,
        "against": args.against,
    }
    (work / "config.json").write_text(json.dumps(cfg))
    return recipe, cfg, {"choice": args.model, "kind": kind, "path": model_dir, **model_info}


def run_side(side: str, rep: int, args: argparse.Namespace, work: Path, env: dict) -> dict:
    """One run of one side in its child; with --wait-quiet, run again while the machine was busy."""
    discarded = []
    while True:
        usage: dict = {}
        if args.wait_quiet:
            usage["other_cpu_share_before"] = wait_quiet(args.wait_quiet, say)
        result = work / f"{side}-{rep}.json"
        nproc = args.nproc if side == "dualtune" else 1
        spawn(
            ["--child", side, str(work / "config.json"), str(result)],
            {
                **env,
                "OMP_NUM_THREADS": str(args.threads // nproc),
                "MKL_NUM_THREADS": str(args.threads // nproc),
            },
            work / f"{side}-{rep}.log",
            side,
            usage,
            nproc,
        )
        got = {**json.loads(result.read_text()), **usage}
        if args.nproc > 1:  # each process's peak RSS (the others wrote theirs beside process 0's result)
            rss = [got["peak_rss_mb"]]
            rss += [json.loads(Path(f"{result}.rank{r}").read_text())["peak_rss_mb"] for r in range(1, nproc)]
            got.update(peak_rss_mb_per_process=rss, peak_rss_mb=max(rss), peak_rss_mb_summed=sum(rss))
        share = usage.get("other_cpu_share")
        say(
            f"{side} done in {usage['child_wall_seconds']:.1f} s: {got['steps_per_s']:.4g} steps/s"
            + (
                f", other processes used {100 * share:.0f} % of the cores meanwhile"
                if share is not None
                else ""
            )
        )
        if not args.wait_quiet or share is None or share < BUSY_SHARE or len(discarded) >= BUSY_RETRIES:
            return {**got, "discarded_busy_runs": discarded}
        say(f"discarding that {side} run (the machine was busy); running it again")
        discarded.append({k: got[k] for k in MEDIAN_FIELDS if k in got})


def run_sides(args: argparse.Namespace, work: Path, env: dict) -> dict[str, dict]:
    """Each side (or --only one), --repeat times, alternating; a side's runs summarized."""
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeat):
        for side in ("dualtune", "reference"):
            if args.only and side != args.only:
                continue
            say(
                f"{side} on {args.backend}: {args.steps} timed steps + {WARMUP_STEPS} warm-up, "
                f"{args.eval_batches} eval batches"
                + (f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else "")
                + " ..."
            )
            runs.setdefault(side, []).append(run_side(side, rep, args, work, env))
    return {side: summarize(results) for side, results in runs.items()}


def build_report(args, argv: list[str], recipe, cfg: dict, model: dict, sides: dict, loads: tuple) -> dict:
    report = {
        "recipe": Path(args.recipe).stem,
        "recipe_path": str(args.recipe),
        "backend": args.backend,
        "device": args.device,
        "against": AGAINST[args.against],
        "precision": recipe.train.precision,
        "command": shlex.join([".venv/bin/python", "benchmarks/bench.py", *argv]),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": model,
        "overrides": cfg["overrides"],
        "reference_overrides": list(args.reference),
        "method": recipe.peft.method,
        "task": recipe.model.task,
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "eval_batches": args.eval_batches,
        "warmup_eval_batches": WARMUP_EVAL_BATCHES,
        "batch_size": recipe.train.batch_size,
        "eval_batch_size": recipe.train.eval_batch_size or recipe.train.batch_size,
        "max_length": recipe.data.max_length,
        "label_max_length": recipe.data.label_max_length,
        "padding": recipe.data.padding,
        "threads": args.threads,
        "nproc": args.nproc,
        "repeat": args.repeat,
        "machine": machine(*loads),
        "versions": versions(args.backend),
        **sides,
    }
    if len(sides) == 2:
        report["ratios"] = ratios(sides, NPROC_METRICS if args.nproc > 1 else METRICS)
    return report


def print_summary(report: dict, model_kind: str, loads: tuple) -> None:
    """The run in one line, the table, and how busy the machine was (both sides ran)."""
    print(
        f"{report['recipe']} on {report['backend']} ({report['device']}) against the {report['against']}: model {model_kind}, batch "
        f"{report['batch_size']} x {report['max_length']} ({report['padding']}), {report['steps']} steps, "
        f"{report['eval_batches']} eval batches, {report['threads']} threads"
        + (f" ({report['nproc']} processes against 1)" if report["nproc"] > 1 else "")
        + ", "
        f"load {loads[0][0]:.2f} -> {loads[1][0]:.2f}"
    )
    print(format_table(report))
    for side in ("dualtune", "reference"):
        got = report[side]
        if got.get("compile_seconds_total"):
            print(
                f"{side}: {got['compile_seconds_total']:.1f} s compiling graphs in all, "
                f"{got['compile_seconds']:.1f} s of it in the timed steps, {got['eval_compile_seconds']:.1f} s "
                'in the timed eval ("compiled" rows: the timed steps that compiled nothing; eval: a second pass)'
            )
    shares = [report[s].get("other_cpu_share") for s in ("dualtune", "reference")]
    if None not in shares:
        print(
            f"other processes used {100 * shares[0]:.0f} % / {100 * shares[1]:.0f} % of the cores "
            f"while dualtune / reference ran" + (" (median of runs)" if report["repeat"] > 1 else "")
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return run_child(*argv[1:4])
    if argv[:1] == ["--make-model"]:
        make_model(argv[1], argv[2])
        return 0
    args = parse_args(argv)
    error = usage_error(args)
    if error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    from dualtune.errors import UserError

    work = Path(tempfile.mkdtemp(prefix="dualtune-bench-"))
    env = child_env(args.threads)
    ok = False
    try:
        recipe, cfg, model = set_up(args, work, env)
        load_before = os.getloadavg()
        sides = run_sides(args, work, env)
        loads = (load_before, os.getloadavg())
        report = build_report(args, argv, recipe, cfg, model, sides, loads)
        if "ratios" in report:
            print_summary(report, model["kind"], loads)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            say(f"report: {args.out}")
        ok = True
        return 0
    except (BenchError, UserError) as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 1
    finally:
        if ok or not any(work.glob("*.log")):
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work} (logs of the failed run)")


if __name__ == "__main__":
    sys.exit(main())
