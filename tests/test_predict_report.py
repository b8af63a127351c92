"""`dualtune predict` (a run's adapter on new text: the labels the run itself predicted) and
`dualtune report` (runs side by side, from their files alone, without loading a framework)."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dualtune import data as datamap
from dualtune.recipe import load_recipe
from helpers import dualtune_cli
from torch_helpers import CLI_ENV, RECIPES, REPO, run_cli_parallel


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_texts(run: Path) -> list[str]:
    """The run's eval rows, in the order of its predictions.jsonl."""
    recipe = load_recipe(run / "recipe.yaml")
    _, eval_rows = datamap.split_rows(
        datamap.load_rows(recipe.data), recipe.data.train_split, recipe.data.seed
    )
    return eval_rows.texts


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_t5, fin_data, tmp_path_factory) -> dict[str, Path]:
    """A tiny-BERT classifier (2 steps) and a tiny-T5 LoRA run long enough to write label words."""
    root = tmp_path_factory.mktemp("predict")
    out = {"bert": root / "bert_lora", "t5": root / "t5_lora"}
    common = ["--backend", "torch", f"data.source={fin_data}", "--no-progress"]
    procs = run_cli_parallel(
        {
            "bert": [
                "run",
                str(RECIPES / "minilm_demo.yaml"),
                f"model.name_or_path={tiny_bert}",
                "data.max_rows=null",
                "train.max_steps=2",
                "train.epochs=1",
                "--output-dir",
                str(out["bert"]),
                *common,
            ],
            "t5": [
                "run",
                str(RECIPES / "t5_lora.yaml"),
                f"model.name_or_path={tiny_t5}",
                "optim.lr=1e-2",
                "train.epochs=3",
                "--output-dir",
                str(out["t5"]),
                *common,
            ],
        }
    )
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
    return out


# ---------------------------------------------------------------- predict


@pytest.mark.slow
def test_predict_reproduces_the_runs_predictions(runs, tmp_path):
    bert, t5 = runs["bert"], runs["t5"]
    texts = {name: eval_texts(run) for name, run in runs.items()}
    # classification from a file (with a blank line to skip), seq2seq from arguments
    listing = tmp_path / "texts.txt"
    listing.write_text(
        "\n".join(texts["bert"][:5]) + "\n\n" + "\n".join(texts["bert"][5:]) + "\n", encoding="utf-8"
    )
    procs = run_cli_parallel(
        {
            "bert": ["predict", str(bert), "--file", str(listing), "--backend", "torch"],
            "t5": ["predict", str(t5), *texts["t5"], "--backend", "torch"],
        }
    )
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
    got = {name: [json.loads(line) for line in proc.stdout.splitlines()] for name, proc in procs.items()}

    saved = read_jsonl(bert / "predictions.jsonl")
    assert len(got["bert"]) == len(saved) == 40
    assert [g["text"] for g in got["bert"]] == texts["bert"]
    assert [g["label"] for g in got["bert"]] == [p["pred"] for p in saved]
    names = ["negative", "neutral", "positive"]
    for g, p in zip(got["bert"], saved):
        assert list(g["scores"]) == names
        logits = np.asarray(p["logits"], dtype=np.float64)
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose([g["scores"][n] for n in names], expected, rtol=1e-5, atol=1e-6)
        assert sum(g["scores"].values()) == pytest.approx(1.0)

    saved = read_jsonl(t5 / "predictions.jsonl")
    assert [g["text"] for g in got["t5"]] == texts["t5"]
    assert [set(g) for g in got["t5"]] == [{"text", "label"}] * len(saved) == [{"text", "label"}] * 20
    assert [g["label"] for g in got["t5"]] == [p["generated"] for p in saved]
    assert any(g["label"] in names for g in got["t5"])  # label words, not empty strings


