"""``dualtune sweep``: the space file checked against the recipe, pruning and failures across the
process boundary (with a stand-in trial process), and real sweeps on the tiny BERT: continued after
the sweep is killed, best_recipe.yaml reproducing the best trial, two workers on one SQLite file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from dualtune import sweep as sweepmod
from dualtune.errors import RecipeError
from dualtune.recipe import TrainSpec, load_recipe
from dualtune.sweep import workers as sweepworkers
from helpers import RECIPES, REPO, dualtune_cli
from torch_helpers import CLI_ENV

DEMO = RECIPES / "minilm_demo.yaml"
SPACE = RECIPES / "spaces" / "lora_seed001.yaml"
DEMO_SPACE = RECIPES / "spaces" / "minilm_demo.yaml"  # the search that found the demo recipe


def tiny(tiny_bert: str, fin_data: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "train.max_steps=4",
        "train.eval_every=2",
    ]


def sweep_args(out: Path, trials: int, overrides: list[str], *extra: str) -> list[str]:
    return [
        "sweep",
        str(DEMO),
        "--space",
        str(SPACE),
        "--trials",
        str(trials),
        "--out",
        str(out),
        "--backend",
        "torch",
        *overrides,
        *extra,
    ]


def study_trials(out: Path, name: str = "minilm_demo"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}").get_trials()


def write_space(path: Path, params: dict, **top) -> Path:
    path.write_text(yaml.safe_dump({"metric": "f1_macro", "direction": "maximize", "params": params, **top}))
    return path


# ---------------------------------------------------------------- the space file


def test_shipped_space_loads():
    space = sweepmod.load_space(SPACE, DEMO)
    assert (space.metric, space.direction) == ("f1_macro", "maximize")
    assert list(space.params) == ["peft.lora.alpha", "peft.lora.dropout", "peft.lora.r", "optim.lr"]
    assert space.params["peft.lora.alpha"].choices == [16, 32, 64]
    assert space.params["peft.lora.r"].choices == [4, 8, 16, 32]
    lr = space.params["optim.lr"]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-5, 2e-4, False)
    drop = space.params["peft.lora.dropout"]
    assert (drop.kind, drop.low, drop.high) == ("float", 0.0, 0.1)


@pytest.mark.parametrize(
    "params, top, message",
    [
        ({"peft.lora.rank": {"choices": [4, 8]}}, {}, "params: peft.lora.rank: unknown key"),
        (
            {"peft.lora.dropout": {"type": "float", "low": 0.0, "high": 1.5}},
            {},
            "params: peft.lora.dropout: got 1.5",
        ),
        ({"peft.lora.r": {"choices": [4, 0]}}, {}, "params: peft.lora.r: got 0"),
        (
            {"optim.lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}},
            {},
            "params.optim.lr.low: 0.0: a log",
        ),
        (
            {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-4}},
            {},
            "params.optim.lr: low 0.001 must be below",
        ),
        ({"optim.lr": {"type": "gaussian", "low": 1, "high": 2}}, {}, "params.optim.lr.type: got 'gaussian'"),
        ({"optim.lr": {"low": 1e-4, "high": 1e-3}}, {}, "params.optim.lr.type: got None"),
        ({"optim.lr": {"type": "float", "low": 1e-4, "hi": 1e-3}}, {}, "params.optim.lr.hi: unknown key"),
        (
            {"train.batch_size": {"type": "int", "low": 4.5, "high": 8}},
            {},
            "params.train.batch_size.low: got 4.5",
        ),
        ({"optim": {"choices": [1]}}, {}, "params: optim: got 1 (int)"),
        ({"optim.lr": {"choices": [1e-4]}}, {"metric": "bleu"}, "metric: got 'bleu'"),
        ({"optim.lr": {"choices": [1e-4]}}, {"direction": "up"}, "direction: got 'up'"),
        ({"optim.lr": {"choices": [1e-4]}}, {"pruner": {"patience": 2}}, "pruner.patience: unknown key"),
    ],
)
def test_bad_space_is_one_line_naming_the_path(tmp_path, params, top, message):
    space = write_space(tmp_path / "space.yaml", params, **top)
    with pytest.raises(RecipeError) as err:
        sweepmod.load_space(space, DEMO)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_list_choices_reach_the_recipe_as_lists():
    """target_modules lists are categorical choices: Optuna stores each as its JSON text, the trial's
    recipe and best_recipe.yaml get the list back."""
    space = sweepmod.load_space(DEMO_SPACE, DEMO)
    param = space.params["peft.lora.target_modules"]
    assert param.choices == [["query", "value"], ["query", "key", "value", "dense"]]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(8):
        trial = study.ask()
        value = param.suggest(trial)
        assert trial.params[param.key] == json.dumps(value)  # what the storage holds
        assert param.value(trial.params[param.key]) == value
        recipe = load_recipe(DEMO, [sweepmod.override(param.key, value)])
        assert recipe.peft.lora.target_modules == value
        drawn.append(tuple(value))
    assert set(drawn) == {tuple(c) for c in param.choices}


@pytest.mark.parametrize(
    "choices, message",
    [
        ([["query", {"a": 1}]], "choices: ['query', {'a': 1}]: expected numbers, strings, booleans, null"),
        ([[], ["query"]], "choices: []: expected numbers, strings, booleans, null, or non-empty lists"),
        (['["query"]', ["query"]], "repeats a value"),
    ],
)
def test_bad_list_choices(tmp_path, choices, message):
    space = write_space(tmp_path / "space.yaml", {"peft.lora.target_modules": {"choices": choices}})
    with pytest.raises(RecipeError) as err:
        sweepmod.load_space(space, DEMO)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_space_key_cli_exit_2(tmp_path):
    space = write_space(tmp_path / "space.yaml", {"peft.lora.rank": {"choices": [4, 8]}})
    proc = dualtune_cli(
        "sweep", str(DEMO), "--space", str(space), "--trials", "2", "--out", str(tmp_path / "s"), check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dualtune: error: space {space}: params: peft.lora.rank: unknown key"
    ]
    assert not (tmp_path / "s").exists()  # refused before anything was written


# ---------------------------------------------------------------- pruning and failures, stand-in trials

FAKE_TRIAL = """\
import json, os, signal, sys, time
from pathlib import Path
target = Path(sys.argv[1])
number = int(target.name.split("-")[1])
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
if number == 2:
    print("boom: the data went missing", file=sys.stderr)
    sys.exit(1)
