"""The offline demo: recipes/minilm_demo.yaml (a real pretrained MiniLM-L6 shipped on PyPI, the
synthetic financial-sentiment data) learns on torch with LoRA, prefix tuning and full fine-tuning,
clearly beyond always answering the majority class. The MindSpore suite runs the same three."""

from __future__ import annotations

import json

import pytest

from dualtune import synthetic
from helpers import DEMO_METHODS, dualtune_cli
from torch_helpers import RECIPES, run_cli_parallel


@pytest.mark.slow
def test_minilm_demo_methods_beat_majority_class(tmp_path):
    jobs = {
        name: [
            "run",
            str(RECIPES / "minilm_demo.yaml"),
            "--backend",
            "torch",
            *overrides,
            "--output-dir",
            str(tmp_path / name),
            "--no-progress",
        ]
        for name, overrides in DEMO_METHODS.items()
    }
    procs = run_cli_parallel(jobs)
    finals = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, proc.stderr[-4000:]
        finals[name] = json.loads((tmp_path / name / "final_metrics.json").read_text())
    for name, final in finals.items():
        assert final["steps"] == 3 * 480 // 16  # 600 rows, 120 held out, batch 16, 3 epochs
        assert final["accuracy"] >= final["majority_class_accuracy"] + 0.15, (name, final)
        assert final["last_loss"] < final["first_loss"], name
    # The recipe as shipped predicts every class, not only the majority ones (macro F1 was 0.59 on q, v).
    assert finals["lora"]["f1_macro"] >= 0.85, finals["lora"]
    assert finals["lora"]["trainable_parameters"] < 0.02 * finals["lora"]["total_parameters"]  # LoRA + head
    assert finals["full"]["trainable_parameters"] == finals["full"]["total_parameters"]


@pytest.mark.slow
def test_minilm_fpb_recipe_runs_on_a_file_in_the_phrasebank_format(tmp_path):
    """recipes/minilm_fpb.yaml as shipped, with data.source pointing at a Sentences_AllAgree.txt-style
    file (``sentence@label``, latin-1, as FinancialPhraseBank-v1.0 has it) of generated sentences: the
    real data is never in the repository. The measured numbers on the real file are in BENCHMARKS.md."""
    rows = synthetic.generate(rows=400, seed=3)
    source = tmp_path / "Sentences_AllAgree.txt"
    lines = [f"{row['sentence']} (ré)@{row['label']}" for row in rows]  # é: latin-1, not UTF-8
    source.write_bytes("\r\n".join(lines).encode("latin-1"))
    out = tmp_path / "run"
    proc = dualtune_cli(
        "run",
        str(RECIPES / "minilm_fpb.yaml"),
        f"data.source={source}",
        "train.epochs=2",
        "--output-dir",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["steps"] == 2 * -(-360 // 16)  # 400 rows, 90/10 split, batch 16, 2 epochs
    # 46 steps on made-up sentences: the loss falls (the accuracy bar is met on the real file, BENCHMARKS.md).
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("split") != "eval"]
    evals = [r["eval_loss"] for r in records if r.get("split") == "eval"]
    assert len(losses) == final["steps"] and len(evals) == 2
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.15, losses  # measured 1.13 -> 0.86
    assert evals[1] < evals[0], evals  # measured 1.19 -> 1.04
    first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert first["text"].endswith("(ré)")  # decoded as latin-1, not mangled
