"""Data parallel on MindSpore (``dualtune run --nproc 2 --backend mindspore``: msrun, mccl on CPU):
2 processes x batch 8 reach, step by step, the losses of one process x batch 16; a run stopped by
SIGTERM resumes to the same bytes; a process that dies stops the job with one line.

msrun takes 20-40 s to build its cluster on this 2-core machine, so the runs compared go side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from helpers import RECIPES, REPO, dualtune_cli

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CASES = {
    "bert": ("minilm_demo.yaml", ["data.max_rows=52"]),  # 41 train rows: 3 steps of 16 an epoch
    "t5": ("t5_lora.yaml", ["data.max_rows=52", "train.group_by_length=true"]),
}
STEPS = [1, 2, 3, 3, 4, 5, 6, 6]  # eval at 3 and at the end


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def common(kind: str, model: str, data: str) -> list[str]:
    recipe, extra = CASES[kind]
    return [
        str(RECIPES / recipe),
        "--backend",
        "mindspore",
        f"model.name_or_path={model}",
        f"data.source={data}",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.dropout=false",  # MindSpore's dropout masks are seeded per process, not per row
        "optim.lr=1e-2",
        "schedule.warmup_ratio=null",
        "--no-progress",
        *extra,
    ]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dualtune.cli", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
    )


def stop_at(proc: subprocess.Popen, run: Path, step: int) -> tuple[int, str]:
    """SIGTERM ``proc`` once its run directory has logged ``step``; its exit status and stderr."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(
            f'"step": {step},' in p.read_text()
            for p in run.parent.glob(f"{run.name}.partial-*/metrics.jsonl")
        ):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def assert_same_steps(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two] == STEPS
    steps = [(a, b) for a, b in zip(one, two) if "loss" in a]
    assert [a["tokens"] for a, _ in steps] == [b["tokens"] for _, b in steps]  # the same rows each step
    # measured: 6e-8 relative (tiny BERT)
    np.testing.assert_allclose([b["loss"] for _, b in steps], [a["loss"] for a, _ in steps], rtol=1e-5)
    np.testing.assert_allclose(
        [b["grad_norm"] for _, b in steps], [a["grad_norm"] for a, _ in steps], rtol=1e-4
    )
    evals = [(a["eval_loss"], b["eval_loss"]) for a, b in zip(one, two) if "eval_loss" in a]
    np.testing.assert_allclose([b for _, b in evals], [a for a, _ in evals], rtol=1e-5)


def test_bert_two_processes_of_8_are_one_of_16_and_resume_after_sigterm(tiny_bert, fin_data, tmp_path):
    args = common("bert", tiny_bert, fin_data)
    with ThreadPoolExecutor(3) as pool:
        one = pool.submit(
            dualtune_cli, "run", *args, "train.batch_size=16", "--output-dir", str(tmp_path / "one"), env=ENV
        )
        two = pool.submit(
            dualtune_cli,
            "run",
            *args,
            "train.batch_size=8",
            "--nproc",
            "2",
            "--output-dir",
            str(tmp_path / "two"),
            env=ENV,
        )
        cut_args = [
            *args,
            "train.batch_size=8",
            "train.save_every=1",
            "--nproc",
            "2",
            "--output-dir",
            str(tmp_path / "b"),
        ]
        cut = pool.submit(stop_at, start(*cut_args), tmp_path / "b", 2)
        assert "data parallel on 2 processes: msrun" in two.result().stderr
        one.result()
        code, err = cut.result()
    assert code == 143, err[-3000:]
    assert any(line.startswith("dualtune: stopped by SIGTERM after step") for line in err.splitlines()), err[
        -3000:
    ]
    assert_same_steps(records(tmp_path / "one"), records(tmp_path / "two"))
    final_one = json.loads((tmp_path / "one" / "final_metrics.json").read_text())
    final_two = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
    assert final_two["steps"] == final_one["steps"] == 6
    # Process 0 alone wrote: the run directories, no other process's leftovers, no msrun logs here.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "b.failed",
        "one",
        "two",
    ]
    dualtune_cli("run", *cut_args, "--resume", env=ENV)
    assert records(tmp_path / "b") == records(tmp_path / "two")  # bit for bit (dropout off)
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "two" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_t5_two_processes_of_8_are_one_of_16(tiny_t5, fin_data, tmp_path):
    args = common("t5", tiny_t5, fin_data)
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(
            dualtune_cli, "run", *args, "train.batch_size=16", "--output-dir", str(tmp_path / "one"), env=ENV
        )
        two = pool.submit(
            dualtune_cli,
            "run",
            *args,
            "train.batch_size=8",
            "--nproc",
            "2",
            "--output-dir",
            str(tmp_path / "two"),
            env=ENV,
        )
        one.result(), two.result()
    assert_same_steps(records(tmp_path / "one"), records(tmp_path / "two"))


def test_a_process_that_dies_stops_the_job_with_one_line(tiny_bert, fin_data, tmp_path):
    proc = start(
        *common("bert", tiny_bert, fin_data),
        "train.batch_size=8",
        "--nproc",
        "2",
        "--output-dir",
        str(tmp_path / "x"),
    )
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                env = child.environ()
            except psutil.Error:
                continue
            if env.get("MS_ROLE") == "MS_WORKER" and env.get("RANK_ID") == "1":
                victim = child
        time.sleep(0.05)
    assert victim is not None
    time.sleep(max(0.0, victim.create_time() + 2 - time.time()))  # the launcher polls every 0.2 s
    victim.kill()
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 20  # not msrun's scheduler timeout (30 s and more)
    last = err.splitlines()[-1]
    assert proc.returncode == 1, err[-3000:]
    assert last.startswith("dualtune: error: process 1 of 2 was killed by SIGKILL; its log: "), last
    log = Path(last.rsplit(" ", 1)[1])
    assert log.name == "worker_1.log" and log.is_file()  # kept for a failed job
    # msrun killed process 0, and the launcher msrun's scheduler: nothing of the job is left running.
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == []
    shutil.rmtree(log.parent)
