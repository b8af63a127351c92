"""benchmarks/bench.py runs end to end on a tiny model and reports what it says it reports.

No timing assertions: the numbers are only checked for being there, positive, and consistent.
Every side runs in a child process of the benchmark, so the MindSpore case can live in the torch
suite (this process never imports mindnlp).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from helpers import RECIPES, REPO

BENCHMARKS = REPO / "benchmarks"
BENCH = BENCHMARKS / "bench.py"
METRICS = ("steps_per_s", "tokens_per_s", "eval_samples_per_s", "peak_rss_mb")
NPROC_METRICS = METRICS + ("examples_per_s", "peak_rss_mb_summed")  # --against nproc1 adds these
SIDE_FIELDS = METRICS + (
    "train_steps",
    "train_seconds",
    "train_tokens",
    "step_seconds",
    "eval_samples",
    "eval_seconds",
    "first_loss",
    "last_loss",
    "trainable_parameters",
    "total_parameters",
    "wall_seconds",
    "what",
)


def run_bench(backend: str, model: str, out, *extra: str) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            str(RECIPES / "t5_prefix.yaml"),
            "--backend",
            backend,
            "--steps",
            "2",
            "--eval-batches",
            "1",
            "--model",
            model,
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    ratio = "bf16/fp32" if "fp32" in extra else "2x1/1x2" if "nproc1" in extra else "ratio d/r"
    assert ratio in proc.stdout and "eval samples/s" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


def check_report(report: dict, backend: str, metrics: tuple = METRICS) -> None:
    assert report["backend"] == backend
    assert (report["steps"], report["eval_batches"], report["batch_size"]) == (2, 1, 8)
    assert report["padding"] == "max_length" and report["max_length"] == 128
    for side in ("dualtune", "reference"):
        got = report[side]
        assert set(SIDE_FIELDS) <= set(got), f"{side} lacks {sorted(set(SIDE_FIELDS) - set(got))}"
        for key in metrics + ("train_seconds", "train_tokens", "eval_samples", "eval_seconds"):
            assert isinstance(got[key], (int, float)) and math.isfinite(got[key]) and got[key] > 0, (
                side,
                key,
                got[key],
            )
        assert got["train_steps"] == 2 and len(got["step_seconds"]) == 2
        assert got["eval_samples"] == 8
        assert math.isfinite(got["first_loss"]) and math.isfinite(got["last_loss"])
        assert got["steps_per_s"] == pytest.approx(got["train_steps"] / got["train_seconds"])
        assert got["tokens_per_s"] == pytest.approx(got["train_tokens"] / got["train_seconds"])
    # Same model, same method: the same number of trainable and total parameters on both sides.
    assert report["dualtune"]["trainable_parameters"] == report["reference"]["trainable_parameters"] > 0
    assert report["dualtune"]["total_parameters"] == report["reference"]["total_parameters"]
    # both sides dualtune (--against torch / fp32 / nproc1): the rates with graph compiles taken out too
    both_dualtune = all(report[side]["what"].startswith("dualtune") for side in ("dualtune", "reference"))
    compiled = ("steps_per_s_compiled", "eval_samples_per_s_compiled") if both_dualtune else ()
    assert set(report["ratios"]) == set(metrics + compiled)
    for key in metrics + compiled:
        assert report["ratios"][key] == pytest.approx(
            report["dualtune"][key] / report["reference"][key], rel=1e-12
        )


@pytest.mark.slow
def test_bench_torch(tiny_t5, tmp_path):
    report = run_bench("torch", tiny_t5, tmp_path / "bench-torch.json")
    check_report(report, "torch")
    assert report["against"] == "plain HF reference"


@pytest.mark.slow
def test_bench_reference_overrides_apply_to_the_reference_only(tiny_t5, tmp_path):
    """dualtune's dynamic, length-grouped padding against the notebooks' fixed-length padding."""
    report = run_bench(
        "torch",
        tiny_t5,
        tmp_path / "bench.json",
        "data.padding=longest",
        "train.group_by_length=true",
        "--reference",
        "data.padding=max_length",
    )
    assert report["dualtune"]["data"] == {"padding": "longest", "group_by_length": True}
    assert report["reference"]["data"] == {"padding": "max_length", "group_by_length": True}
    assert report["reference_overrides"] == ["data.padding=max_length"]
    assert report["dualtune"]["train_batch_shape"][1] < 128  # synthetic sentences are short


@pytest.mark.slow
@pytest.mark.mindspore
@pytest.mark.skipif(importlib.util.find_spec("mindnlp") is None, reason="mindnlp is not installed")
def test_bench_mindspore(tiny_t5, tmp_path):
    check_report(run_bench("mindspore", tiny_t5, tmp_path / "bench-mindspore.json"), "mindspore")


@pytest.mark.slow
@pytest.mark.mindspore
@pytest.mark.skipif(importlib.util.find_spec("mindnlp") is None, reason="mindnlp is not installed")
def test_bench_mindspore_against_torch(tiny_t5, tmp_path):
    """--against torch: both sides are dualtune, so they see the same batches."""
    report = run_bench("mindspore", tiny_t5, tmp_path / "bench.json", "--against", "torch")
    check_report(report, "mindspore")
    assert report["against"] == "dualtune on torch"
    assert report["reference"]["what"].startswith("dualtune prepare + train (torch)")
    assert report["dualtune"]["what"].startswith("dualtune prepare + train (mindspore)")
    assert report["dualtune"]["train_tokens"] == report["reference"]["train_tokens"]
    # MindSpore compiles T5 (the warm-up step and the first eval batch compile; nothing after them,
    # the timed batches having the same bucketed shapes); torch compiles nothing
    ms, pt = report["dualtune"], report["reference"]
    assert ms["compile_seconds_total"] > 0 and pt["compile_seconds_total"] == 0
    assert ms["steps_per_s_compiled"] >= ms["steps_per_s"]
    assert pt["steps_per_s_compiled"] == pytest.approx(pt["steps_per_s"], rel=1e-9)


@pytest.mark.slow
def test_bench_bf16_against_fp32(tiny_t5, tmp_path):
    """--against fp32: both sides are dualtune on torch, the same batches, one in bf16."""
    report = run_bench("torch", tiny_t5, tmp_path / "bench.json", "train.precision=bf16", "--against", "fp32")
    check_report(report, "torch")
    assert (report["against"], report["precision"]) == ("dualtune in fp32", "bf16")
    assert report["dualtune"]["what"] == report["reference"]["what"]
    assert report["dualtune"]["train_tokens"] == report["reference"]["train_tokens"]
    # the same start, rounded differently: bf16 is on (measured 1e-4 relative on the first loss)
    first = report["dualtune"]["first_loss"], report["reference"]["first_loss"]
    assert first[0] != first[1] and first[0] == pytest.approx(first[1], rel=1e-2)


@pytest.mark.slow
def test_bench_two_processes_against_one(tiny_t5, tmp_path):
    """--nproc 2 --against nproc1: 2 processes x 1 thread x batch 4 against 1 x 2 threads x batch 8,
    the same rows per step (so the same tokens and, without dropout, the same losses)."""
    report = run_bench(
        "torch",
        tiny_t5,
        tmp_path / "b.json",
        "train.dropout=false",
        "--nproc",
        "2",
        "--against",
        "nproc1",
        "--threads",
        "2",
    )
    check_report(report, "torch", NPROC_METRICS)
    d, r = report["dualtune"], report["reference"]
    assert (report["against"], report["nproc"], d["nproc"], r["nproc"]) == ("dualtune on 1 process", 2, 2, 1)
    assert (d["train_batch_shape"], r["train_batch_shape"]) == ([4, 128], [8, 128])
    assert d["train_examples"] == r["train_examples"] == 2 * 8
    assert d["train_tokens"] == r["train_tokens"]
    assert len(d["peak_rss_mb_per_process"]) == 2 and len(r["peak_rss_mb_per_process"]) == 1
    assert d["peak_rss_mb_summed"] == sum(d["peak_rss_mb_per_process"]) > d["peak_rss_mb"]
    assert d["peak_rss_mb"] == max(d["peak_rss_mb_per_process"])
    # measured: 7e-8 relative (the gradients summed over gloo in another order)
    for key in ("first_loss", "last_loss"):
        assert d[key] == pytest.approx(r[key], rel=1e-5)


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--nproc", "2"], "--against nproc1 and --nproc N (N >= 2) go together: N processes against 1"),
        (
            ["--nproc", "2", "--against", "nproc1", "--threads", "2", "train.batch_size=7"],
            "train.batch_size 7: --nproc 2 needs a multiple of 2 (each process takes batch_size / nproc "
            "rows of the step)",
        ),
    ],
)
def test_bench_nproc_refusals(extra, line):
    proc = subprocess.run(
        [sys.executable, str(BENCH), str(RECIPES / "t5_prefix.yaml"), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"bench: error: {line}"


def test_bench_against_fp32_needs_mixed_precision():
    proc = subprocess.run(
        [sys.executable, str(BENCH), str(RECIPES / "t5_prefix.yaml"), "--against", "fp32"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "bench: error: train.precision fp32: --against fp32 compares mixed precision with fp32; "
        "add train.precision=bf16 or fp16"
    )


def test_bench_against_torch_needs_the_mindspore_backend():
    proc = subprocess.run(
        [sys.executable, str(BENCH), str(RECIPES / "t5_prefix.yaml"), "--against", "torch"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "bench: error: --against torch compares the mindspore backend with torch; add --backend mindspore"
    )


def test_bench_modules_import_without_a_framework():
    """The parent (bench.py, its helpers, the sides package) imports no framework: each side's child
    imports its own (mindnlp must never meet real torch), and the model maker's config is importable
    by the settings script."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench, sides, models, mindspore_cpu_settings; "
        "from models import T5_SMALL_CONFIG; "
        "heavy = sorted({'torch', 'transformers', 'peft', 'mindspore', 'mindnlp', 'mindtorch'} & set(sys.modules)); "
        "side_modules = sorted(m for m in sys.modules if m.startswith('sides.')); "
        "print(heavy, side_modules, T5_SMALL_CONFIG['d_model'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(BENCHMARKS)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "[] [] 512"


def test_bench_device_is_cpu_or_cuda_on_torch():
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            str(RECIPES / "t5_lora.yaml"),
            "--backend",
            "mindspore",
            "--device",
            "gpu",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "bench: error: --device: the bench runs torch on cpu or cuda, mindspore on cpu"
    )
