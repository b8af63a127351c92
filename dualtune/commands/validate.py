"""``dualtune validate RECIPE``: every check that needs no framework and no weights, and the plan."""

from __future__ import annotations

import argparse

from dualtune.commands.common import backend_args, recipe_args

NAME = "validate"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    val = sub.add_parser(
        NAME,
        help="check a recipe, its data and its output without training",
        description="Check everything about RECIPE that needs no framework and no model "
        "weights (recipe, data, labels, lengths against config.json, label words, "
        "output location, device) and print the plan: rows and classes per split, "
        "steps, evaluation points, token lengths, warnings. Exit 0 or 2. "
        "dualtune run makes the same checks first.",
    )
    recipe_args(val)
    backend_args(val)
    val.add_argument("--output-dir", help="run directory (overrides train.output_dir)")
    val.add_argument(
        "--overwrite", action="store_true", help="as for run: a finished run there may be replaced"
    )
    return val


def main(args: argparse.Namespace) -> int:
    from dualtune.recipe import load_recipe
    from dualtune.validate import validate

    plan = validate(
        load_recipe(args.recipe, args.overrides), args.backend, args.device, args.output_dir, args.overwrite
    )
    print("\n".join(plan.lines()))
    return 0
