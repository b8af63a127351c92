"""The metrics users report: scikit-learn's numbers, checked by hand, the confusion matrix with its
(other) column for seq2seq text that is no label, the PNG, and `dualtune eval` writing both."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from sklearn import metrics as skm

from dualtune import evaluation
from dualtune.metrics import OTHER, classification_report, format_classification_report, save_confusion_png
from torch_helpers import RECIPES, run_cli_parallel

NAMES = ["negative", "neutral", "positive"]
# positive is never predicted; "neutral." is seq2seq text that is no label name
GOLD = ["negative", "negative", "negative", "neutral", "neutral", "positive", "positive", "positive"]
PRED = ["negative", "negative", "neutral", "neutral", "neutral.", "negative", "neutral", "neutral"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
    return classification_report(GOLD, PRED, NAMES)


def test_numbers_are_sklearns(report):
    assert report["accuracy"] == skm.accuracy_score(GOLD, PRED)
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            GOLD, PRED, labels=NAMES, average=avg, zero_division=0
        )
        assert (report[f"precision_{avg}"], report[f"recall_{avg}"], report[f"f1_{avg}"]) == (p, r, f)
        assert report[f"f1_{avg}"] == skm.f1_score(GOLD, PRED, labels=NAMES, average=avg, zero_division=0)
    p, r, f, s = skm.precision_recall_fscore_support(GOLD, PRED, labels=NAMES, zero_division=0)
    for i, name in enumerate(NAMES):
        assert report["per_class"][name] == {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
    # sklearn's own matrix has no (other) column: the same counts, less the misses it cannot place
    assert [row[:3] for row in report["confusion_matrix"]] == skm.confusion_matrix(
        GOLD, PRED, labels=NAMES
    ).tolist()


def test_numbers_by_hand(report):
    assert report["n"] == 8 and report["accuracy"] == 3 / 8
    neg, neu, pos = (report["per_class"][n] for n in NAMES)
    assert neg["precision"] == pytest.approx(2 / 3) and neg["recall"] == pytest.approx(2 / 3)
    assert neu["precision"] == pytest.approx(1 / 4) and neu["recall"] == pytest.approx(
        1 / 2
    )  # "neutral." missed
    assert neu["f1"] == pytest.approx(1 / 3)
    assert pos == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}  # never predicted: 0, no warning
    assert report["f1_macro"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert report["f1_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 3 + 3 * 0) / 8)


def test_confusion_matrix(report):
    assert report["labels"] == NAMES
    assert report["predicted_labels"] == NAMES + [OTHER]
    assert report["confusion_matrix"] == [  # rows gold, columns predicted
        [2, 1, 0, 0],
        [0, 1, 0, 1],
        [1, 2, 0, 0],
    ]
    json.dumps(report)  # plain JSON, no numpy scalars


def test_no_other_column_when_every_prediction_is_a_label():
    r = classification_report(["a", "b", "b"], ["a", "b", "a"], ["a", "b", "c"])
    assert r["predicted_labels"] == ["a", "b", "c"]
    assert r["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_bad_input():
    with pytest.raises(ValueError, match="not in the label names"):
        classification_report(["a", "x"], ["a", "a"], ["a", "b"])
    with pytest.raises(ValueError, match="as many"):
        classification_report(["a"], ["a", "b"], ["a", "b"])


def test_text_table(report):
    text = format_classification_report(report).splitlines()
    assert text[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert text[1].split() == ["negative", "0.6667", "0.6667", "0.6667", "3"]
    assert text[3].split() == ["positive", "0.0000", "0.0000", "0.0000", "3"]
    assert text[4].split()[:2] == ["macro", "avg"]
    i = text.index("confusion matrix (rows: gold, columns: predicted)")
    assert text[i + 1].split() == NAMES + [OTHER]
    assert text[i + 2].split() == ["negative", "2", "1", "0", "0"]


def test_png(report, tmp_path):
    save_confusion_png(report, tmp_path / "sub" / "cm.png")
    data = (tmp_path / "sub" / "cm.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def _prep(task):
    return SimpleNamespace(label_names=NAMES, recipe=SimpleNamespace(model=SimpleNamespace(task=task)))


def test_summary_of_seq2seq_predictions():
    rows = [
        {
            "label": "negative",
            "teacher_forced": "negative",
            "teacher_forced_correct": True,
            "generated": None,
        },
        # decodes to the label, but a token is off ([pad, neutral]): wrong, as teacher_forced_accuracy says
        {"label": "neutral", "teacher_forced": "neutral", "teacher_forced_correct": False, "generated": None},
        {
            "label": "positive",
            "teacher_forced": "negative",
            "teacher_forced_correct": False,
            "generated": None,
        },
    ]
    forced = evaluation.classification_summary(_prep("seq2seq"), rows)
    assert forced["predicted_from"] == "teacher_forced" and forced["accuracy"] == pytest.approx(1 / 3)
    assert forced["confusion_matrix"] == [[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    generated = [{**r, "generated": g} for r, g in zip(rows, ["negative", "neutral", "positive!"])]
    gen = evaluation.classification_summary(_prep("seq2seq"), generated)
    assert gen["predicted_from"] == "generated" and gen["accuracy"] == pytest.approx(2 / 3)
    assert gen["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]


# ---------------------------------------------------------------- dualtune eval writes them


@pytest.mark.slow
def test_eval_writes_report_and_png(tiny_t5, fin_data, tmp_path):
    run = tmp_path / "t5"
    procs = run_cli_parallel(
        {
            "run": [
                "run",
                str(RECIPES / "t5_lora.yaml"),
                "--backend",
                "torch",
                f"model.name_or_path={tiny_t5}",
                f"data.source={fin_data}",
                "train.max_steps=2",
                "train.epochs=1",
                "--output-dir",
                str(run),
                "--no-progress",
            ]
        }
    )
    assert procs["run"].returncode == 0, procs["run"].stderr[-4000:]
    proc = run_cli_parallel({"eval": ["eval", str(run), "--backend", "torch"]})["eval"]
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = run / "eval" / "torch"
    assert (out / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
    written = json.loads((out / "classification_report.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == written["n"] == 20
    assert written["predicted_from"] == "generated"
    assert written == json.loads(
        json.dumps(
            classification_report(
                [p["label"] for p in predictions], [p["generated"] for p in predictions], NAMES
            )
            | {"predicted_from": "generated"}
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exact_match"] == written["accuracy"]  # the same generated text, judged the same
    assert metrics["f1_macro"] == written["f1_macro"] and metrics["f1_weighted"] == written["f1_weighted"]
    assert {"eval_loss", "teacher_forced_accuracy", "majority_class_accuracy"} <= set(metrics)

    lines = proc.stdout.splitlines()
    assert lines[0].startswith("eval_loss: ") and any(item.startswith("f1_macro: ") for item in lines)
    assert lines[lines.index("") + 1].split() == ["class", "precision", "recall", "f1", "support"]
    assert "confusion matrix (rows: gold, columns: predicted)" in lines


def test_a_class_absent_from_the_eval_split_does_not_cap_the_averages():
    r = classification_report(["a", "b", "b"], ["a", "b", "b"], ["a", "b", "c"])
    assert r["absent_labels"] == ["c"] and r["f1_macro"] == 1.0 and r["precision_macro"] == 1.0
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    predicted = classification_report(
        ["a", "b"], ["a", "c"], ["a", "b", "c"]
    )  # predicted, never gold: counted
    assert predicted["absent_labels"] == [] and predicted["f1_macro"] == pytest.approx(1 / 3)
