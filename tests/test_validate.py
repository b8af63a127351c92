"""``dualtune validate`` and the checks ``dualtune run`` makes before a framework loads: each mistake
gives exit 2 and one exact line (or a warning), without tracebacks, late failures or silent nonsense."""

from __future__ import annotations

import errno
import glob
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dualtune import data as datamap
from dualtune import validate as vmod
from dualtune.errors import DataError, RecipeError, RunDirError, UserError
from dualtune.recipe import load_recipe
from helpers import RECIPES, REPO, dualtune_cli

LABELS = ["negative", "neutral", "positive"]


def write_jsonl(path: Path, rows: list[tuple[str, object]]) -> str:
    path.write_text("".join(json.dumps({"sentence": s, "label": item}) + "\n" for s, item in rows))
    return str(path)


def sentences(n: int) -> list[str]:
    return [f"Net sales rose by {i} % in the quarter ." for i in range(n)]


def bert_args(model: str, source: str, out: Path, *extra: str) -> list[str]:
    return [
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={model}",
        f"data.source={source}",
        "data.max_rows=null",
        "--output-dir",
        str(out),
        *extra,
    ]


def t5_args(model: str, source: str, out: Path, *extra: str) -> list[str]:
    return [
        str(RECIPES / "t5_lora.yaml"),
        f"model.name_or_path={model}",
        f"data.source={source}",
        "--output-dir",
        str(out),
        *extra,
    ]


