"""``dualtune sweep RECIPE --space SPACE.yaml --trials N``: hyperparameter search with Optuna."""

from __future__ import annotations

import argparse

from dualtune.commands.common import backend_args, recipe_args

NAME = "sweep"

EPILOG = """\
  dualtune sweep recipes/minilm_demo.yaml --space recipes/spaces/lora_seed001.yaml --trials 20

OUT (default runs/sweep-{recipe}) receives trial-NNN/ (each trial's run directory), trial-NNN.log,
optuna.db (the study), trials.txt and trials.csv, best_recipe.yaml (the recipe with the best
parameters, for `dualtune run`), history.png and importances.png. The same command continues an
interrupted sweep: finished trials count toward --trials, and a trial whose sweep was stopped runs
again under its number (from its checkpoint). --jobs J runs J worker processes on the storage."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    swp = sub.add_parser(
        NAME,
        help="search hyperparameters with Optuna, one run per trial",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search the recipe keys SPACE.yaml names (categorical, int, float, log "
        "distributions; metric and direction) with Optuna's seeded TPE sampler and "
        "median pruner. Each trial is a `dualtune run` in a process of its own, in "
        "OUT/trial-NNN; its evaluations feed the pruner as they are written.",
        epilog=EPILOG,
    )
    recipe_args(swp, "recipe overrides for every trial")
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
    backend_args(swp)
    swp.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage URL (default: sqlite:///OUT/optuna.db); the study is named after the recipe",
    )
    swp.add_argument("--jobs", type=int, default=1, metavar="J", help="worker processes sharing the storage")
    swp.add_argument("--out", metavar="DIR", help="sweep directory (default: runs/sweep-{recipe})")
    swp.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
    swp.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one of --jobs's processes
    return swp


def main(args: argparse.Namespace) -> int:
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
