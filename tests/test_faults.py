"""The fault-injection harness: SIGTERM and kill -9 at each named instant of a run (model load, a
step, an evaluation, a checkpoint half written), each case asserting the exit code, the last line,
the files left, and what ``--resume`` makes of them: the uninterrupted run's bytes, or (nothing to
resume) one line that says to start afresh, after which the same command without ``--resume`` gives
those bytes. The instants of finalising are tests/test_resume_safety.py's, a checkpoint of a given
step tests/test_callback_state.py's.

End to end through the CLI on the tiny BERT (torch, dropout off: a resume is bit-identical);
``DUALTUNE_FAULT_AT=POINT:SIGNAL`` (``dualtune.rundir.fault_point``) sends the signal at the point.
"""

from __future__ import annotations

import signal

import pytest
from test_run_safety import Cli, finish

pytestmark = pytest.mark.slow

# 160 rows, 144 training, batch 16: 9 steps an epoch; 12 steps, evaluations at 4 and 8, checkpoints
# every 3 steps and at each evaluation
BASE = (
    "data.max_rows=160",
    "train.max_steps=12",
    "train.eval_every=4",
    "train.save_every=3",
    "train.dropout=false",
)
POINTS = ("model-load", "step-5", "evaluation", "checkpoint-write")
SIGNALS = ("SIGTERM", "SIGKILL")
# the step of the checkpoint a SIGTERM at each point leaves (it finishes the step it is in, or the
# first step, then checkpoints); kill -9 leaves the last checkpoint in place, if any
TERM_STEP = {"model-load": 1, "step-5": 5, "evaluation": 5, "checkpoint-write": 4}
KILL_STEP = {"model-load": None, "step-5": 4, "evaluation": 3, "checkpoint-write": None}
SAME = ("adapter/adapter_model.safetensors", "metrics.jsonl", "predictions.jsonl")


@pytest.fixture(scope="module")
def world(tiny_bert, fin_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    cli = Cli([f"model.name_or_path={tiny_bert}", f"data.source={fin_data}", *BASE], root / "logs")
    procs = {"ref": cli.run(root / "ref")}
    for point in POINTS:
        for sig in SIGNALS:
            procs[(point, sig)] = cli.run(
                root / f"{point}-{sig}", env={"DUALTUNE_FAULT_AT": f"{point}:{sig}"}
            )
    w: dict = {"root": root, "cli": cli, "stopped": {k: finish(p) for k, p in procs.items()}}
    w["left"] = {
        k: sorted(p.name for p in root.iterdir() if p.name.startswith(f"{k[0]}-{k[1]}."))
        for k in procs
        if k != "ref"
    }
    resumes = {k: cli.run(root / f"{k[0]}-{k[1]}", "--resume") for k in procs if k != "ref"}
    w["resumed"] = {k: finish(p) for k, p in resumes.items()}
    afresh = {k: cli.run(root / f"{k[0]}-{k[1]}") for k, p in w["resumed"].items() if p.returncode != 0}
    w["afresh"] = {k: finish(p) for k, p in afresh.items()}
    return w


def test_the_reference_run(world):
    assert world["stopped"]["ref"].returncode == 0, world["stopped"]["ref"].stderr[-3000:]


@pytest.mark.parametrize("point", POINTS)
def test_sigterm_checkpoints_says_where_and_resumes_to_the_same_bytes(world, point):
    root, stopped = world["root"], world["stopped"][(point, "SIGTERM")]
    step = TERM_STEP[point]
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    failed = root / f"{point}-SIGTERM.failed"
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"dualtune: stopped by SIGTERM after step {step}; checkpoint {failed / 'checkpoints' / f'step-{step:07d}'}; "
        "continue with the same command and --resume"
    )
    assert world["left"][(point, "SIGTERM")] == [f"{point}-SIGTERM.failed"]
    resumed = world["resumed"][(point, "SIGTERM")]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in SAME:
        assert (root / f"{point}-SIGTERM" / name).read_bytes() == (root / "ref" / name).read_bytes(), name
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(f"{point}-SIGTERM")) == [
        f"{point}-SIGTERM"
    ]


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_leaves_the_partial_run_and_resume_or_a_fresh_start_gives_the_same_bytes(world, point):
    root, stopped = world["root"], world["stopped"][(point, "SIGKILL")]
    run = root / f"{point}-SIGKILL"
    assert stopped.returncode == -signal.SIGKILL
    (left,) = world["left"][(point, "SIGKILL")]
    assert left.startswith(f"{point}-SIGKILL.partial-")
    resumed = world["resumed"][(point, "SIGKILL")]
    if KILL_STEP[point] is None:  # killed before its first checkpoint: nothing to resume
        assert resumed.returncode == 2 and resumed.stderr.strip().splitlines() == [
            f"dualtune: error: --resume: no unfinished run of {run} with a checkpoint (looked for "
            f"{run.name}.failed and {run.name}.partial-*); the same command without --resume starts it afresh"
        ]
        assert world["afresh"][(point, "SIGKILL")].returncode == 0
    else:
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming from {run}" in resumed.stderr and f"step {KILL_STEP[point]} of 12" in resumed.stderr
    for name in SAME:
        assert (run / name).read_bytes() == (root / "ref" / name).read_bytes(), name
