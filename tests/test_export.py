"""`dualtune export`: a run's model merged into a plain Hugging Face folder, or as ONNX, that gives
the run's own predictions without dualtune or peft; the methods that cannot be merged refused in one
line; nothing half-written and no user's file replaced.

One 3-step tiny-BERT run per method (and a tiny-T5 LoRA run), all exported at once in parallel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dualtune.recipe import load_recipe
from torch_helpers import RECIPES, run_cli_parallel

# Weight-level methods: their merged folder is a plain model. The rest cannot be merged.
MERGEABLE = {"lora": [], "ia3": [], "bitfit": [], "none": ["optim.lr=1e-3"]}
REFUSED = ("prefix", "prompt")
# Measured on these runs: merged 1e-8, ONNX 2e-8 (the padding of one batch against the run's
# longest-first eval batches, and ONNX Runtime's kernels).
MERGED_TOL = 1e-5
ONNX_TOL = 1e-4


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("dualtune: error:")]


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_t5, fin_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    common = ["--backend", "torch", f"data.source={fin_data}", "train.max_steps=3", "--no-progress"]
    bert = [
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={tiny_bert}",
        "data.max_rows=null",
        "schedule.warmup_ratio=null",
        "train.epochs=1",
        "train.eval_every=1000",
        *common,
    ]
    jobs = {
        method: [*bert, f"peft.method={method}", *extra, "--output-dir", str(root / method)]
        for method, extra in {**MERGEABLE, **{m: [] for m in REFUSED}}.items()
    }
    jobs["t5"] = [
        "run",
        str(RECIPES / "t5_lora.yaml"),
        f"model.name_or_path={tiny_t5}",
        "optim.lr=1e-2",
        "--output-dir",
        str(root / "t5"),
        *common,
    ]
    for name, proc in run_cli_parallel(jobs).items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
    return {name: root / name for name in jobs}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Each mergeable run exported merged and ONNX (IA3 with --out), the T5 run merged, and the
    refusals, side by side."""
    out = tmp_path_factory.mktemp("export-out") / "ia3"
    jobs = {
        method: ["export", str(runs[method]), "--format", "merged", "--format", "onnx"]
        for method in MERGEABLE
    }
    jobs["ia3"] += ["--out", str(out)]
    jobs["t5"] = ["export", str(runs["t5"]), "--format", "merged"]
    jobs |= {method: ["export", str(runs[method]), "--format", "merged"] for method in REFUSED}
    jobs["t5_onnx"] = ["export", str(runs["t5"]), "--format", "onnx", "--out", str(out.parent / "t5")]
    jobs["mindspore"] = ["export", str(runs["lora"]), "--format", "merged", "--backend", "mindspore"]
    procs = run_cli_parallel(jobs)
    folders = {method: runs[method] / "export" for method in MERGEABLE} | {
        "ia3": out,
        "t5": runs["t5"] / "export",
    }
    return procs, folders


def tokenized(folder: Path, run: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """The texts as a user of the exported folder tokenizes them: its own tokenizer, the recipe's
    max_length, one padded batch."""
    from transformers import AutoTokenizer

    max_length = load_recipe(run / "recipe.yaml").data.max_length
    tok = AutoTokenizer.from_pretrained(folder)
    return dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(MERGEABLE))
def test_merged_folder_loads_with_plain_transformers_and_gives_the_runs_predictions(
    method, runs, exports, tiny_bert
):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification

    procs, folders = exports
    assert procs[method].returncode == 0, procs[method].stderr[-3000:]
    folder = folders[method] / "merged"
    assert f"merged: {folder} (40 rows verified: labels identical" in procs[method].stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "export.json"} <= {
        p.name for p in folder.iterdir()
    }
    weights = load_file(str(folder / "model.safetensors"))
    assert not any("lora" in k or "ia3" in k or "modules_to_save" in k for k in weights)  # a plain model
    # The method's training is in the model's own tensors, not only in the head.
    base = load_file(str(Path(tiny_bert) / "model.safetensors"))
    moved = [k for k in base if not np.array_equal(base[k], weights[f"bert.{k}"])]  # the body's tensors
    assert moved, f"{method}: only the head changed"

    saved = read_jsonl(runs[method] / "predictions.jsonl")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = tokenized(folder, runs[method], [p["text"] for p in saved])
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    assert [names[i] for i in logits.argmax(-1)] == [p["pred"] for p in saved]
    np.testing.assert_allclose(logits, [p["logits"] for p in saved], atol=MERGED_TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(MERGEABLE))
