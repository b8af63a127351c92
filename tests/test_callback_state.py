"""Callbacks keep their state across a resume: every checkpoint holds each stateful callback's
``state_dict()`` and ``--resume`` hands it back, so a run killed with kill -9 and resumed behaves
as the uninterrupted one. Early stopping stops at the same step with the same adapter; the
trackers continue their own runs (one MLflow run, one W&B id) whose history is metrics.jsonl's.

End to end through the CLI on the tiny BERT (torch), killed at an exact instant: right after the
checkpoint of a given step (``DUALTUNE_FAULT_AT=checkpoint-N``, ``dualtune.rundir.fault_point``).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from test_run_safety import Cli, finish, read_json
from test_tracking import ALL, check_all_trackers, clean_env, mlflow_run

from dualtune.callbacks import Callback, CallbackList, EarlyStopping

pytestmark = pytest.mark.slow

# lr 0.5 with an evaluation every step: eval_loss falls for a few steps, then rises (measured);
# patience 2, so the run passes one evaluation that did not improve before it stops
EARLY = (
    "train.max_steps=20",
    "train.eval_every=1",
    "optim.lr=0.5",
    "train.best_metric=eval_loss",
    "train.early_stopping_patience=2",
    "train.save_every=null",
    "train.dropout=false",
)


def evals(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("split") == "eval"]


def first_miss(run: Path) -> int:
    """The step of the first in-loop evaluation that did not improve on the best before it."""
    best = None
    for record in evals(run)[:-1]:  # the last line is the final evaluation
        if best is not None and record["eval_loss"] >= best:
            return record["step"]
        best = record["eval_loss"] if best is None else min(best, record["eval_loss"])
    raise AssertionError("every evaluation improved: no stopping to test")


@pytest.fixture(scope="module")
def world(tiny_bert, fin_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("callback_state")
    base = [f"model.name_or_path={tiny_bert}", f"data.source={fin_data}", "data.max_rows=null"]
    cli = Cli(base, root / "logs")
    w: dict = {"root": root}
    tracked = [
        "train.max_steps=4",
        "train.eval_every=2",
        "train.save_every=1",
        ALL,
    ]
    # Round 1: the early-stopping reference, and a tracked run killed after its step-2 checkpoint
    # (the trackers have steps 1 and 2 and the evaluation at 2).
    procs = {
        "early_ref": cli.run(root / "early_ref", *EARLY),
        "tracked": cli.run(
            root / "tracked" / "run", *tracked, env={**clean_env(), "DUALTUNE_FAULT_AT": "checkpoint-2"}
        ),
    }
    w["round1"] = {name: finish(proc) for name, proc in procs.items()}
    assert w["round1"]["early_ref"].returncode == 0, w["round1"]["early_ref"].stderr[-3000:]
    # Round 2: the early-stopping run killed right after the checkpoint that holds its one miss
    # (its patience count is 1 there), and the tracked run resumed.
    w["miss"] = first_miss(root / "early_ref")
    procs = {
        "early": cli.run(root / "early", *EARLY, env={"DUALTUNE_FAULT_AT": f"checkpoint-{w['miss']}"}),
        "tracked": cli.run(root / "tracked" / "run", *tracked, "--resume", env=clean_env()),
    }
    w["round2"] = {name: finish(proc) for name, proc in procs.items()}
    # Round 3: the early-stopping run resumed.
    w["round3"] = {"early": finish(cli.run(root / "early", *EARLY, "--resume"))}
    return w


def test_a_resumed_run_stops_early_where_the_uninterrupted_one_did(world):
    root = world["root"]
    killed = world["round2"]["early"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = world["round3"]["early"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from " in resumed.stderr
    ref, run = (
        read_json(root / "early_ref" / "final_metrics.json"),
        read_json(root / "early" / "final_metrics.json"),
    )
    assert ref["stopped_early"] is True and ref["steps"] > world["miss"]  # the kill came before the stop
    assert (run["steps"], run["selected_step"], run["stopped_early"]) == (
        ref["steps"],
        ref["selected_step"],
        True,
    )
    for name in ("adapter/adapter_model.safetensors", "metrics.jsonl", "predictions.jsonl"):
        assert (root / "early" / name).read_bytes() == (root / "early_ref" / name).read_bytes(), name


def test_a_resumed_run_continues_its_own_tracker_runs(world):
    killed = world["round1"]["tracked"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = world["round2"]["tracked"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = world["root"] / "tracked" / "run"
    assert "mlflow: continuing run " in resumed.stderr
    # one MLflow run (mlflow_run unpacks exactly one) and one W&B id over the two processes;
    # TensorBoard's and MLflow's histories are metrics.jsonl's, each step once (check_all_trackers).
    # W&B's from the resume on: its service had not written steps 1-2 to disk when kill -9 came.
    _, mlflow = mlflow_run(run, "minilm_demo")
    assert mlflow.data.tags.get("dualtune.resumed_at_step_2") == "true"
    ids = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    check_all_trackers(run, "torch", wandb_from=3)
    # environment.json: one entry per process that trained the run, the resume's from its step
    assert [e["from_step"] for e in read_json(run / "environment.json")["runs"]] == [0, 2]


class Counter(Callback):
    def __init__(self, key: str = ""):
        self.n, self.key = 0, key

    @property
    def state_key(self) -> str:
        return self.key or super().state_key

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def test_callback_states_round_trip_by_key():
    stop = EarlyStopping("eval_loss", 3)
    stop.best, stop.bad = 0.25, 2
    a, b = Counter("a"), Counter("b")
    a.n, b.n = 5, 7
    states = json.loads(json.dumps(CallbackList([stop, a, b, Callback()]).state_dict()))
    assert states == {
        "EarlyStopping": {"metric": "eval_loss", "best": 0.25, "bad": 2},
        "a": {"n": 5},
        "b": {"n": 7},
    }
    fresh = [EarlyStopping("eval_loss", 3), Counter("a"), Counter("b")]
    CallbackList(fresh).load_state_dict(states)
    assert (fresh[0].best, fresh[0].bad, fresh[1].n, fresh[2].n) == (0.25, 2, 5, 7)
    other_metric = EarlyStopping("accuracy", 3)  # best_metric changed on resume: counting starts afresh
    other_metric.load_state_dict(states["EarlyStopping"])
    assert (other_metric.best, other_metric.bad) == (None, 0)
    with pytest.raises(ValueError, match="two callbacks keep their state under 'Counter'"):
        CallbackList([Counter(), Counter()]).state_dict()
