"""dualtune as a library installs it: a wheel built from the tree goes into a fresh venv, without the
checkout, and trains 3 steps on each backend; pyproject.toml states ranges, ci/constraints.txt the
exact set CI runs, and every pin lies in its range."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import dualtune.backends
from helpers import REPO

TIMEOUT = 300  # seconds per command: a hang fails the test instead of holding CI


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    return [Requirement(r) for r in project["dependencies"] + [r for extra in extras for r in extra]]


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "ci" / "constraints.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if spec:
            name, version = spec.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_pyproject_states_ranges_and_every_ci_pin_lies_in_its_range():
    reqs = requirements()
    exact = [str(r) for r in reqs if any(s.operator in ("==", "===") for s in r.specifier)]
    assert exact == [], f"exact pins belong in ci/constraints.txt: {exact}"
    pinned = pins()
    outside = [
        f"{r} vs {pinned[r.name.lower()]}"
        for r in reqs
        if r.name.lower() in pinned and not r.specifier.contains(pinned[r.name.lower()], prereleases=True)
    ]
    assert outside == [], outside
    # The pins CI depends on most are there.
    assert {"torch", "mindspore", "mindnlp", "transformers", "peft", "numpy", "mkdocs"} <= pinned.keys()


def test_the_checkout_imports_its_own_backends():
    """An editable install of a copy or worktree, or a run from its root, imports its own backends."""
    assert Path(dualtune.backends.__file__).resolve().is_relative_to(REPO)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import dualtune.backends; print(dualtune.backends.__file__)"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert Path(proc.stdout.strip()).resolve().is_relative_to(REPO), proc.stdout


def run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, f"{' '.join(map(str, args))} -> {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


TINY_RECIPE = """\
model:
  name_or_path: {model}
  task: classification
data:
  source: synthetic
  label_names: [negative, neutral, positive]
  max_rows: 100
  train_split: 0.8
  max_length: 32
peft:
  method: lora
  lora: {{r: 4, alpha: 8, target_modules: [query, value]}}
optim:
  lr: 1.0e-3
train:
  epochs: 1
  batch_size: 8
  seed: 0
"""


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_on_both_backends(tmp_path):
    # Build from a copy of the sources, so nothing (build/, *.egg-info) is written into the checkout;
    # without isolation, which would fetch setuptools from the network.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dualtune", src / "dualtune", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, src], tmp_path, env)
    (wheel,) = dist.glob("dualtune-*.whl")

    # A fresh venv whose dependencies are this environment's (a path line in a .pth file: the 4 GB
    # are not installed again, and this environment's editable dualtune, a .pth of its own there,
    # is not processed), with only the wheel installed into it.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    venv_site = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env
        ).stdout.strip()
    )
    (venv_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        tmp_path,
        env,
    )

    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    where = run(
        [
            python,
            "-c",
            "import dualtune, dualtune.backends; print(dualtune.__file__); print(dualtune.backends.__file__)",
        ],
        work,
        env,
    ).stdout.split()
    for path in map(Path, where):
        assert path.resolve().is_relative_to(venv_site.resolve()), where
        assert not path.resolve().is_relative_to(REPO), where

    env.update(HF_HUB_OFFLINE="1", GLOG_v="3", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    dualtune_bin = venv / "bin" / "dualtune"
    assert dualtune_bin.read_text().startswith(f"#!{python}")  # the installed script, the venv's python
    run([dualtune_bin, "tiny", "bert", "tiny-bert", "--backend", "torch"], work, env)
    assert (work / "tiny-bert" / "config.json").is_file()
    recipe = work / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(model=work / "tiny-bert"))
    for backend in ("torch", "mindspore"):
        out = work / f"run-{backend}"
        proc = run(
            [
                dualtune_bin,
                "run",
                recipe,
                "--backend",
                backend,
                "train.max_steps=3",
                "--output-dir",
                out,
                "--no-progress",
            ],
            work,
            env,
        )
        final = json.loads((out / "final_metrics.json").read_text())
        assert final["steps"] == 3, (backend, final)
        assert f"dualtune: recipe tiny on {backend} (cpu) -> {out}" in proc.stderr.splitlines(), proc.stderr[
            :800
        ]
