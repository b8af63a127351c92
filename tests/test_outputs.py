"""Nothing of the user's is ever removed or replaced unasked, by any command that writes: a run's
``--overwrite`` replaces only the files its run wrote; ``synthetic-data``, ``tiny`` and ``report
--plot`` refuse to clobber; ``report`` over a glob reports the finished runs and names the rest.
And the recipe values that used to end in a traceback are one line (each exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import RECIPES
from torch_helpers import CLI_ENV, REPO

RECIPE = str(RECIPES / "minilm_demo.yaml")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dualtune.cli", *args],
        capture_output=True,
        text=True,
        env=CLI_ENV,
        cwd=REPO,
        timeout=600,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("dualtune: error: ")
    return lines[0][len("dualtune: error: ") :]


@pytest.fixture(scope="module")
def finished(tiny_bert, fin_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    args = [
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "train.max_steps=2",
        "--no-progress",
    ]
    run = root / "run"
    proc = cli("run", RECIPE, "--backend", "torch", "--output-dir", str(run), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, args


def test_overwrite_replaces_only_what_the_run_wrote(finished, tmp_path):
    import shutil

    run, args = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = json.loads((copy / ".dualtune-run").read_text())
    assert "metrics.jsonl" in marker["files"] and "adapter" in marker["files"]
    (copy / "NOTES.txt").write_text("mine")
    before = sorted(p.name for p in copy.iterdir())
    line = error_line(
        cli("run", RECIPE, "--backend", "torch", "--output-dir", str(copy), "--overwrite", *args)
    )
    assert line == (
        f"{copy}: holds files its run did not write (NOTES.txt); --overwrite replaces only a run's own "
        f"files: move them out, or choose a free --output-dir, e.g. {copy}-2"
    )
    assert sorted(p.name for p in copy.iterdir()) == before and (copy / "NOTES.txt").read_text() == "mine"
    (copy / "NOTES.txt").unlink()
    (copy / "eval").mkdir()  # what dualtune eval adds is the run's own
    proc = cli("run", RECIPE, "--backend", "torch", "--output-dir", str(copy), "--overwrite", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (copy / "eval").exists()


def test_commands_that_write_a_file_or_folder_never_clobber(finished, tmp_path):
    run, _ = finished
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my data\n")
    assert error_line(cli("synthetic-data", str(mine), "--rows", "5")) == (
        f"{mine}: exists; dualtune replaces a file only with --overwrite, or choose another name"
    )
    assert mine.read_text() == "my data\n"
    assert (
        error_line(cli("synthetic-data", str(tmp_path / "x.txt")))
        == f"{tmp_path / 'x.txt'}: expected a file ending in .jsonl"
    )
    assert cli("synthetic-data", str(mine), "--rows", "5", "--overwrite").returncode == 0
    assert len(mine.read_text().splitlines()) == 5

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert error_line(cli("tiny", "bert", str(folder), "--backend", "torch")) == (
        f"{folder}: holds files dualtune did not write (notes.txt), which it never touches; choose another folder"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]

    plot = tmp_path / "curves.png"
    plot.write_bytes(b"not ours")
    assert error_line(cli("report", str(run), "--plot", str(plot))) == (
        f"{plot}: exists; dualtune replaces a file only with --overwrite, or choose another name"
    )
    assert plot.read_bytes() == b"not ours"
    assert (
        error_line(cli("report", str(run), "--plot", str(tmp_path / "c.txt")))
        == f"{tmp_path / 'c.txt'}: expected a file ending in .png"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "curves.png",
        "mine.jsonl",
        "model",
    ]  # nothing half-written


def test_report_over_a_glob_reports_the_finished_runs_and_names_the_rest(finished, tmp_path):
    run, _ = finished
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    proc = cli("report", str(run), str(unfinished))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[0] == run.name and len(proc.stdout.splitlines()) == 2
    assert proc.stderr.strip().splitlines() == [
        f"dualtune: skipped {unfinished}: not a finished run (no final_metrics.json)"
    ]
    assert error_line(cli("report", str(unfinished))) == (
        f"no finished run to report: {unfinished}: not a finished run (no final_metrics.json)"
    )


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "optim.betas=[1.5,0.9]",
            "optim.betas: got [1.5, 0.9], expected two numbers each in [0, 1) (AdamW's moment decays)",
        ),
        (
            "optim.betas=[0.9,1]",
            "optim.betas: got [0.9, 1.0], expected two numbers each in [0, 1) (AdamW's moment decays)",
        ),
        ("optim.lr=1e300", "optim.lr: got 1e+300, expected a number float32 can hold (at most 3.4e38)"),
        (
            "optim.lr=1e38",
            "optim: lr 1e+38 with betas[0] 0.9: AdamW's first step size lr / (1 - betas[0]) = 1e+39 overflows "
            "float32; lower optim.lr",
        ),
        (
            "train.output_dir=runs/{nope}",
            "train.output_dir: got 'runs/{nope}': {nope} is not a field it fills in; expected {recipe} and {backend} only",
        ),
        (
            "train.output_dir=runs/{recipe",
            "train.output_dir: got 'runs/{recipe': expected '}' before end of string (a literal brace is written {{ or }})",
        ),
    ],
)
def test_values_that_were_tracebacks_are_one_line(override, line, tmp_path):
    from dualtune.errors import RecipeError
    from dualtune.recipe import load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, [override])
    assert str(err.value) == line


def test_init_from_an_adapter_whose_tensors_differ_is_one_line(finished, tmp_path):
    """Same model and rank, other target modules: only the run can see it (peft failed with a KeyError)."""
    run, args = finished
    proc = cli(
        "run", RECIPE, "--backend", "torch", "--output-dir", str(tmp_path / "r"), *args,
        f"peft.init_from={run / 'adapter'}", "peft.lora.target_modules=[query]",
    )  # fmt: skip
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith(
        f"dualtune: error: {run / 'adapter'}: not a lora adapter of this model: its tensors and this model's differ (e.g. "
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_eval_refuses_a_run_whose_data_changed(finished, fin_data, tmp_path):
    """eval reads the recipe's data again: edited under the same path, it would score another split."""
    import shutil

    import yaml

    run, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = tmp_path / "fin.jsonl"
    shutil.copy(fin_data, data)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["data"]["source"] = str(data)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    saved = json.loads((copy / "data.json").read_text())
    (copy / "data.json").write_text(json.dumps({**saved, "source": str(data)}))
    assert cli("eval", str(copy), "--backend", "torch").returncode == 0
    lines = data.read_text().splitlines()
    row = json.loads(lines[0])
    row["sentence"] += " indeed"
    data.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    line = error_line(cli("eval", str(copy), "--backend", "torch"))
    assert line.startswith(f"{copy}: its data changed since the run (the file's sha256 ")
    assert line.endswith(
        f"eval would score another eval split: restore {data} as it was, or train a new run on the new data"
    )