@pytest.mark.slow
def test_predict_batch_size_does_not_change_labels(runs):
    bert = runs["bert"]
    texts = eval_texts(bert)[:7]
    proc = run_cli_parallel({"p": ["predict", str(bert), *texts, "--batch-size", "3"]})["p"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    labels = [json.loads(line)["label"] for line in proc.stdout.splitlines()]
    assert labels == [p["pred"] for p in read_jsonl(bert / "predictions.jsonl")[:7]]


def test_predict_errors(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: x\n")
    (run / "final_metrics.json").write_text("{}\n")
    half = tmp_path / "half"
    half.mkdir()
    (half / "recipe.yaml").write_text("name: x\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Sales in Espoo rose \xa3 5 .\n".encode("latin-1"))
    cases = {
        (str(run),): "dualtune: error: no text to predict: give TEXT arguments or --file PATH",
        (
            str(run),
            "--file",
            str(blank),
        ): "dualtune: error: no text to predict: give TEXT arguments or --file PATH",
        (
            str(run),
            "--file",
            str(tmp_path / "nope.txt"),
        ): f"dualtune: error: {tmp_path / 'nope.txt'}: no such file",
        (str(run), "--file", str(latin)): f"dualtune: error: {latin}: not UTF-8 text (byte 20)",
        (
            str(tmp_path / "missing"),
            "text",
        ): f"dualtune: error: {tmp_path / 'missing'}: not a run directory (no recipe.yaml)",
        (str(half), "text"): f"dualtune: error: {half}: not a finished run (no final_metrics.json)",
        (str(run), "text", "--batch-size", "0"): "dualtune: error: --batch-size 0: expected 1 or more",
    }
    for args, line in cases.items():
        proc = dualtune_cli("predict", *args, check=False)
        assert (proc.returncode, proc.stderr.splitlines()) == (2, [line]), args


# ---------------------------------------------------------------- report


def fake_run(path: Path, final: dict, trainable: dict, recipe: dict) -> Path:
    path.mkdir(parents=True)
    (path / "final_metrics.json").write_text(json.dumps(final))
    (path / "trainable.json").write_text(json.dumps(trainable))
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def fake_runs(tmp_path) -> list[Path]:
    t5 = {"model": {"name_or_path": "t5-small", "task": "seq2seq"}, "peft": {"method": "lora"}}
    lora = fake_run(
        tmp_path / "t5_lora-torch",
        {
            "backend": "torch",
            "steps": 1415,
            "train_seconds": 612.3,
            "trainable_parameters": 294912,
            "total_parameters": 60801536,
            "peak_rss_mb": 1834.4,
            "peak_device_memory_mb": 731.6,  # a CUDA run
            "precision": "bf16",
            "eval_loss": 0.08,
            "teacher_forced_accuracy": 0.91,
            "exact_match": 0.875,
            "f1_macro": 0.8125,
            "majority_class_accuracy": 0.61,
        },
        {"method": "lora", "total": 60801536, "trainable": 294912, "tensors": {}},
        t5,
    )
    # an older run: no peak memory, no F1; generation off, so no exact_match
    prefix = fake_run(
        tmp_path / "t5_prefix-mindspore",
        {
            "backend": "mindspore",
            "steps": 20,
            "train_seconds": 33.0,
            "trainable_parameters": 15360,
            "total_parameters": 60522496,
            "eval_loss": 1.5,
            "teacher_forced_accuracy": 0.5,
        },
        {"method": "prefix", "total": 60522496, "trainable": 15360, "tensors": {}},
        {**t5, "peft": {"method": "prefix"}},
    )
    return [lora, prefix]


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return dualtune_cli("report", *map(str, args), check=False)


def test_report_text(fake_runs):
    proc = report_cli(*fake_runs)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == [
        "run",
        "backend",
        "method",
        "metric",
        "score",
        "f1 macro",
        "trainable",
        "trainable %",
        "train s",
        "peak MB",
        "device MB",
        "steps",
    ]
    assert rows[0].split() == [
        "t5_lora-torch",
        "torch",
        "lora",
        "exact_match",
        "0.8750",
        "0.8125",
        "294,912",
        "0.4850",
        "612.3",
        "1834",
        "732",
        "1415",
    ]
    assert rows[1].split() == [
        "t5_prefix-mindspore",
        "mindspore",
        "prefix",
        "teacher_forced_accuracy",
        "0.5000",
        "-",
        "15,360",
        "0.0254",
        "33.0",
        "-",
        "-",
        "20",
    ]
    assert len(rows) == 2 and len(header) == len(rows[0]) == len(rows[1])  # numbers right-aligned
    assert header.index("metric") == rows[0].index("exact_match") == rows[1].index("teacher_forced_accuracy")


def test_report_order_is_as_given(fake_runs):
    rows = report_cli(*reversed(fake_runs)).stdout.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["t5_prefix-mindspore", "t5_lora-torch"]


def test_report_markdown(fake_runs):
    lines = report_cli(*fake_runs, "--format", "markdown").stdout.splitlines()
    assert lines[0] == (
        "| run | backend | method | metric | score | f1 macro | trainable | trainable % | train s "
        "| peak MB | device MB | steps |"
    )
    assert lines[1] == "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2].startswith("| t5_lora-torch | torch | lora | exact_match | 0.8750 |") and len(lines) == 4


def test_report_csv(fake_runs):
    rows = list(csv.DictReader(io.StringIO(report_cli(*fake_runs, "--format", "csv").stdout)))
    assert [r["run"] for r in rows] == ["t5_lora-torch", "t5_prefix-mindspore"]
    lora, prefix = rows
    assert (lora["backend"], lora["method"], lora["task"], lora["metric"]) == (
        "torch",
        "lora",
        "seq2seq",
        "exact_match",
    )
    assert float(lora["score"]) == 0.875 and float(lora["f1_macro"]) == 0.8125
    assert int(lora["trainable_parameters"]) == 294912 and int(lora["total_parameters"]) == 60801536
    assert float(lora["trainable_percent"]) == pytest.approx(100 * 294912 / 60801536)
    assert float(lora["train_seconds"]) == 612.3 and float(lora["peak_rss_mb"]) == 1834.4
    assert int(lora["steps"]) == 1415
    assert float(lora["peak_device_memory_mb"]) == 731.6 and lora["precision"] == "bf16"
    assert prefix["metric"] == "teacher_forced_accuracy" and float(prefix["score"]) == 0.5
    assert prefix["f1_macro"] == prefix["peak_rss_mb"] == prefix["peak_device_memory_mb"] == ""


def test_report_errors(fake_runs, tmp_path):
    unfinished = tmp_path / "t5_lora-torch.failed"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("name: x\n")
    broken = fake_run(tmp_path / "broken", {}, {}, {})
    (broken / "final_metrics.json").write_text("{not json")
    cases = {
        unfinished: f"{unfinished}: not a finished run (no final_metrics.json)",
        tmp_path / "nope": f"{tmp_path / 'nope'}: no such directory",
        broken: f"{broken / 'final_metrics.json'}: unreadable (Expecting property name enclosed in double "
        f"quotes: line 1 column 2 (char 1))",
    }
    for path, message in cases.items():
        # beside a finished run (a glob over runs/): that one is reported, this one named
        proc = report_cli(fake_runs[0], path)
        assert (proc.returncode, proc.stderr.splitlines()) == (0, [f"dualtune: skipped {message}"])
        assert len(proc.stdout.splitlines()) == 2 and proc.stdout.splitlines()[1].startswith(
            fake_runs[0].name
        )
        alone = report_cli(path)
        assert (alone.returncode, alone.stdout, alone.stderr.splitlines()) == (
            2,
            "",
            [f"dualtune: error: no finished run to report: {message}"],
        )
    proc = report_cli(fake_runs[0], "--format", "html")
    assert proc.returncode == 2 and "invalid choice: 'html'" in proc.stderr


def test_report_loads_no_framework(fake_runs):
    code = (
        "import sys; from dualtune.cli import main; rc = main(['report', *sys.argv[1:]]); "
        "bad = sorted({'torch', 'mindspore', 'transformers', 'sklearn', 'matplotlib'} & set(sys.modules)); "
        "print(bad, file=sys.stderr); sys.exit(rc or (1 if bad else 0))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, fake_runs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=CLI_ENV,
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "[]", proc.stderr


@pytest.mark.slow
def test_report_on_a_real_run(runs, fake_runs):
    bert = runs["bert"]
    final = json.loads((bert / "final_metrics.json").read_text())
    trainable = json.loads((bert / "trainable.json").read_text())
    rows = list(
        csv.DictReader(io.StringIO(report_cli(bert, runs["t5"], fake_runs[0], "--format", "csv").stdout))
    )
    assert [r["run"] for r in rows] == ["bert_lora", "t5_lora", "t5_lora-torch"]
    row = rows[0]
    assert (row["backend"], row["method"], row["task"], row["metric"]) == (
        "torch",
        "lora",
        "classification",
        "accuracy",
    )
    assert float(row["score"]) == final["accuracy"] and float(row["f1_macro"]) == final["f1_macro"]
    assert int(row["trainable_parameters"]) == trainable["trainable"] == final["trainable_parameters"]
    assert float(row["trainable_percent"]) == pytest.approx(100 * trainable["trainable"] / trainable["total"])
    assert float(row["train_seconds"]) == final["train_seconds"] and int(row["steps"]) == final["steps"] == 2
    assert float(row["peak_rss_mb"]) == final["peak_rss_mb"] > 0
    t5 = json.loads((runs["t5"] / "final_metrics.json").read_text())
    assert rows[1]["metric"] == "exact_match" and float(rows[1]["score"]) == t5["exact_match"]


def test_eval_and_predict_of_a_trained_run_say_nothing_about_untrained_weights(runs):
    # transformers warns that the base model's fresh head is "newly initialized ... You should
    # probably TRAIN": not true of a run whose trained head replaces it.
    ev = dualtune_cli("eval", str(runs["bert"]), "--backend", "torch")
    pred = dualtune_cli("predict", str(runs["bert"]), "Sales rose .", "--backend", "torch")
    for proc in (ev, pred):
        assert "newly initialized" not in proc.stderr and "You should probably TRAIN" not in proc.stderr
