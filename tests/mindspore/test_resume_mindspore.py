"""Resume on MindSpore, and across the two stacks (each run a CLI process of its own).

Same stack, dropout on: a MindSpore run stopped by SIGTERM and continued with ``--resume`` gives the
losses of the uninterrupted MindSpore run (the backend draws its own dropout masks and checkpoints
their generator). Across stacks, dropout off: a run starts on torch, is stopped, continues on
MindSpore (``--resume DIR --backend mindspore``), is stopped again and ends on torch; its per-step
losses are the uninterrupted torch run's within ``dualtune compare``'s step tolerance.

Four MindSpore processes (about 20 s each to start), two rounds run side by side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dualtune.compare import TOLERANCES, rel_diff
from helpers import RECIPES, REPO

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]

RECIPE = str(RECIPES / "minilm_demo.yaml")
STEPS = 12
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GLOG_v": "3",
    "HF_HUB_OFFLINE": "1",
}
SAME_STACK_REL = 1e-5


def start(out: Path, backend: str, *extra: str) -> subprocess.Popen:
    err = open(f"{out}.{backend}.{time.monotonic_ns()}.stderr", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dualtune.cli",
            "run",
            RECIPE,
            "--backend",
            backend,
            "--output-dir",
            str(out),
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=err,
        text=True,
        env=ENV,
        cwd=REPO,
    )
    proc.err_file = err
    return proc


def finish(proc: subprocess.Popen, timeout: float = 900) -> subprocess.CompletedProcess:
    proc.wait(timeout=timeout)
    proc.err_file.seek(0)
    stderr = proc.err_file.read()
    proc.err_file.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


def records(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run / "metrics.jsonl") if "split" not in r}


def stop_after(proc: subprocess.Popen, out: Path, step: int, sig=signal.SIGTERM, timeout: float = 600):
    """SIGTERM once ``<out>.partial-PID/metrics.jsonl`` logs ``step``; returns the finished process."""
    metrics = out.with_name(f"{out.name}.partial-{proc.pid}") / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while max(losses(metrics.parent), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before step {step}:\n{finish(proc).stderr[-3000:]}"
            )
        assert time.monotonic() < deadline, f"no step {step} in {metrics} after {timeout} s"
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    return finish(proc)


def stopped_at(proc: subprocess.CompletedProcess) -> int:
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("continue with the same command and --resume"), last
    return int(last.split("after step ")[1].split(";")[0])


def checkpoint_backend(run: Path) -> tuple[int, str]:
    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = json.loads((latest / "state.json").read_text())
    return state["step"], state["backend"]


@pytest.fixture(scope="module")
def runs(tiny_bert, fin_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume_ms")
    base = [
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "schedule.warmup_ratio=null",
        f"train.max_steps={STEPS}",
        "train.save_every=2",
        "train.eval_every=5",
    ]
    no_dropout = [*base, "train.dropout=false"]
    r: dict = {"root": root}

    # Round 1: the references, and the runs to stop, side by side.
    procs = {
        "ms_ref": start(root / "ms_ref", "mindspore", *base),
        "ms_stop": start(root / "ms", "mindspore", *base),
        "torch_ref": start(root / "torch_ref", "torch", *no_dropout),
        "chain_1": start(root / "chain", "torch", *no_dropout),
    }
    with ThreadPoolExecutor(2) as pool:  # the torch run is fast: watch both at once
        ms_stop = pool.submit(stop_after, procs.pop("ms_stop"), root / "ms", 3)
        chain_1 = pool.submit(stop_after, procs.pop("chain_1"), root / "chain", 2)
        r["ms_stop"], r["chain_1"] = ms_stop.result(), chain_1.result()
    r.update({name: finish(p) for name, p in procs.items()})
    r["chain_1_checkpoint"] = checkpoint_backend(root / "chain.failed")

    # Round 2: the MindSpore run resumed on MindSpore; the torch checkpoint continued on MindSpore
    # (named, with the same --output-dir), stopped again some steps later.
    ms_resume = start(root / "ms", "mindspore", *base, "--resume")
    k1 = stopped_at(r["chain_1"])
    chain_2 = start(root / "chain", "mindspore", *no_dropout, "--resume", str(root / "chain.failed"))
    r["chain_2"] = stop_after(chain_2, root / "chain", k1 + 3)
    r["ms_resume"] = finish(ms_resume)
    r["chain_2_checkpoint"] = checkpoint_backend(root / "chain.failed")

    # Round 3: back on torch, plain --resume as the stop message says.
    r["chain_3"] = finish(start(root / "chain", "torch", *no_dropout, "--resume"))
    return r


def test_runs_finished(runs):
    for name in ("ms_ref", "torch_ref", "ms_resume", "chain_3"):
        assert runs[name].returncode == 0, f"{name}:\n{runs[name].stderr[-3000:]}"


def test_mindspore_resume_with_dropout_matches_the_uninterrupted_run(runs):
    root = runs["root"]
    stopped = stopped_at(runs["ms_stop"])
    assert 3 <= stopped < STEPS
    ref, resumed = losses(root / "ms_ref"), losses(root / "ms")
    assert sorted(ref) == sorted(resumed) == list(range(1, STEPS + 1))
    worst = max(rel_diff(ref[s], resumed[s]) for s in ref)
    assert worst <= SAME_STACK_REL, (worst, ref, resumed)
    final, expected = (json.loads((root / d / "final_metrics.json").read_text()) for d in ("ms", "ms_ref"))
    assert final["resumed"] is True and final["backend"] == "mindspore"
    assert rel_diff(final["eval_loss"], expected["eval_loss"]) <= SAME_STACK_REL
    assert final["accuracy"] == expected["accuracy"]


def test_dropout_was_on(runs):
    # with dropout on, the MindSpore reference differs from the torch run without dropout
    ms, torch_ = losses(runs["root"] / "ms_ref"), losses(runs["root"] / "torch_ref")
    assert rel_diff(ms[1], torch_[1]) > 1e-4


def test_cross_stack_resume_both_ways_continues_the_torch_run(runs):
    root = runs["root"]
    k1 = stopped_at(runs["chain_1"])
    k2 = stopped_at(runs["chain_2"])
    assert runs["chain_1_checkpoint"] == (k1, "torch")
    assert runs["chain_2_checkpoint"] == (k2, "mindspore")
    assert 2 <= k1 < k2 < STEPS, (k1, k2)
    assert "the checkpoint was written on torch" in runs["chain_2"].stderr
    assert "the checkpoint was written on mindspore" in runs["chain_3"].stderr
    ref, chain = losses(root / "torch_ref"), losses(root / "chain")
    assert sorted(chain) == list(range(1, STEPS + 1))
    for step in range(1, k1 + 1):  # torch, as the reference
        assert chain[step] == ref[step]
    tolerance = TOLERANCES["step_loss_rel"]
    gaps = {s: rel_diff(chain[s], ref[s]) for s in range(k1 + 1, STEPS + 1)}  # MindSpore, then torch again
    assert max(gaps.values()) <= tolerance, gaps
    final = json.loads((root / "chain" / "final_metrics.json").read_text())
    assert final["backend"] == "torch" and final["resumed"] is True and final["steps"] == STEPS
    marker = json.loads((root / "chain" / ".dualtune-run").read_text())
    assert marker["status"] == "finished"
    assert sorted(
        p.name for p in root.iterdir() if p.name.startswith("chain") and not p.name.endswith("stderr")
    ) == ["chain"]
