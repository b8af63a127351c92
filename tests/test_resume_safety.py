"""A resume continues the run it names or refuses, in one line; damaged checkpoints are passed over;
a run killed while it is being finalised resumes to the files of an uninterrupted run.

End to end through the CLI on the tiny BERT (torch, dropout on), as tests/test_run_safety.py. One
module fixture starts the independent processes at once, in three rounds: the references and the
runs killed at each named instant of finalising (``DUALTUNE_FAULT_AT``); their resumes, the resumes
of damaged or changed copies of the reference; the resume after the data file was edited.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from test_run_safety import RECIPE, Cli, finish, one_error_line, quick, read_json, steps_logged

from dualtune.recipe import load_recipe
from dualtune.schedule import lr_at

pytestmark = pytest.mark.slow

STEPS = 30  # 160 training rows, batch 16: 10 steps an epoch, 3 epochs; checkpoints at 27 and 30 kept
# (one at the last step: a run killed while finalising resumes from it and trains no step)
# instants of finalising, in order (dualtune.rundir.fault_point); best-swap needs a best adapter
FAULTS = ("final-eval", "final-files", "finished-files", "rename")
BEST = ("train.max_steps=12", "train.eval_every=1", "optim.lr=0.5", "train.best_metric=eval_loss")
IGNORED = {"train_seconds", "peak_rss_mb", "resumed"}
SAME_FILES = ("predictions.jsonl", "metrics.jsonl", "adapter/adapter_model.safetensors", "data.json")


def base(tiny_bert: str, data: Path) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.source={data}",
        "data.max_rows=null",
        "train.epochs=3",
        "train.save_every=3",
        "train.eval_every=10",
    ]


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def assert_same_run(run: Path, ref: Path) -> None:
    """The files of ``ref``, uninterrupted: the same names, the same bytes where they are exact."""
    assert files(run) == files(ref)
    for name in SAME_FILES:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    final, expected = read_json(run / "final_metrics.json"), read_json(ref / "final_metrics.json")
    assert {k: v for k, v in final.items() if k not in IGNORED} == {
        k: v for k, v in expected.items() if k not in IGNORED
    }
    assert read_json(run / ".dualtune-run")["status"] == "finished"
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]  # no .partial-*, .failed, .lock


@pytest.fixture(scope="module")
def world(tiny_bert, fin_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume_safety")
    data = root / "fin.jsonl"  # the module's own copy: round 3 edits it
    shutil.copy(fin_data, data)
    cli = Cli(base(tiny_bert, data), root / "logs")
    w: dict = {"root": root}

    # Round 1: the references and the runs killed while being finalised.
    procs = {"ref": cli.run(root / "ref"), "best_ref": cli.run(root / "best_ref", *BEST)}
    for fault in FAULTS:
        procs[fault] = cli.run(root / fault / "run", env={"DUALTUNE_FAULT_AT": fault})
    procs["best-swap"] = cli.run(root / "best-swap" / "run", *BEST, env={"DUALTUNE_FAULT_AT": "best-swap"})
    w["round1"] = {name: finish(proc) for name, proc in procs.items()}
    w["left"] = {name: sorted(p.name for p in (root / name).iterdir()) for name in (*FAULTS, "best-swap")}

    # Round 2: the resumes, and copies of the reference damaged or resumed with a change.
    ref = root / "ref"
    for name in ("fallback", "none_intact", "lr", "fewer_epochs", "data_edited"):
        shutil.copytree(ref, root / name / "run")
    ckpts = root / "fallback" / "run" / "checkpoints"
    w["newest"] = ckpts / "step-0000030"
    trainable = w["newest"] / "trainable.safetensors"
    w["trainable_size"] = trainable.stat().st_size
    with open(trainable, "r+b") as f:
        f.truncate(100)
    damaged = root / "none_intact" / "run" / "checkpoints"
    with open(damaged / "step-0000030" / "trainable.safetensors", "r+b") as f:
        f.truncate(100)
    with open(damaged / "step-0000027" / "optimizer.safetensors", "ab") as f:
        f.write(b"x")
    w["optimizer_size"] = (damaged / "step-0000027" / "optimizer.safetensors").stat().st_size - 1
    procs = {name: cli.run(root / name / "run", "--resume") for name in FAULTS}
    procs["best-swap"] = cli.run(root / "best-swap" / "run", *BEST, "--resume")
    procs["fallback"] = cli.run(root / "fallback" / "run", "--resume")
    procs["lr"] = cli.run(root / "lr" / "run", "optim.lr=5e-4", "train.epochs=4", "--resume")
    for name, change in {"none_intact": (), "fewer_epochs": ("train.epochs=1",)}.items():
        w[name] = quick(*cli.args(root / name / "run", *change, "--resume"))
    w["round2"] = {name: finish(proc) for name, proc in procs.items()}

    # Round 3: the data file edited under the same path (one label and one text changed).
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["label"], rows[1]["sentence"] = rows[1]["label"], rows[1]["sentence"] + " indeed"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w["before_edit"] = files(root / "data_edited" / "run")
    w["data_edited"] = quick(*cli.args(root / "data_edited" / "run", "--resume"))
    return w


def test_the_references(world):
    for name in ("ref", "best_ref"):
        assert world["round1"][name].returncode == 0, world["round1"][name].stderr[-3000:]
    assert steps_logged(world["root"] / "ref" / "metrics.jsonl") == list(range(1, STEPS + 1))
    # the best-swap victim is only a test of the swap if the reference swapped
    assert read_json(world["root"] / "best_ref" / "final_metrics.json")["selected_step"] < 12


@pytest.mark.parametrize("fault", [*FAULTS, "best-swap"])
def test_killed_while_finalising_then_resumed_is_the_uninterrupted_run(world, fault):
    killed = world["round1"][fault]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = world["left"][fault]
    # nothing moved into place: the partial directory, and the lock file kill -9 leaves (not held)
    assert len(left) == 2 and left[0] == ".run.lock" and left[1].startswith("run.partial-"), left
    resumed = world["round2"][fault]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from " in resumed.stderr
    ref = world["root"] / ("best_ref" if fault == "best-swap" else "ref")
    run = world["root"] / fault / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(
        (ref / "metrics.jsonl").read_text().splitlines()
    )  # the final evaluation's line once
    assert_same_run(run, ref)


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_intact_one(world):
    proc = world["round2"]["fallback"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"dualtune: {world['newest']}: damaged (trainable.safetensors is 100 bytes, "
        f"{world['trainable_size']} when written); resuming from step-0000027, the newest intact "
        f"checkpoint" in proc.stderr.splitlines()
    )
    assert ": step 27 of 30 " in proc.stderr
    assert_same_run(world["root"] / "fallback" / "run", world["root"] / "ref")


def test_no_intact_checkpoint_is_one_line(world):
    run = world["root"] / "none_intact" / "run"
    assert one_error_line(world["none_intact"]) == (
        f"dualtune: error: --resume {run}: no intact checkpoint (step-0000030: trainable.safetensors "
        f"is 100 bytes, {world['trainable_size']} when written; step-0000027: optimizer.safetensors is "
        f"{world['optimizer_size'] + 1} bytes, {world['optimizer_size']} when written); start afresh "
        f"with another --output-dir"
    )


def test_fewer_epochs_than_the_checkpoint_is_refused(world):
    run = world["root"] / "fewer_epochs" / "run"
    assert one_error_line(world["fewer_epochs"]) == (
        f"dualtune: error: --resume {run}/checkpoints/step-0000030: train.epochs 1 gives 10 steps, "
        f"below the checkpoint's 30: train.epochs and train.max_steps may only extend a run; resuming "
        f"would be another run (start afresh: --overwrite or another --output-dir)"
    )
    assert read_json(run / "final_metrics.json")["steps"] == STEPS  # untouched


def test_a_changed_learning_rate_is_named_with_its_step_and_the_run_continues(world):
    proc = world["round2"]["lr"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "dualtune: changed from step 30: optim.lr 0.002 -> 0.0005, train.epochs 3 -> 4, total steps "
        "30 -> 40 (the schedule's learning rate follows the new total)" in proc.stderr.splitlines()
    )
    run = world["root"] / "lr" / "run"
    assert steps_logged(run / "metrics.jsonl") == list(range(1, 41))
    rates, ref = step_rates(run), step_rates(world["root"] / "ref")
    schedule = load_recipe(RECIPE).schedule
    assert rates[:STEPS] == ref  # the first 30 steps as they were
    assert rates[STEPS:] == [
        lr_at(step, 5e-4, schedule, 40) for step in range(STEPS, 40)
    ]  # then the new rate


def step_rates(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if "split" not in r]


def test_the_data_edited_under_the_same_path_is_refused(world):
    run = world["root"] / "data_edited" / "run"
    line = one_error_line(world["data_edited"])
    assert line.startswith(
        f"dualtune: error: --resume {run}/checkpoints/step-0000030: the data changed since step 30 "
        f"(the file's sha256 "
    )
    assert line.endswith("resuming would be another run (start afresh: --overwrite or another --output-dir)")
    assert files(run) == world["before_edit"]
