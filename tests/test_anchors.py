"""Published numbers beside a run (``dualtune report --anchors``) and the two-class ``f1``."""

from __future__ import annotations

import json

import pytest
import yaml

from dualtune.anchors import ANCHORS, DATASETS, dataset_of
from dualtune.report import anchor_report
from helpers import dualtune_cli


def fake_run(path, source, final, n_eval, config=None):
    """The files report reads, as a finished run writes them."""
    path.mkdir(parents=True)
    recipe = {"model": {"task": "classification"}, "peft": {"method": "lora"}, "data": {"source": source}}
    if config:
        recipe["data"]["config"] = config
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (path / "final_metrics.json").write_text(json.dumps({"backend": "torch", "accuracy": 0.5, **final}))
    (path / "trainable.json").write_text(json.dumps({"trainable": 10, "total": 100}))
    (path / "classification_report.json").write_text(json.dumps({"n": n_eval}))
    return path


@pytest.mark.parametrize(
    "data, key",
    [
        (
            {"source": "financial_phrasebank", "config": "sentences_allagree"},
            "financial_phrasebank/sentences_allagree",
        ),
        ({"source": "/d/Sentences_50Agree.txt"}, "financial_phrasebank/sentences_50agree"),
        (
            {"source": "/d/FinancialPhraseBank-v1.0.zip", "config": "sentences_allagree"},
            "financial_phrasebank/sentences_allagree",
        ),
        ({"source": "mehdiiraqui/twitter_disaster"}, "disaster_tweets"),
        ({"source": "/data/disaster/train.csv"}, "disaster_tweets"),
        ({"source": "synthetic"}, None),
    ],
)
def test_dataset_of(data, key):
    assert dataset_of(data) == key


def test_every_anchor_names_a_known_data_set():
    assert {a.dataset for a in ANCHORS} == set(DATASETS)


def test_report_sets_runs_beside_the_published_numbers(tmp_path):
    a = fake_run(tmp_path / "mpnet", "/data/disaster/train.csv", {"f1": 0.79, "f1_macro": 0.81}, 1523)
    b = fake_run(tmp_path / "smol", "/data/disaster/train.csv", {"f1": 0.71}, 1523)
    text = anchor_report([a, b])
    lines = text.splitlines()
    assert lines[0] == f"published numbers: {DATASETS['disaster_tweets']}"
    assert lines[1].endswith("published  mpnet (1523 eval rows)  smol (1523 eval rows)")
    roberta = next(line for line in lines if "roberta-large" in line)
    assert roberta.split()[-3:] == ["0.8077", "0.7900", "0.7100"]
    assert len(lines) == 2 + 3  # title, header, the blog's three models
    csv = anchor_report([a], fmt="csv").splitlines()
    assert csv[0] == "source,model,method,protocol,metric,published,mpnet (1523 eval rows)"
    assert len(csv) == 4


def test_report_anchors_cli(tmp_path):
    run = fake_run(
        tmp_path / "t5", "financial_phrasebank", {"f1_macro": 0.9}, 227, config="sentences_allagree"
    )
    proc = dualtune_cli("report", str(run), "--anchors")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("FinBERT")]
    assert [r.split()[-1] for r in rows] == ["0.5000", "0.9000"]  # accuracy, f1_macro of the run
    proc = dualtune_cli("report", str(run), "--anchors", "imdb", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dualtune: error: --anchors imdb: no published numbers for it; known: {', '.join(DATASETS)}"
    )
    other = fake_run(tmp_path / "syn", "synthetic", {}, 20)
    proc = dualtune_cli("report", str(other), "--anchors", check=False)
    assert proc.returncode == 2
    assert "no run reads a data set with published numbers" in proc.stderr.strip().splitlines()[-1]


def test_two_classes_report_the_positive_class_f1(tiny_bert, tmp_path):
    """final metrics' ``f1`` is scikit-learn's binary F1 of the second label (evaluate's "f1"); three
    classes have none."""
    from sklearn.metrics import f1_score

    from dualtune import synthetic
    from dualtune.data import write_jsonl
    from dualtune.evaluation import evaluate
    from helpers import prepared
    from torch_helpers import torch_backend

    rows = [r for r in synthetic.generate(rows=150, seed=1) if r["label"] != "neutral"]
    write_jsonl(rows, tmp_path / "two.jsonl")
    backend = torch_backend()
    prep = prepared(
        backend,
        "minilm_demo.yaml",
        f"model.name_or_path={tiny_bert}",
        f"data.source={tmp_path / 'two.jsonl'}",
        "data.max_rows=null",
        "data.label_names=[negative,positive]",
    )
    result = evaluate(backend, prep)
    gold = [p["label"] for p in result.predictions]
    pred = [p["pred"] for p in result.predictions]
    assert result.metrics["f1"] == pytest.approx(f1_score(gold, pred, pos_label="positive"), abs=1e-12)
    assert result.metrics["f1"] != pytest.approx(result.metrics["f1_macro"])
