"""The resume rules of ``rundir.RunPlan`` on their own (no framework, no run): what a checkpoint
records of its continuation against the recipe and data now. The end-to-end cases, with the CLI's
lines and exit codes, are in test_resume_safety.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualtune import data as datamap
from dualtune.errors import RunDirError
from dualtune.recipe import load_recipe
from dualtune.rundir import RunPlan, continuation, flat_recipe, intact_checkpoint, save_checkpoint
from helpers import RECIPES

RECIPE = RECIPES / "minilm_demo.yaml"


def recipe(*overrides: str):
    return load_recipe(RECIPE, ["data.max_rows=200", "train.epochs=2", *overrides])


def checkpointed(tmp_path: Path, processes: int = 1, step: int = 15) -> RunPlan:
    """A plan resuming a checkpoint at ``step`` written by the recipe on ``processes`` processes."""
    r = recipe()
    data = datamap.fingerprint(datamap.load_rows(r.data), r.data)
    state = {"step": step, "continuation": continuation(r, data, processes), "recipe": flat_recipe(r)}
    source = tmp_path / "run"
    checkpoint = source / "checkpoints" / f"step-{step:07d}"
    return RunPlan(source, False, source, checkpoint, state, data=dict(data))


def test_the_same_run_resumes_and_names_no_change(tmp_path):
    plan = checkpointed(tmp_path)
    plan.check_continuation(recipe(), 1)
    assert plan.changed is None


def test_another_step_batch_is_refused(tmp_path):
    plan = checkpointed(tmp_path)
    with pytest.raises(RunDirError) as err:
        plan.check_continuation(recipe(), 2)
    assert str(err.value) == (
        f"--resume {plan.checkpoint}: a step took 16 x 1 x 1 rows (batch_size x grad_accum_steps x "
        f"processes), now 16 x 1 x 2; resuming would be another run (start afresh: --overwrite or "
        f"another --output-dir)"
    )
    plan.check_continuation(recipe(), None)  # processes not known yet (a launched process 0): later


def test_other_rows_of_the_same_source_are_refused_even_with_processes_unknown(tmp_path):
    plan = checkpointed(tmp_path)
    assert plan.data is not None
    plan.data["eval_indices_sha256"] = "0" * 64
    with pytest.raises(RunDirError, match=r"the data changed since step 15 \(the eval split's rows "):
        plan.check_continuation(recipe(), None)


def test_changes_that_may_happen_are_one_line_from_the_step(tmp_path):
    plan = checkpointed(tmp_path)
    plan.check_continuation(recipe("optim.lr=5e-4", "train.precision=bf16", "train.epochs=3"), 1)
    assert plan.changed == (
        "changed from step 15: optim.lr 0.002 -> 0.0005, train.epochs 2 -> 3, train.precision 'fp32' "
        "-> 'bf16', total steps 20 -> 30 (the schedule's learning rate follows the new total)"
    )


def test_max_steps_below_the_checkpoint_is_refused(tmp_path):
    plan = checkpointed(tmp_path)
    with pytest.raises(RunDirError, match="train.epochs 2 and train.max_steps 12 give 12 steps, below the"):
        plan.check_continuation(recipe("train.max_steps=12"), 1)


def test_every_file_of_a_checkpoint_is_verified(tmp_path):
    import numpy as np

    for step in (3, 6):
        save_checkpoint(tmp_path, step, {"trainable": {"w": np.ones(4, np.float32)}}, {"step": step})
    newest = tmp_path / "checkpoints" / "step-0000006"
    assert intact_checkpoint(tmp_path)[0] == newest
    (newest / "trainable.safetensors").write_bytes(b"\0" * (newest / "trainable.safetensors").stat().st_size)
    path, state, notes = intact_checkpoint(tmp_path)
    assert path.name == "step-0000003" and state["step"] == 3
    assert notes == [
        f"{newest}: damaged (trainable.safetensors changed since it was written (sha256)); resuming "
        f"from step-0000003, the newest intact checkpoint"
    ]


def test_a_key_a_later_version_added_resumes_at_its_default_and_is_refused_at_another_value(tmp_path):
    """A checkpoint of an earlier dualtune lacks keys added since (data.chat_template): at their
    default the run is the one the checkpoint's run was; set otherwise it is another run."""
    from dualtune.errors import RunDirError
    from dualtune.recipe import load_recipe
    from dualtune.rundir import check_resumable, fingerprint

    recipe = load_recipe(RECIPES / "minilm_demo.yaml")
    older = {k: v for k, v in fingerprint(recipe).items() if k != "data.chat_template"}
    check_resumable(older, recipe, tmp_path)
    with pytest.raises(RunDirError, match=r"data.chat_template was None in the checkpoint, now 'none'"):
        check_resumable(
            older, load_recipe(RECIPES / "minilm_demo.yaml", ["data.chat_template=none"]), tmp_path
        )
