"""Run safety and resume, end to end through the CLI on the tiny BERT (torch, dropout on).

Runs killed by SIGKILL, SIGTERM and SIGINT, then continued with ``--resume``, write the same bytes as
an uninterrupted run; a checkpoint cut mid-write is never read; a resume with a changed recipe is
refused; dualtune never touches an output path that is not its own run; ``eval``/``predict`` refuse an
unfinished run; early stopping keeps the best step's adapter.

The runs are slow on a shared 2-core machine, so one module fixture starts every independent
process at once (one thread each) in three rounds: the reference and the runs to interrupt; the
quick refusals on what they left; then the resumes and the other runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from torch_helpers import CLI_ENV, RECIPES, REPO, cli_command

pytestmark = pytest.mark.slow

RECIPE = str(RECIPES / "minilm_demo.yaml")
STEPS = 60  # 160 training rows, batch 16: 10 steps an epoch, 6 epochs (about 25 ms a step here)
IGNORED = {
    "train_seconds",
    "peak_rss_mb",
    "resumed",
}  # what may differ between a resumed run and the reference
SAME_FILES = ("predictions.jsonl", "metrics.jsonl", "adapter/adapter_model.safetensors")
ONE_LINE_TIMEOUT = 60  # a refusal before any framework loads takes a few seconds even on a busy machine


def overrides(tiny_bert: str, fin_data: str) -> list[str]:
    # dropout on (LoRA dropout 0.1 and BERT's own), as by default; checkpoints every 3 steps (the
    # newest 2 kept), evaluations inside the loop, epochs to cross
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "train.epochs=6",
        "train.save_every=3",
        "train.eval_every=10",
    ]


class Cli:
    """``dualtune run`` processes started in the background, stderr kept in a file."""

    def __init__(self, base: list[str], logs: Path):
        self.base, self.logs = base, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def start(self, *args: str, umask: int | None = None, env: dict | None = None) -> subprocess.Popen:
        self.n += 1
        err = open(self.logs / f"{self.n}.stderr", "w+")
        preexec = (lambda: os.umask(umask)) if umask is not None else None
        proc = subprocess.Popen(
            cli_command(*args),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            env={**CLI_ENV, **(env or {})},
            cwd=REPO,
            preexec_fn=preexec,
        )
        proc.err_file = err
        return proc

    def args(self, out: Path, *extra: str) -> list[str]:
        """``dualtune run`` of the recipe into ``out``, with the base overrides and ``extra``."""
        return [
            "run",
            RECIPE,
            "--backend",
            "torch",
            "--output-dir",
            str(out),
            "--no-progress",
            *self.base,
            *extra,
        ]

    def run(
        self, out: Path, *extra: str, umask: int | None = None, env: dict | None = None
    ) -> subprocess.Popen:
        return self.start(*self.args(out, *extra), umask=umask, env=env)


def finish(proc: subprocess.Popen, timeout: float = 900) -> subprocess.CompletedProcess:
    proc.wait(timeout=timeout)
    proc.err_file.seek(0)
    stderr = proc.err_file.read()
    proc.err_file.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


def quick(*args: str) -> subprocess.CompletedProcess:
    """A command expected to refuse at once: exit 2 and one line, before any framework loads."""
    started = time.perf_counter()
    proc = subprocess.run(
        cli_command(*args), capture_output=True, text=True, env=CLI_ENV, cwd=REPO, timeout=ONE_LINE_TIMEOUT
    )
    proc.seconds = time.perf_counter() - started
    return proc


def steps_logged(metrics: Path) -> list[int]:
    steps = []
    try:
        text = metrics.read_text()
    except OSError:
        return steps
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "split" not in record:
            steps.append(record["step"])
    return steps


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 600) -> None:
    """Until the run's ``<out>.partial-PID/metrics.jsonl`` logs ``step``."""
    metrics = out.with_name(f"{out.name}.partial-{proc.pid}") / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while max(steps_logged(metrics), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before step {step}:\n{finish(proc).stderr[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no step {step} in {metrics} after {timeout} s")
        time.sleep(0.01)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("dualtune: error: "), proc.stderr[-3000:]
    return lines[0]


def assert_same_run(run: Path, ref: Path) -> None:
    for name in SAME_FILES:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    final, expected = read_json(run / "final_metrics.json"), read_json(ref / "final_metrics.json")
    assert final["resumed"] is True and expected["resumed"] is False
    assert {k: v for k, v in final.items() if k not in IGNORED} == {
        k: v for k, v in expected.items() if k not in IGNORED
    }
    assert read_json(run / ".dualtune-run")["status"] == "finished"
    assert not [
        p.name for p in run.parent.iterdir() if p.name.startswith((f"{run.name}.", f".{run.name}."))
    ], sorted(p.name for p in run.parent.iterdir())  # no .failed, .partial-*, .lock left


# ---------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def world(tiny_bert, fin_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("run_safety")
    cli = Cli(overrides(tiny_bert, fin_data), root / "logs")
    w: dict = {"root": root, "cli": cli}
    runs = root / "runs"
    runs.mkdir()

    # Round 1: the reference, the runs to interrupt, the early-stopping run, all at once.
    ref = runs / "ref"
    procs = {"ref": cli.run(ref)}
    victims = {  # name -> (signal, after which logged step), in step order: they run side by side
        "kill_a": (signal.SIGKILL, 5),
        "term": (signal.SIGTERM, 12),
        "kill_b": (signal.SIGKILL, 27),
        "int": (signal.SIGINT, 33),
    }
    for name in victims:
        procs[name] = cli.run(runs / name)
    # lr 0.5 with an evaluation every step: eval_loss falls for a few steps, then rises (measured)
    procs["early"] = cli.run(
        runs / "early",
        "train.max_steps=12",
        "train.eval_every=1",
        "optim.lr=0.5",
        "train.best_metric=eval_loss",
        "train.early_stopping_patience=1",
        "train.save_every=null",
    )
    # Watch all victims at once: waiting for one after another lets a later one run past its step
    # (on a quiet machine the whole run takes 4 s) and finish before its signal.
    pending = dict(victims)
    deadline = time.monotonic() + 600
    while pending:
        for name, (sig, step) in list(pending.items()):
            metrics = runs / f"{name}.partial-{procs[name].pid}" / "metrics.jsonl"
            if max(steps_logged(metrics), default=0) >= step:
                os.kill(procs[name].pid, sig)
                w[f"{name}_pid"] = procs[name].pid
                del pending[name]
            elif procs[name].poll() is not None:
                raise AssertionError(f"{name} ended (exit {procs[name].returncode}) before step {step}")
        assert time.monotonic() < deadline, f"no signal step reached by {sorted(pending)}"
        time.sleep(0.005)
    w["round1"] = {name: finish(proc) for name, proc in procs.items()}
    w["leftovers"] = {
        name: sorted(p.name for p in runs.iterdir() if p.name.startswith(f"{name}.")) for name in victims
    }

    # Round 2: quick refusals on what they left, and a checkpoint cut mid-write.
    w["new_next_to_partial"] = quick(
        "run", RECIPE, "--backend", "torch", "--output-dir", str(runs / "kill_a"), *cli.base
    )
    w["new_next_to_failed"] = quick(
        "run", RECIPE, "--backend", "torch", "--output-dir", str(runs / "term"), *cli.base
    )
    failed = runs / "term.failed"
    w["eval_failed"] = quick("eval", str(failed))
    w["predict_failed"] = quick("predict", str(failed), "Sales rose .")
    w["term_failed_copy"] = root / "copies" / "term.failed"
    shutil.copytree(failed, w["term_failed_copy"])
    partial = runs / f"kill_a.partial-{w['kill_a_pid']}"
    ckpts = partial / "checkpoints"
    w["kill_a_checkpoints"] = sorted(p.name for p in ckpts.iterdir())
    last = max(int(name.rsplit("-", 1)[1]) for name in w["kill_a_checkpoints"])
    w["kill_a_last"] = last
    # what kill -9 leaves inside save_checkpoint: the aside folder, half written ...
    cut = ckpts / f".tmp-step-{last + 3:07d}-{w['kill_a_pid']}"
    cut.mkdir()
    (cut / "trainable.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    # ... and a newer step folder without its state.json (renamed before the state landed)
    cut2 = ckpts / f"step-{last + 6:07d}"
    cut2.mkdir()
    shutil.copy(ckpts / f"step-{last:07d}" / "trainable.safetensors", cut2 / "trainable.safetensors")
    (cut2 / "optimizer.safetensors").write_bytes(b"\x00" * 7)

    # copies of the finished reference for the runs that continue or replace it
    for name in ("extend_steps", "extend_epochs", "batch", "model", "method", "overwrite"):
        shutil.copytree(ref, root / name / "run")
    other_model = root / "tiny-bert-elsewhere"
    shutil.copytree(tiny_bert, other_model)
    w["eval_ckpt"] = sorted((w["term_failed_copy"] / "checkpoints").glob("step-*"))[-1]
    w["refused"] = {}
    for name, change in {
        "batch": "train.batch_size=8",
        "model": f"model.name_or_path={other_model}",
        "method": "peft.method=ia3",
    }.items():
        run = root / name / "run"
        before = tree(run)
        w["refused"][name] = quick(
            "run",
            RECIPE,
            "--backend",
            "torch",
            "--output-dir",
            str(run),
            "--no-progress",
            *cli.base,
            change,
            "--resume",
        )
        w["refused"][name].untouched = tree(run) == before

    # Round 3: the resumes, the extensions, the refused resumes, eval --checkpoint, --overwrite.
    procs = {
        "kill_a": cli.run(runs / "kill_a", "--resume"),  # plain --resume finds the stale .partial-PID
        "kill_b": cli.run(runs / "kill_b", "--resume", str(runs / f"kill_b.partial-{w['kill_b_pid']}")),
        "term": cli.run(runs / "term", "--resume"),
        "int": cli.run(runs / "int", "--resume", str(runs / "int.failed")),
        "extend_steps": cli.run(
            root / "extend_steps" / "run", "train.epochs=7", "train.max_steps=65", "--resume"
        ),
        "extend_epochs": cli.run(root / "extend_epochs" / "run", "train.epochs=7", "--resume"),
        "eval_ckpt": cli.start("eval", str(w["term_failed_copy"]), "--checkpoint", str(w["eval_ckpt"])),
    }
    over = root / "overwrite" / "run"
    w["overwrite_before"] = read_json(over / ".dualtune-run")
    # long enough (200 steps) for a second run to try the same directory meanwhile
    procs["overwrite"] = cli.run(over, "train.epochs=20", "--overwrite", umask=0o022)
    wait_for_step(procs["overwrite"], over, 1)
    w["concurrent"] = quick(
        "run", RECIPE, "--backend", "torch", "--output-dir", str(over), "--overwrite", *cli.base
    )
    w["concurrent_while_running"] = procs["overwrite"].poll() is None
    w["overwrite_pid"] = procs["overwrite"].pid
    w["round3"] = {name: finish(proc) for name, proc in procs.items()}
    w["runs"], w["ref"] = runs, ref
    return w


# ---------------------------------------------------------------- 1. interrupted runs resume exactly


def test_reference_run(world):
    assert world["round1"]["ref"].returncode == 0, world["round1"]["ref"].stderr[-3000:]
    final = read_json(world["ref"] / "final_metrics.json")
    assert final["steps"] == STEPS and final["resumed"] is False
    assert steps_logged(world["ref"] / "metrics.jsonl") == list(range(1, STEPS + 1))


@pytest.mark.parametrize("name", ["kill_a", "kill_b"])
def test_sigkill_then_resume_is_identical(world, name):
    assert world["round1"][name].returncode == -signal.SIGKILL
    pid = world[f"{name}_pid"]
    assert world["leftovers"][name] == [f"{name}.partial-{pid}"]  # only what the process was writing
    resumed = world["round3"][name]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert_same_run(world["runs"] / name, world["ref"])


def test_a_checkpoint_cut_mid_write_is_never_read(world):
    # kill_a was killed after step 5 (checkpoints every 3 steps); round 2 added a cut .tmp-step
    # folder and a newer step folder without state.json, which resume must pass over
    last = world["kill_a_last"]
    assert 3 <= last < STEPS and world["kill_a_checkpoints"][-1] == f"step-{last:07d}"
    resumed = world["round3"]["kill_a"].stderr
    assert f"checkpoints/step-{last:07d}: step {last} of {STEPS}" in resumed
    assert_same_run(world["runs"] / "kill_a", world["ref"])  # the folder without state was replaced, not read
    assert not list((world["runs"] / "kill_a" / "checkpoints").glob(".tmp-*"))  # the cut one was cleared


def test_new_run_next_to_a_resumable_leftover_is_refused(world):
    partial = world["runs"] / f"kill_a.partial-{world['kill_a_pid']}"
    line = one_error_line(world["new_next_to_partial"])
    assert f"{partial}: an unfinished run of this output" in line and "--resume" in line
    line = one_error_line(world["new_next_to_failed"])
    assert f"{world['runs'] / 'term.failed'}: an unfinished run of this output" in line and "--resume" in line


@pytest.mark.parametrize("name,status", [("term", 143), ("int", 130)])
def test_signal_checkpoints_exits_and_resumes_identically(world, name, status):
    stopped = world["round1"][name]
    assert stopped.returncode == status, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dualtune: stopped by {'SIGTERM' if name == 'term' else 'SIGINT'} after step ")
    assert last.endswith("continue with the same command and --resume")
    assert f"checkpoint {world['runs'] / (name + '.failed')}/checkpoints/step-" in last
    assert world["leftovers"][name] == [f"{name}.failed"]
    resumed = world["round3"][name]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(world["runs"] / name, world["ref"])


def test_interrupted_run_is_marked_with_its_step(world):
    marker = read_json(world["term_failed_copy"] / ".dualtune-run")
    stopped_at = int(world["round1"]["term"].stderr.split("after step ")[1].split(";")[0])
    assert marker["status"] == "interrupted" and marker["step"] == stopped_at
    assert (world["term_failed_copy"] / "checkpoints" / f"step-{stopped_at:07d}" / "state.json").is_file()


# ---------------------------------------------------------------- 2. recipe changes on resume


@pytest.mark.parametrize(
    "name,key", [("batch", "train.batch_size"), ("model", "model.name_or_path"), ("method", "peft.method")]
)
def test_resume_with_a_changed_recipe_is_refused(world, name, key):
    proc = world["refused"][name]
    line = one_error_line(proc)  # before any framework loads
    assert line.startswith("dualtune: error: --resume ") and f": {key} was " in line
    assert "resuming would mix two runs" in line
    run = world["root"] / name / "run"
    assert proc.untouched  # the run is as it was
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]


@pytest.mark.parametrize("name", ["extend_steps", "extend_epochs"])
def test_more_steps_or_epochs_extend_a_finished_run(world, name):
    proc = world["round3"][name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = world["root"] / name / "run"
    final = read_json(run / "final_metrics.json")
    steps = {"extend_steps": 65, "extend_epochs": 70}[name]
    assert final["steps"] == steps and final["resumed"] is True and final["stopped_early"] is False
    assert steps_logged(run / "metrics.jsonl") == list(range(1, steps + 1))
    ref_lines = (world["ref"] / "metrics.jsonl").read_text().splitlines()
    assert (run / "metrics.jsonl").read_text().splitlines()[
        : len(ref_lines)
    ] == ref_lines  # the first 60 kept
    assert f": step {STEPS} of " in proc.stderr  # resumed from the last checkpoint, not from scratch
    assert read_json(run / ".dualtune-run")["status"] == "finished"
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]


# ---------------------------------------------------------------- 3. output safety


def test_a_folder_with_foreign_files_is_never_touched(world, tiny_bert, fin_data, tmp_path):
    cases = {}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes\n")
    cases["foreign"] = foreign
    parent = tmp_path / "runs"
    shutil.copytree(world["ref"], parent / "minilm_demo-torch")  # the parent of earlier runs
    cases["parent"] = parent
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(fin_data, data_dir / "fin.jsonl")
    cases["data"] = data_dir
    for name, path in cases.items():
        before = tree(path)
        source = data_dir / "fin.jsonl" if name == "data" else fin_data
        proc = quick(
            "run",
            RECIPE,
            "--backend",
            "torch",
            "--output-dir",
            str(path),
            f"model.name_or_path={tiny_bert}",
            f"data.source={source}",
            "data.max_rows=null",
            "train.max_steps=2",
            "--overwrite",
        )  # --overwrite replaces only dualtune's own runs
        line = one_error_line(proc)
        assert line == (
            f"dualtune: error: {path}: exists and holds files dualtune did not write, which it "
            f"never touches; choose a free --output-dir, e.g. {path}-2"
        ), name
        assert proc.seconds < ONE_LINE_TIMEOUT
        assert tree(path) == before, name
        assert not [
            p
            for p in path.parent.iterdir()
            if ".partial-" in p.name or p.name.endswith(".failed") or p.name.endswith(".lock")
        ], name


def test_a_file_at_the_path_is_refused(world, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder\n")
    line = one_error_line(
        quick(
            "run",
            RECIPE,
            "--backend",
            "torch",
            "--output-dir",
            str(target),
            *world["cli"].base,
            "--overwrite",
        )
    )
    assert line.startswith(f"dualtune: error: {target}: a file is in the way of the run directory")
    assert target.read_text() == "not a folder\n"


def test_a_finished_run_is_replaced_only_with_overwrite(world):
    line = one_error_line(
        quick("run", RECIPE, "--backend", "torch", "--output-dir", str(world["ref"]), *world["cli"].base)
    )
    assert line.startswith(
        f"dualtune: error: {world['ref']}: holds a finished run; add --overwrite to replace it"
    )
    proc = world["round3"]["overwrite"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = world["root"] / "overwrite" / "run"
    marker = read_json(run / ".dualtune-run")
    assert (
        marker["status"] == "finished"
        and marker["pid"] == world["overwrite_pid"] != world["overwrite_before"]["pid"]
    )
    assert read_json(run / "final_metrics.json")["steps"] == 200  # the new run, not the old one
    assert not (run / "checkpoints" / f"step-{STEPS:07d}").exists()
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]


def test_a_second_run_into_the_same_directory_fails_at_once(world):
    assert world["concurrent_while_running"]
    proc = world["concurrent"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    run = world["root"] / "overwrite" / "run"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dualtune: error: {run}: another dualtune run (pid {world['overwrite_pid']}) is writing it; wait for "
        f"it to end or choose another --output-dir"
    )
    assert world["round3"]["overwrite"].returncode == 0  # the first one went on


def test_files_are_written_with_the_umask(world):
    run = world["root"] / "overwrite" / "run"  # written under umask 022
    modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in run.rglob("*")}
    assert {k: oct(m) for k, m in modes.items() if (run / k).is_file() and m != 0o644} == {}
    assert {k: oct(m) for k, m in modes.items() if (run / k).is_dir() and m != 0o755} == {}
    assert "final_metrics.json" in modes and ".dualtune-run" in modes and "checkpoints" in modes


# ---------------------------------------------------------------- 4. eval and predict on unfinished runs


@pytest.mark.parametrize("command", ["eval_failed", "predict_failed"])
def test_eval_and_predict_refuse_an_unfinished_run(world, command):
    line = one_error_line(world[command])
    failed = world["runs"] / "term.failed"
    assert line.startswith(f"dualtune: error: {failed}: an unfinished run (interrupted at step ")
    assert "--checkpoint" in line and f"--resume {failed}" in line


def test_eval_a_checkpoint_of_an_unfinished_run(world):
    proc = world["round3"]["eval_ckpt"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = world["eval_ckpt"]
    out = world["term_failed_copy"] / "eval" / f"torch-{ckpt.name}"
    metrics = read_json(out / "metrics.json")
    assert metrics["backend"] == "torch" and 0 < metrics["eval_loss"] < 10
    assert (out / "classification_report.json").is_file() and (out / "predictions.jsonl").is_file()
    # the checkpoint's adapter, not the final one: as the reference evaluated it at that step, if it did
    step = int(ckpt.name.rsplit("-", 1)[1])
    assert metrics["eval_loss"] != read_json(world["ref"] / "final_metrics.json")["eval_loss"]
    same_step = [
        json.loads(line)
        for line in (world["ref"] / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") == "eval" and json.loads(line)["step"] == step
    ]
    if same_step:
        assert metrics["eval_loss"] == pytest.approx(same_step[0]["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------- 5. early stopping


def test_early_stopping_keeps_the_best_step(world):
    proc = world["round1"]["early"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = world["runs"] / "early"
    final = read_json(run / "final_metrics.json")
    evals = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") == "eval"
    ]
    assert final["stopped_early"] is True and final["steps"] < 12
    in_loop = evals[:-1]  # the last line is the final evaluation, at the stopping step
    best = min(in_loop, key=lambda r: r["eval_loss"])
    assert in_loop[-1]["eval_loss"] > best["eval_loss"]  # the stopping evaluation did not improve
    assert final["selected_step"] == best["step"] < final["steps"]
    assert final["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-6)  # the kept adapter is step N's
    assert f"early stopping at step {final['steps']}: eval_loss has not improved" in proc.stderr
    log = (run / "run.log").read_text()
    assert "early stopping at step" in log and f"keeping the adapter of step {best['step']}" in log


def test_a_signal_after_the_last_step_lets_the_run_finish_and_says_so(caplog):
    from dualtune.callbacks import LoopState
    from dualtune.runner import SignalStop

    during, after = SignalStop(), SignalStop()
    during.handle(signal.SIGINT)
    after.on_train_end(LoopState(total_steps=1, steps_per_epoch=1), [])
    with caplog.at_level("WARNING", logger="dualtune"):
        after.handle(signal.SIGTERM)
    assert caplog.messages[-1] == (
        "SIGTERM: training is done; finishing the final evaluation and the run directory "
        "(send it again to stop at once)"
    )
    state = LoopState(total_steps=2, steps_per_epoch=2)
    during.on_step_end(state, {})
    assert state.stop and during.received == signal.SIGINT