def test_onnx_runtime_gives_the_runs_predictions(method, runs, exports):
    import onnxruntime

    procs, folders = exports
    assert procs[method].returncode == 0, procs[method].stderr[-3000:]
    folder = folders[method] / "onnx"
    saved = read_jsonl(runs[method] / "predictions.jsonl")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    batch = tokenized(folder, runs[method], [p["text"] for p in saved])
    (logits,) = session.run(
        ["logits"], {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    )
    labels = json.loads((folder / "config.json").read_text())["id2label"]
    assert [labels[str(i)] for i in logits.argmax(-1)] == [p["pred"] for p in saved]
    np.testing.assert_allclose(logits, [p["logits"] for p in saved], atol=ONNX_TOL, rtol=0)


@pytest.mark.slow
def test_export_json_records_the_source_and_the_check(runs, exports):
    _, folders = exports
    for fmt in ("merged", "onnx"):
        folder = folders["lora"] / fmt
        record = json.loads((folder / "export.json").read_text())
        recipe = load_recipe(runs["lora"] / "recipe.yaml")
        assert record["format"] == fmt and record["method"] == "lora" and record["task"] == "classification"
        assert record["source_run"] == str(runs["lora"].resolve())
        assert record["base_model"] == recipe.model.name_or_path
        assert record["labels"] == ["negative", "neutral", "positive"]
        check = record["verification"]
        assert check["rows"] == 40 and check["labels_identical"] and check["passed"]
        assert 0 <= check["max_abs_logit_diff"] <= check["tolerance"] == 1e-4
        assert {"python", "dualtune", "torch", "transformers", "peft"} <= set(record["versions"])
        assert ({"onnx", "onnxruntime"} <= set(record["versions"])) == (fmt == "onnx")
        assert record["files"] == sorted(p.name for p in folder.iterdir())
    assert not [p for p in folders["lora"].iterdir() if p.name.startswith(".")]  # no partial left


@pytest.mark.slow
def test_seq2seq_merges_and_onnx_is_declined(runs, exports):
    procs, folders = exports
    assert procs["t5"].returncode == 0, procs["t5"].stderr[-3000:]
    record = json.loads((folders["t5"] / "merged" / "export.json").read_text())
    assert record["task"] == "seq2seq" and record["verification"]["passed"]
    assert record["verification"]["rows"] == len(read_jsonl(runs["t5"] / "predictions.jsonl")) == 20
    proc = procs["t5_onnx"]
    assert proc.returncode == 2
    assert error_lines(proc) == [
        "dualtune: error: --format onnx: seq2seq models are not supported yet (classification only); "
        "--format merged exports this run"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", REFUSED)
def test_prompt_learning_is_refused_in_one_line_and_nothing_is_written(method, runs, exports):
    procs, _ = exports
    proc = procs[method]
    why = {
        "prefix": "its trained key/value prefixes are extra inputs to every attention layer",
        "prompt": "its trained virtual tokens are extra inputs before the text",
    }[method]
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"dualtune: error: {runs[method]}: peft.method {method} cannot be merged into the model: {why}, "
        "not a change to its weights; use the run's adapter/ with peft instead"
    ]
    assert not (runs[method] / "export").exists()


@pytest.mark.slow
def test_a_backend_without_export_is_refused_before_it_loads(exports):
    proc = exports[0]["mindspore"]
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "dualtune: error: --format merged: the mindspore backend cannot export it; export with --backend torch"
    ]


@pytest.mark.slow
def test_an_existing_export_is_replaced_only_with_overwrite_and_a_users_file_never(runs, exports, tmp_path):
    procs, folders = exports
    assert procs["bitfit"].returncode == 0, procs["bitfit"].stderr[-3000:]
    run, folder = runs["bitfit"], folders["bitfit"] / "merged"
    before = json.loads((folder / "export.json").read_text())["exported_at"]
    (folder.parent / "onnx" / "notes.txt").write_text("mine")
    # The refusals first (they read files only), then the exports that write.
    done = run_cli_parallel(
        {
            "again": ["export", str(run), "--format", "merged"],
            "foreign": ["export", str(run), "--format", "onnx", "--overwrite"],
        }
    )
    done |= run_cli_parallel(
        {
            "overwrite": ["export", str(run), "--format", "merged", "--overwrite"],
            "file": ["export", str(run), "--format", "merged", "--out", str(tmp_path / "file")],
        }
    )
    assert done["again"].returncode == 2
    assert error_lines(done["again"]) == [
        f"dualtune: error: {folder}: exists; add --overwrite to replace what dualtune wrote there, "
        "or choose another folder"
    ]
    assert done["foreign"].returncode == 2
    assert "holds files dualtune did not write (notes.txt)" in done["foreign"].stderr
    assert (folder.parent / "onnx" / "notes.txt").read_text() == "mine"
    assert (folder.parent / "onnx" / "model.onnx").is_file()
    assert done["overwrite"].returncode == 0, done["overwrite"].stderr[-3000:]
    assert json.loads((folder / "export.json").read_text())["exported_at"] >= before
    assert done["file"].returncode == 0, done["file"].stderr[-3000:]
    assert (tmp_path / "file" / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_an_export_that_does_not_reproduce_the_run_fails_and_leaves_nothing(runs, tmp_path):
    run = tmp_path / "lora"
    shutil.copytree(runs["lora"], run, ignore=shutil.ignore_patterns("export"))
    saved = read_jsonl(run / "predictions.jsonl")
    saved[0]["logits"][0] += 0.01  # as if the run had computed something else
    (run / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in saved))
    proc = run_cli_parallel({"bad": ["export", str(run), "--format", "merged"]})["bad"]
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert line.startswith(f"dualtune: error: --format merged of {run} failed its check (40 rows verified, ")
    assert "max |logit diff| 1.00e-02 > tolerance 1e-04); nothing written" in line
    assert not (run / "export").exists()
