"""Arguments and checks more than one command shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from dualtune.backend import backend_names, default_backend, frameworks


def backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=backend_names(),
        default=default_backend(),
        help=f"framework to run on (default: $DUALTUNE_BACKEND or {frameworks()[0].name})",
    )
    devices = "; ".join(f"{f.name}: {f.device_help}" for f in frameworks())
    p.add_argument("--device", default="cpu", help=f"{devices} (default: cpu)")


def recipe_args(
    p: argparse.ArgumentParser, overrides_help: str = "recipe overrides, e.g. optim.lr=3e-4"
) -> None:
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def check_saved(run_dir: str, checkpoint: str | None = None) -> None:
    """The adapter (or checkpoint) files are whole and fit the run's model: one line, not a traceback."""
    from dualtune.recipe import load_recipe
    from dualtune.validate import check_adapter, safetensors_header

    if checkpoint is not None:
        safetensors_header(Path(checkpoint) / "trainable.safetensors")
        return
    check_adapter(run_dir, load_recipe(Path(run_dir) / "recipe.yaml"))