def fails(command: str, *args: str) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line, which is returned."""
    proc = dualtune_cli(command, *args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def plan_of(*args: str, backend: str = "torch", device: str = "cpu") -> vmod.Plan:
    """validate() in this process: ``args`` as for the CLI (RECIPE, overrides, --output-dir OUT)."""
    args = list(args)
    out = args[args.index("--output-dir") + 1]
    overrides = [a for a in args[1:] if "=" in a]
    return vmod.validate(load_recipe(args[0], overrides), backend, device, out)


# ---------------------------------------------------------------- the plan


def test_validate_prints_the_plan(tiny_t5, fin_data, tmp_path):
    proc = dualtune_cli("validate", *t5_args(tiny_t5, fin_data, tmp_path / "run"))
    lines = proc.stdout.splitlines()
    assert lines[0] == f"recipe t5_lora on torch (cpu) -> {tmp_path / 'run'}"
    assert lines[1] == "task seq2seq, 3 labels: negative, neutral, positive"
    assert lines[2] == "rows: all 200, train 180, eval 20"
    assert lines[5] == "steps: 115 (23 per epoch, 5 epochs); evaluation at steps 23, 46, 69, 92, 115"
    assert lines[6].startswith("input tokens: p50 ")
    assert "label tokens: negative 2, neutral 2, positive 2" in lines
    assert not (tmp_path / "run").exists()  # validate writes nothing


def test_validate_loads_no_framework(tiny_bert, fin_data, tmp_path):
    """The checks run in the CLI process before the MindSpore backend activates: no torch import."""
    code = (
        "import sys; from dualtune.cli import main; rc = main(['validate', *sys.argv[1:]]); "
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *bert_args(tiny_bert, fin_data, tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout.splitlines()[-1] == "0 False False", proc.stderr[-2000:]


def test_plan_counts(tiny_bert, fin_data, tmp_path):
    plan = plan_of(*bert_args(tiny_bert, fin_data, tmp_path / "run", "train.eval_every=10"))
    rows = datamap.load_rows(
        load_recipe(RECIPES / "minilm_demo.yaml", [f"data.source={fin_data}", "data.max_rows=null"]).data
    )
    train, evaluation = datamap.split_rows(rows, 0.8, 42)
    assert plan.rows == {"all": 200, "train": 160, "eval": 40}
    assert list(plan.class_counts["eval"].values()) == np.bincount(evaluation.labels, minlength=3).tolist()
    assert (plan.steps_per_epoch, plan.total_steps) == (10, 30)  # the demo's 3 epochs
    assert plan.eval_points == [10, 20, 30]
    assert plan.model_parameters > 0 and plan.max_positions == 256
    assert plan.input_tokens["padded"] <= 64


# ---------------------------------------------------------------- tracebacks that are now one line


def test_jsonl_not_utf8(tiny_bert, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"sentence": "Sales rose .", "label": "positive"}\n'
        b'{"sentence": "Caf\xe9 sales fell .", "label": "negative"}\n'
    )
    line = fails("validate", *bert_args(tiny_bert, str(bad), tmp_path / "run"))
    assert line == f"dualtune: error: {bad}:2: not UTF-8 (byte 0xe9 at offset 67); save the file as UTF-8"


@pytest.mark.skipif(bool(glob.glob("/dev/davinci[0-9]*")), reason="this machine has an Ascend NPU")
def test_mindspore_ascend_without_one(tiny_bert, fin_data, tmp_path):
    line = fails(
        "run",
        *bert_args(tiny_bert, fin_data, tmp_path / "run"),
        "--backend",
        "mindspore",
        "--device",
        "ascend",
    )
    assert (
        line
        == "dualtune: error: --device ascend: no Ascend NPU on this machine (no /dev/davinci*); use --device cpu"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="this machine has an NVIDIA GPU")
def test_mindspore_gpu_without_one(tiny_bert, fin_data, tmp_path):
    line = fails(
        "validate",
        *bert_args(tiny_bert, fin_data, tmp_path / "run"),
        "--backend",
        "mindspore",
        "--device",
        "gpu",
    )
    assert (
        line
        == "dualtune: error: --device gpu: no NVIDIA GPU on this machine (no /dev/nvidia*); use --device cpu"
    )


def fake_run(tmp_path: Path, model: str, targets: list[str], tensors: dict[str, np.ndarray]) -> Path:
    """A finished run directory as eval/predict see it, with a LoRA adapter of these tensors."""
    from safetensors.numpy import save_file

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    recipe = load_recipe(
        RECIPES / "t5_lora.yaml",
        [f"model.name_or_path={model}", "data.source=synthetic", f"data.label_names=[{', '.join(LABELS)}]"],
    )
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    (run / "final_metrics.json").write_text("{}")
    (run / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "target_modules": targets, "base_model_name_or_path": "t5-small"})
    )
    save_file(tensors, str(run / "adapter" / "adapter_model.safetensors"))
    return run


LORA_T5 = {
    "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": np.zeros((8, 32), np.float32)
}


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_truncated_adapter(tiny_t5, tmp_path, command):
    run = fake_run(tmp_path, tiny_t5, ["q", "v"], LORA_T5)
    weights = run / "adapter" / "adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-100])
    line = fails(command, str(run), *(["some text"] if command == "predict" else []))
    assert line == (
        f"dualtune: error: {weights}: truncated ({size - 100} bytes, its header describes {size}); "
        f"the file was cut while written or copied"
    )


def test_corrupt_adapter(tiny_t5, tmp_path):
    run = fake_run(tmp_path, tiny_t5, ["q", "v"], LORA_T5)
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 7)
    assert (
        fails("eval", str(run))
        == f"dualtune: error: {weights}: not a safetensors file (7 bytes, truncated or empty)"
    )


def test_adapter_of_another_model(tiny_bert, tmp_path):
    run = fake_run(tmp_path, tiny_bert, ["q", "v"], LORA_T5)
    line = fails("eval", str(run))
    assert line == (
        f"dualtune: error: {run / 'adapter' / 'adapter_config.json'}: target modules ['q', 'v'] not "
        f"found in {tiny_bert} (the run's model.name_or_path); the adapter was trained on t5-small: "
        f"the adapter belongs to another model"
    )


def test_lora_adapter_of_a_wider_model(tiny_t5, tmp_path):
    key = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"
    run = fake_run(tmp_path, tiny_t5, ["q", "v"], {key: np.zeros((8, 512), np.float32)})
    assert fails("eval", str(run)) == (
        f"dualtune: error: {run / 'adapter' / 'adapter_model.safetensors'}: {key} takes 512 inputs, but {tiny_t5}'s "
        f"encoder.block.0.layer.0.SelfAttention.q.weight has 32; the adapter was trained on t5-small: the adapter "
        f"belongs to another model"
    )


def test_prefix_adapter_of_another_model(tiny_t5, tmp_path):
    run = fake_run(tmp_path, tiny_t5, ["q", "v"], {"prompt_embeddings": np.zeros((20, 6 * 512), np.float32)})
    config = run / "adapter" / "adapter_config.json"
    config.write_text(
        json.dumps(
            {
                "peft_type": "PREFIX_TUNING",
                "token_dim": 512,
                "num_layers": 6,
                "base_model_name_or_path": "t5-small",
            }
        )
    )
    recipe = load_recipe(run / "recipe.yaml", ["peft.method=prefix"])
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    assert fails("eval", str(run)) == (
        f"dualtune: error: {config}: token_dim 512, but {tiny_t5} has 32; the adapter "
        f"was trained on t5-small: the adapter belongs to another model"
    )


def test_read_only_output(tiny_bert, fin_data, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(vmod.tempfile, "mkstemp", refuse)
    with pytest.raises(RunDirError) as err:
        plan_of(*bert_args(tiny_bert, fin_data, tmp_path / "run"))
    assert str(err.value) == (
        f"{tmp_path / 'run'}: cannot write in {tmp_path} (read-only file system); choose another --output-dir"
    )


def test_full_disk(tiny_bert, fin_data, tmp_path, monkeypatch):
    monkeypatch.setattr(vmod.shutil, "disk_usage", lambda p: type("U", (), {"free": 3 * 2**20})())
    with pytest.raises(RunDirError) as err:
        plan_of(*bert_args(tiny_bert, fin_data, tmp_path / "run"))
    assert str(err.value) == (
        f"{tmp_path / 'run'}: 3 MB free in {tmp_path}, the run needs about 16 MB; "
        f"free space or choose another --output-dir"
    )


def test_os_errors_while_writing_are_one_line(monkeypatch, capsys):
    from dualtune import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/adapter/adapter_model.safetensors")

    from dualtune.commands import report

    monkeypatch.setattr(report, "main", full)
    assert cli.main(["report", "runs/x"]) == 2
    assert capsys.readouterr().err == (
        "dualtune: error: runs/x/adapter/adapter_model.safetensors: No space left on device\n"
    )


# ---------------------------------------------------------------- what failed late


def test_max_length_above_positions(tiny_bert, fin_data, tmp_path):
    line = fails("validate", *bert_args(tiny_bert, fin_data, tmp_path / "run", "data.max_length=300"))
    assert line == (
        f"dualtune: error: data.max_length 300: above the 256 positions of {tiny_bert} (config.json); "
        f"set data.max_length to at most 256"
    )


def test_max_length_with_virtual_tokens(tiny_bert, fin_data, tmp_path):
    line = fails(
        "validate",
        *bert_args(tiny_bert, fin_data, tmp_path / "run", "data.max_length=250", "peft.method=prompt"),
    )
    assert line == (
        f"dualtune: error: data.max_length 250 + 20 virtual tokens (prompt): above the 256 positions "
        f"of {tiny_bert} (config.json); set data.max_length to at most 236"
    )


def test_t5_has_no_position_limit(tiny_t5, fin_data, tmp_path):
    plan = plan_of(*t5_args(tiny_t5, fin_data, tmp_path / "run", "data.max_length=4096"))
    assert plan.max_positions is None


# ---------------------------------------------------------------- what was silently wrong


def test_one_class_data_with_num_labels_2(tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [(s, "positive") for s in sentences(20)])
    line = fails(
        "run", *bert_args(tiny_bert, data, tmp_path / "run", "data.label_names=null", "model.num_labels=2")
    )
    assert line == (
        f"dualtune: error: model.num_labels is 2 but {data} gives 1 class (positive); set "
        f"data.label_names to name all 2, or fix model.num_labels"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl"]  # no run directory, no .failed


def test_two_classes_with_num_labels_3(tiny_bert, tmp_path):
    data = write_jsonl(
        tmp_path / "two.jsonl", [(s, ["up", "down"][i % 2]) for i, s in enumerate(sentences(20))]
    )
    line = fails(
        "validate",
        *bert_args(tiny_bert, data, tmp_path / "run", "data.label_names=null", "model.num_labels=3"),
    )
    assert line == (
        f"dualtune: error: model.num_labels is 3 but {data} gives 2 classes (down, up); set "
        f"data.label_names to name all 3, or fix model.num_labels"
    )


def test_duplicate_label_names(tiny_bert, fin_data, tmp_path):
    line = fails("validate", *bert_args(tiny_bert, fin_data, tmp_path / "run", "data.label_names=[a, b, a]"))
    assert line == "dualtune: error: data.label_names names 'a' twice; each class needs a name of its own"


@pytest.mark.parametrize(
    "model, special", [("bert", 1), ("t5", 1)]
)  # the tiny BERT's tokenizer adds [SEP] only
def test_max_length_1(tiny_bert, tiny_t5, fin_data, tmp_path, model, special):
    args = (
        bert_args(tiny_bert, fin_data, tmp_path / "run", "data.max_length=1")
        if model == "bert"
        else t5_args(tiny_t5, fin_data, tmp_path / "run", "data.max_length=1")
    )
    s = "s" if special > 1 else ""
    assert fails("validate", *args) == (
        f"dualtune: error: data.max_length 1: no room for text (the tokenizer adds "
        f"{special} special token{s} to every input)"
    )


def test_t5_label_max_length_1(tiny_t5, fin_data, tmp_path):
    line = fails("validate", *t5_args(tiny_t5, fin_data, tmp_path / "run", "data.label_max_length=1"))
    assert line == (
        "dualtune: error: data.label_max_length 1: 'negative', 'neutral', 'positive' become no word at "
        "all ('negative' (2 tokens) -> '', 'neutral' (2 tokens) -> '', 'positive' (2 tokens) -> ''); "
        "set data.label_max_length to 2"
    )


def test_label_words_that_become_one_target(tiny_t5, tmp_path):
    names = ["profit rose", "profit fell", "negative"]
    data = write_jsonl(tmp_path / "d.jsonl", [(s, names[i % 3]) for i, s in enumerate(sentences(30))])
    line = fails(
        "validate",
        *t5_args(
            tiny_t5,
            data,
            tmp_path / "run",
            f"data.label_names=[{', '.join(names)}]",
            "data.label_max_length=2",
        ),
    )
    assert line == (
        "dualtune: error: data.label_max_length 2: 'profit rose' and 'profit fell' become the same "
        "target ('profit rose' (3 tokens) -> 'profit', 'profit fell' (3 tokens) -> 'profit'); set "
        "data.label_max_length to 3"
    )


def test_cut_label_words_warn(tiny_t5, tmp_path):
    names = ["sales rose", "profit fell", "negative"]
    data = write_jsonl(tmp_path / "d.jsonl", [(s, names[i % 3]) for i, s in enumerate(sentences(30))])
    plan = plan_of(
        *t5_args(
            tiny_t5,
            data,
            tmp_path / "run",
            f"data.label_names=[{', '.join(names)}]",
            "data.label_max_length=2",
        )
    )
    assert (
        "data.label_max_length 2 cuts label words: 'sales rose' (3 tokens) -> 'sales', "
        "'profit fell' (3 tokens) -> 'profit'"
    ) in plan.warnings


def test_bool_for_int(tiny_bert, fin_data, tmp_path):
    line = fails("validate", *bert_args(tiny_bert, fin_data, tmp_path / "run", "train.batch_size=true"))
    assert line == "dualtune: error: train.batch_size: got True (bool), expected an integer"


def test_single_class_classifier_is_an_error(tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [(s, "positive") for s in sentences(20)])
    line = fails("validate", *bert_args(tiny_bert, data, tmp_path / "run"))
    assert line == (
        f"dualtune: error: {data}: every row has the label 'positive'; a classifier needs rows of at "
        f"least two classes"
    )


def test_single_class_seq2seq_warns(tiny_t5, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [(s, "positive") for s in sentences(40)])
    plan = plan_of(*t5_args(tiny_t5, data, tmp_path / "run", f"data.label_names=[{', '.join(LABELS)}]"))
    assert f"{data}: every row has the label 'positive': the model learns one answer" in plan.warnings
    assert f"{data}: no rows of labels 'negative', 'neutral'" not in plan.warnings  # one warning says it


# ---------------------------------------------------------------- what was unclear


def test_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\n  task: seq2seq\n    extra: 1\n")
    assert fails("validate", str(bad)) == (
        f"dualtune: error: recipe {bad}: not valid YAML at line 4, column 10: "
        f"mapping values are not allowed here"
    )


def test_malformed_jsonl_line(tiny_bert, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"sentence": "Sales rose .", "label": "positive"}\n'
        '{"sentence": "Sales fell .", "label": "negative"}\n'
        '{"sentence": "Sales fell .", "label": "negative"\n'
    )
    assert fails("validate", *bert_args(tiny_bert, str(bad), tmp_path / "run")) == (
        f"dualtune: error: {bad}:3: not valid JSON (Expecting ',' delimiter at column 49)"
    )


def test_missing_local_csv(tiny_bert, tmp_path):
    missing = tmp_path / "nope.csv"
    assert fails("validate", *bert_args(tiny_bert, str(missing), tmp_path / "run")) == (
        f"dualtune: error: data.source {missing}: no such file"
    )


def test_run_input_error_printed_once_and_no_failed_dir(tiny_bert, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "Sales rose .", "label": "positive"}\nnot json\n')
    line = fails("run", *bert_args(tiny_bert, str(bad), tmp_path / "run"), "--backend", "torch")
    assert line == f"dualtune: error: {bad}:2: not valid JSON (Expecting value at column 1)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


# ---------------------------------------------------------------- warnings for the degenerate but legal


def test_inputs_cut_for_most_rows(tiny_bert, fin_data, tmp_path):
    plan = plan_of(*bert_args(tiny_bert, fin_data, tmp_path / "run", "data.max_length=4"))
    warning = next(w for w in plan.warnings if w.startswith("data.max_length 4 cuts"))
    assert warning.startswith("data.max_length 4 cuts the input of 200 of 200 rows (100 %; p50 ")


def test_one_class_in_a_split_and_a_small_eval_split(tiny_bert, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl", [(s, "negative" if i == 0 else "positive") for i, s in enumerate(sentences(40))]
    )
    args = bert_args(tiny_bert, data, tmp_path / "run", "data.train_split=0.9")
    rows = datamap.load_rows(load_recipe(args[0], [a for a in args[1:] if "=" in a]).data)
    _, evaluation = datamap.split_rows(rows, 0.9, 42)
    assert set(evaluation.labels) == {2}  # the single negative row trains (seed 42)
    plan = plan_of(*args)
    assert "the eval split has rows of one class only ('positive')" in plan.warnings
    assert "the eval split has 4 rows: each one moves accuracy by 25 points" in plan.warnings


def test_label_column_mixing_names_and_ids(tiny_bert, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl", [(s, "positive" if i % 2 else i % 3) for i, s in enumerate(sentences(30))]
    )
    plan = plan_of(*bert_args(tiny_bert, data, tmp_path / "run"))
    assert (
        f"{data}: the label column mixes names (15 rows) and ids (15 rows); ids count in data.label_names order"
        in plan.warnings
    )


def test_mixed_labels_without_names_is_an_error(tiny_bert, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl", [(s, "positive" if i % 2 else 0) for i, s in enumerate(sentences(10))]
    )
    with pytest.raises(DataError) as err:
        plan_of(*bert_args(tiny_bert, data, tmp_path / "run", "data.label_names=null", "model.num_labels=2"))
    assert str(err.value) == (
        f"{data}:2: label 'positive' is a name where other rows give ids; set "
        f"data.label_names to say which id is which name"
    )


def test_errors_are_user_errors():
    for cls in (DataError, RecipeError, RunDirError):
        assert issubclass(cls, UserError)


def test_an_error_inside_the_run_is_printed_once(tiny_bert, fin_data, tmp_path):
    """What only the loaded model can tell (no module named 'nope') still comes once, as the last line."""
    proc = dualtune_cli(
        "run",
        *bert_args(tiny_bert, fin_data, tmp_path / "run", "peft.lora.target_modules=[nope]"),
        "--backend",
        "torch",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [
        line
        for line in proc.stderr.splitlines()
        if "No modules were targeted" in line or "run failed" in line or line.startswith("dualtune: error")
    ]
    assert errors == ["dualtune: error: peft.lora: No modules were targeted for adaptation"], proc.stderr[
        -3000:
    ]
    assert errors[0] == proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_csv_not_utf8(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"sentence,label\nSales rose .,positive\nCaf\xe9 sales fell .,negative\n")
    with pytest.raises(DataError) as err:
        datamap.load_rows(
            load_recipe(RECIPES / "minilm_demo.yaml", [f"data.source={bad}", "data.max_rows=null"]).data
        )
    assert str(err.value) == f"{bad}:3: not UTF-8 (byte 0xe9 at offset 40); save the file as UTF-8"


def test_validate_prints_warnings_and_exits_0(tiny_bert, fin_data, tmp_path):
    proc = dualtune_cli(
        "validate", *bert_args(tiny_bert, fin_data, tmp_path / "run", "data.max_length=4", "data.max_rows=30")
    )
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: ")]
    assert any(
        w.startswith("warning: data.max_length 4 cuts the input of 30 of 30 rows (100 %; p50 ")
        for w in warnings
    )
    assert "warning: the eval split has 6 rows: each one moves accuracy by 17 points" in warnings


def test_a_class_missing_from_a_split_warns_with_what_it_does(tiny_bert, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl", [(s, "negative" if i == 0 else "positive") for i, s in enumerate(sentences(40))]
    )
    plan = plan_of(*bert_args(tiny_bert, data, tmp_path / "run", "data.train_split=0.9"))
    assert (
        "the eval split has no rows of 'negative': it has no score; the macro averages leave it out unless "
        "it is predicted (classification_report.json: absent_labels)"
    ) in plan.warnings


@pytest.mark.parametrize("command", ["validate", "run"])
def test_balanced_weights_with_a_class_without_training_rows_is_the_same_line_before_loading(
    tiny_bert, tmp_path, command
):
    """validate refuses what run refuses, with run's own line, before a model loads (no .failed)."""
    data = write_jsonl(
        tmp_path / "d.jsonl", [(s, "negative" if i == 0 else "positive") for i, s in enumerate(sentences(40))]
    )
    args = bert_args(tiny_bert, data, tmp_path / "run", "data.train_split=0.9", "loss.class_weights=balanced")
    line = fails(command, *args, "data.label_names=[negative,neutral,positive]", "--backend", "torch")
    assert line == "dualtune: error: loss.class_weights=balanced: label 'neutral' has no training rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_init_from_an_adapter_of_another_model_or_method_is_one_line_before_loading(
    tiny_bert, tiny_t5, fin_data, tmp_path, command
):
    """peft.init_from gets eval's adapter checks (peft itself failed with a KeyError deep inside),
    and a LoRA rank that differs from the recipe's."""
    adapter = fake_run(tmp_path / "t5", tiny_t5, ["q", "v"], LORA_T5) / "adapter"
    args = [*bert_args(tiny_bert, fin_data, tmp_path / "run"), "--backend", "torch"]
    assert fails(command, *args, f"peft.init_from={adapter}") == (
        f"dualtune: error: {adapter / 'adapter_config.json'}: target modules ['q', 'v'] not found in "
        f"{tiny_bert} (the run's model.name_or_path); the adapter was trained on t5-small: the adapter "
        f"belongs to another model"
    )
    assert fails(command, *args, f"peft.init_from={adapter}", "peft.method=prefix") == (
        f"dualtune: error: {adapter / 'adapter_config.json'}: a lora adapter, but the run's recipe says "
        f"peft.method prefix"
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 4, "target_modules": ["query"]}))
    assert fails(command, *args, f"peft.init_from={adapter}") == (
        f"dualtune: error: peft.init_from {adapter}: a LoRA adapter of rank 4, but peft.lora.r is 8"
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.failed").exists()
