"""Helpers for the PyTorch-side tests (the MindSpore suite has its own process and helpers)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import RECIPES, REPO  # noqa: F401  (re-exported)

# The machine has 2 cores and other work runs beside the tests: with more than one OpenMP thread per
# process, torch's small matmuls spin-wait on each other (a 69-step tiny-T5 run took 48 s instead of
# 1 s). One thread per process is also what makes several CLI runs side by side worth it.
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torch_backend():
    """The torch backend of this (pytest) process, on one CPU thread."""
    import torch

    from dualtune.backend import get_backend

    torch.set_num_threads(1)
    backend = get_backend("torch")
    backend.precision = "fp32"  # as dualtune.prepare would set it: an earlier test may have left fp16
    return backend


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dualtune.cli", *args]


def run_cli_parallel(jobs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run several ``dualtune`` commands at once (each in its own process, one thread each)."""
    procs = {
        key: subprocess.Popen(
            cli_command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CLI_ENV,
            cwd=REPO,
        )
        for key, args in jobs.items()
    }
    done = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def teacher_forced_strings(tokenizer, logits, labels, pad_id: int) -> list[str]:
    """Argmax of seq2seq logits at the label positions, decoded as dualtune's evaluation does."""
    import numpy as np

    ids = np.where(labels == -100, pad_id, logits.argmax(-1))
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
