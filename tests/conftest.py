"""Shared fixtures: tiny models and synthetic data, made here, once per session.

The tiny models are written by the torch backend in a child process, so the MindSpore tests (which
run in a process of their own) load exactly the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dualtune import synthetic
from dualtune.data import write_jsonl
from helpers import RECIPES, REPO, dualtune_cli  # noqa: F401  (re-exported for the tests)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dualtune")


@pytest.fixture(scope="session")
def tiny_t5(workdir) -> str:
    out = workdir / "tiny-t5"
    dualtune_cli("tiny", "t5", str(out), "--backend", "torch")
    return str(out)


@pytest.fixture(scope="session")
def tiny_bert(workdir) -> str:
    out = workdir / "tiny-bert"
    dualtune_cli("tiny", "bert", str(out), "--backend", "torch")
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama(workdir) -> str:
    out = workdir / "tiny-llama"
    dualtune_cli("tiny", "llama", str(out), "--backend", "torch")
    return str(out)


@pytest.fixture(scope="session")
def fin_data(workdir) -> str:
    """200 synthetic financial-sentiment rows as JSONL (sentence, label)."""
    out = workdir / "fin.jsonl"
    write_jsonl(synthetic.generate(rows=200, seed=0), out)
    return str(out)
