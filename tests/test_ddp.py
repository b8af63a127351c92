"""Data parallel on torch (torchrun, gloo on CPU): 2 processes x batch 8 take, step by step, the rows
one process x batch 16 takes, and reach the same losses; process 0 alone writes the run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import RECIPES, dualtune_cli

CASES = {
    "bert": ("minilm_demo.yaml", ["data.max_rows=52"]),  # 41 train rows: the last step has 9
    "t5": ("t5_lora.yaml", ["data.max_rows=52", "train.group_by_length=true"]),
}


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", list(CASES))
def test_two_processes_of_8_are_one_of_16(tiny_bert, tiny_t5, fin_data, tmp_path, kind):
    recipe, extra = CASES[kind]
    common = [
        str(RECIPES / recipe),
        f"model.name_or_path={tiny_t5 if kind == 't5' else tiny_bert}",
        f"data.source={fin_data}",
        "train.max_steps=5",
        "train.eval_every=3",
        "train.dropout=false",
        "optim.lr=1e-2",
        "schedule.warmup_ratio=null",
        "--no-progress",
        *extra,
    ]
    dualtune_cli("run", *common, "train.batch_size=16", "--output-dir", str(tmp_path / "one"))
    proc = dualtune_cli(
        "run",
        *common,
        "train.batch_size=8",
        "--nproc",
        "2",
        "--output-dir",
        str(tmp_path / "two"),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "data parallel on 2 processes" in proc.stderr
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 3, 4, 5, 5]
    steps = [(a, b) for a, b in zip(one, two) if "loss" in a]
    assert [a["tokens"] for a, _ in steps] == [b["tokens"] for _, b in steps]  # the same rows each step
    np.testing.assert_allclose([b["loss"] for _, b in steps], [a["loss"] for a, _ in steps], rtol=1e-5)
    np.testing.assert_allclose(
        [b["grad_norm"] for _, b in steps], [a["grad_norm"] for a, _ in steps], rtol=1e-4
    )
    final_one = json.loads((tmp_path / "one" / "final_metrics.json").read_text())
    final_two = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
    assert final_two["steps"] == final_one["steps"] == 5
    assert abs(final_two["eval_loss"] - final_one["eval_loss"]) <= 1e-5 * final_one["eval_loss"]
    # Process 0 alone wrote: one run directory, no other process's leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_nproc_below_one_is_refused(tmp_path):
    proc = dualtune_cli(
        "run",
        str(RECIPES / "minilm_demo.yaml"),
        "--nproc",
        "0",
        "--output-dir",
        str(tmp_path / "x"),
        check=False,
    )
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (
        2,
        "dualtune: error: --nproc 0: expected 1 or more",
    )
    assert not (tmp_path / "x").exists()


def test_a_data_parallel_run_stopped_by_sigterm_resumes_to_the_same_numbers(tiny_bert, fin_data, tmp_path):
    common = [
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "train.max_steps=8",
        "train.eval_every=4",
        "train.save_every=2",
        "train.batch_size=8",
        "optim.lr=1e-2",
        "train.dropout=false",
        "--no-progress",
        "--nproc",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dualtune_cli("run", *common, "--output-dir", str(tmp_path / "ref"), env=env)
    cut = subprocess.Popen(
        [sys.executable, "-m", "dualtune.cli", "run", *common, "--output-dir", str(tmp_path / "b")],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(
        '"step": 3' in p.read_text() for p in tmp_path.glob("b.partial-*/metrics.jsonl")
    ):
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)
    _, err = cut.communicate(timeout=300)
    assert cut.returncode == 143, err[-2000:]
    assert any(line.startswith("dualtune: stopped by SIGTERM after step") for line in err.splitlines())
    # torchrun's own report (SignalException, ChildFailedError) stays in its log
    assert "Traceback" not in err and "SignalException" not in err, err[-2000:]
    dualtune_cli("run", *common, "--output-dir", str(tmp_path / "b"), "--resume", env=env)
    ref, resumed = records(tmp_path / "ref"), records(tmp_path / "b")
    assert [r["step"] for r in resumed] == [r["step"] for r in ref] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert resumed == ref  # every loss, gradient norm and eval metric, bit for bit (dropout off)
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "ref" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_a_killed_process_is_one_line_naming_it_and_its_log(tiny_bert, fin_data, tmp_path):
    """kill -9 of process 1: the job ends with exit 1 and one line, as the MindSpore launcher's does;
    gloo's "Connection reset by peer" and torchrun's ChildFailedError stay in the logs."""
    import psutil

    cut = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dualtune.cli",
            "run",
            str(RECIPES / "minilm_demo.yaml"),
            f"model.name_or_path={tiny_bert}",
            f"data.source={fin_data}",
            "train.max_steps=400",
            "train.batch_size=8",
            "--no-progress",
            "--nproc",
            "2",
            "--output-dir",
            str(tmp_path / "k"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(
        '"step": 2' in p.read_text() for p in tmp_path.glob("k.partial-*/metrics.jsonl")
    ):
        time.sleep(0.05)
    rank1 = [
        child
        for child in psutil.Process(cut.pid).children(recursive=True)
        if child.environ().get("RANK") == "1" and "dualtune.cli" in " ".join(child.cmdline())
    ]
    assert len(rank1) == 1
    rank1[0].kill()
    _, err = cut.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    assert cut.returncode == 1, err[-2000:]
    assert last.startswith("dualtune: error: process 1 of 2 was killed by SIGKILL; its log: "), err[-2000:]
    log = Path(last.split("its log: ")[1])
    assert log.name == "worker_1.log" and log.is_file()
    for noise in ("Traceback", "ChildFailedError", "Connection reset", "SignalException"):
        assert noise not in err, err[-3000:]
