"""``dualtune sweep --backend mindspore``: two trials, each a MindSpore run in a process of its own,
complete; the sweep process itself loads no framework."""

from __future__ import annotations

import os

import pytest

from helpers import RECIPES, dualtune_cli

optuna = pytest.importorskip("optuna")

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GLOG_v": "3",
    "HF_HUB_OFFLINE": "1",
}


def test_two_trial_sweep_on_mindspore(tiny_bert, fin_data, tmp_path):
    out = tmp_path / "sweep"
    proc = dualtune_cli(
        "sweep",
        str(RECIPES / "minilm_demo.yaml"),
        "--space",
        str(RECIPES / "spaces" / "lora_seed001.yaml"),
        "--trials",
        "2",
        "--out",
        str(out),
        "--backend",
        "mindspore",
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "train.max_steps=2",
        "train.eval_every=1",
        env=ENV,
    )
    trials = optuna.load_study(
        study_name="minilm_demo", storage=f"sqlite:///{out / 'optuna.db'}"
    ).get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2]  # the in-loop evaluations reached the pruner
        assert '"backend": "mindspore"' in (out / f"trial-00{t.number}" / "final_metrics.json").read_text()
    assert "--backend mindspore" in proc.stdout and (out / "best_recipe.yaml").is_file()


def test_optuna_leaves_torch_to_mindtorch(ms):
    """optuna (imported above, before MindSpore was activated) and its plotting and importance
    modules load no real torch: in this process `torch` is mindtorch."""
    import sys

    import optuna.importance
    import optuna.visualization.matplotlib  # noqa: F401

    assert "mindtorch" in sys.modules["torch"].__file__