part = target.with_name(f"{target.name}.partial-{os.getpid()}")
part.mkdir(parents=True)
value = 0.0 if number == 1 else 0.5 + number / 10
with open(part / "metrics.jsonl", "a") as f:
    for step in range(1, 6):
        f.write(json.dumps({"step": step, "loss": 1.0}) + "\\n")
        f.write(json.dumps({"split": "eval", "step": step, "f1_macro": value}) + "\\n")
        f.flush()
        time.sleep(0.3)
(part / "final_metrics.json").write_text(json.dumps({"f1_macro": value}))
part.rename(target)
"""


def test_pruned_and_failed_trials_across_processes(tmp_path, monkeypatch, capsys):
    """Trial 0 completes (0.5 at every evaluation); trial 1 reports 0.0, below the median, and is
    pruned while it runs (its process is stopped); trial 2 exits 1 and is recorded as failed with
    its last stderr line; the sweep goes on to trial 3 (0.8)."""
    script = tmp_path / "fake_trial.py"
    script.write_text(FAKE_TRIAL)
    monkeypatch.setattr(
        sweepworkers,
        "_run_command",
        lambda sw, params, target, resume: [sys.executable, str(script), str(target)],
    )
    monkeypatch.setattr(sweepworkers, "POLL_S", 0.1)
    space = write_space(
        tmp_path / "space.yaml",
        {
            "peft.lora.r": {"choices": [4, 8]},
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
        pruner={"n_startup_trials": 1},
    )
    sw = sweepmod.make_sweep(str(DEMO), [], str(space), 4, out=str(tmp_path / "s"), seed=3)
    assert sweepmod.sweep(sw) == 0
    trials = study_trials(sw.out)
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert [t.value for t in trials] == [0.5, 0.0, None, pytest.approx(0.8)]
    assert max(trials[1].intermediate_values) < 5  # stopped before its last evaluation
    assert trials[2].user_attrs["error"] == "boom: the data went missing"
    out = capsys.readouterr().out
    assert (
        "sweep: trial 1 pruned: at step 1, f1_macro=0.0000" in out
        and "sweep: trial 2 failed: boom: the data went missing" in out
    )
    assert "best f1_macro=0.8000 (trial 3)" in out
    table = (sw.out / "trials.txt").read_text().splitlines()
    assert table[0].split()[:3] == ["trial", "state", "f1_macro"] and len(table) == 5
    rows = list(__import__("csv").DictReader((sw.out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    best = load_recipe(sw.out / "best_recipe.yaml")
    assert best.peft.lora.r == trials[3].params["peft.lora.r"]
    assert best.optim.lr == trials[3].params["optim.lr"]
    assert best.train.output_dir == TrainSpec.model_fields["output_dir"].default
    assert (sw.out / "history.png").stat().st_size > 0 and (sw.out / "importances.png").stat().st_size > 0
    # Run again with the same command: the study has its 4 trials, nothing more runs.
    assert (
        sweepmod.sweep(sweepmod.make_sweep(str(DEMO), [], str(space), 4, out=str(tmp_path / "s"), seed=3))
        == 0
    )
    assert len(study_trials(sw.out)) == 4
    # Another space in the same sweep directory is refused in one line.
    other = write_space(tmp_path / "other.yaml", {"peft.lora.r": {"choices": [16]}})
    with pytest.raises(sweepmod.SweepError, match="was started with another space"):
        sweepmod.sweep(sweepmod.make_sweep(str(DEMO), [], str(other), 4, out=str(tmp_path / "s")))


# ---------------------------------------------------------------- real sweeps on the tiny BERT


@pytest.mark.slow
def test_sweep_killed_continues_and_best_recipe_reproduces(tiny_bert, fin_data, tmp_path):
    out = tmp_path / "sweep"
    args = sweep_args(out, 3, tiny(tiny_bert, fin_data))
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dualtune.cli", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=CLI_ENV,
            cwd=REPO,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("sweep: trial 0 complete"):
                deadline = time.monotonic() + 300
                while not list(out.glob("trial-001.partial-*")) and time.monotonic() < deadline:
                    time.sleep(0.2)  # trial 1's run has started
                proc.send_signal(signal.SIGKILL)  # killed outright: trial 1 is left RUNNING
                break
        proc.wait(timeout=60)
    assert any(ln.startswith("sweep: trial 0 complete") for ln in lines), (
        "".join(lines) + (tmp_path / "first.err").read_text()
    )
    first = study_trials(out)
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]
    finished_at = (out / "trial-000" / "final_metrics.json").stat().st_mtime_ns

    again = dualtune_cli(*args, env=CLI_ENV)
    assert "1 of 3 trials done, 1 to continue" in again.stdout
    assert "sweep: trial 1: its sweep was stopped; running it again" in again.stdout
    trials = study_trials(out)
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert (out / "trial-000" / "final_metrics.json").stat().st_mtime_ns == finished_at  # not run again
    assert sorted(p.name for p in out.glob("trial-*") if p.is_dir()) == [
        "trial-000",
        "trial-001",
        "trial-002",
    ]
    for name in ("trials.txt", "trials.csv", "best_recipe.yaml", "history.png"):
        assert (out / name).is_file(), name
    assert (out / "importances.png").is_file() or "importances.png not written" in again.stdout

    study = optuna.load_study(study_name="minilm_demo", storage=f"sqlite:///{out / 'optuna.db'}")
    best = study.best_trial
    assert f"sweep: best trial {best.number}: f1_macro={best.value:.4f}" in again.stdout
    rerun = tmp_path / "best-run"
    dualtune_cli(
        "run", str(out / "best_recipe.yaml"), "--output-dir", str(rerun), "--no-progress", env=CLI_ENV
    )
    final = json.loads((rerun / "final_metrics.json").read_text())
    assert final["f1_macro"] == best.value  # same recipe, same seed: the same number


@pytest.mark.slow
def test_two_workers_share_sqlite(tiny_bert, fin_data, tmp_path):
    out = tmp_path / "sweep"
    proc = dualtune_cli(*sweep_args(out, 4, tiny(tiny_bert, fin_data), "--jobs", "2"), env=CLI_ENV)
    trials = study_trials(out)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    done = [ln.split()[2] for ln in proc.stdout.splitlines() if ln.startswith("sweep: trial ")]
    assert sorted(done) == ["0", "1", "2", "3"]  # each trial ran once
    assert len({t.user_attrs["dualtune_owner"]["pid"] for t in trials}) == 2  # by two workers
    assert sorted(p.name for p in out.glob("trial-*") if p.is_dir()) == [f"trial-00{i}" for i in range(4)]
    assert len((out / "trials.csv").read_text().splitlines()) == 5
