"""The two sides of a benchmark, each run in a child process (``bench.py --child SIDE CONFIG RESULT``):

* ``dualtune_side``: dualtune's own prepare + train, timed through a loop callback.
* the reference: ``reference_torch`` (HF Trainer + peft) or ``reference_mindspore`` (a plain mindnlp
  loop), from the pieces both share in ``hf_reference``; with --against torch, dualtune itself on the
  torch backend; with --against fp32, dualtune itself in fp32; with --against nproc1, dualtune
  itself on one process (the dualtune side then runs as ``--nproc`` processes under torchrun).

A side module is imported only in its own child: this package imports no framework.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common import rate

from dualtune.rundir import peak_rss_mb  # stdlib only: costs neither side memory


def run_side(side: str, cfg: dict) -> dict:
    if side == "dualtune":
        from sides.dualtune_side import run_dualtune

        return run_dualtune(cfg)
    if cfg.get("against") in ("torch", "fp32", "nproc1"):  # the reference side is dualtune itself: on
        from sides.dualtune_side import run_dualtune  # torch, in fp32 (train.precision=fp32), on 1 process

        return run_dualtune(
            {**cfg, "backend": "torch" if cfg["against"] == "torch" else cfg["backend"]}, side
        )
    if cfg["backend"] == "torch":
        from sides.reference_torch import run_reference_torch

        return run_reference_torch(cfg)
    from sides.reference_mindspore import run_reference_mindspore

    return run_reference_mindspore(cfg)


def run_child(side: str, cfg_path: str, result_path: str) -> int:
    """The child's entry: run one side on the bench's config, write its result with its rates."""
    cfg = json.loads(Path(cfg_path).read_text())
    started = time.perf_counter()
    result = run_side(side, cfg)
    rank = int(os.environ.get("RANK", "0"))  # torchrun's: --nproc runs this side as several processes
    if rank != 0:  # its peak RSS, beside process 0's result (the parent adds them up)
        rss = {"peak_rss_mb": peak_rss_mb(), "peak_rss_mb_by_phase": result["peak_rss_mb_by_phase"]}
        Path(f"{result_path}.rank{rank}").write_text(json.dumps(rss, indent=2))
        return 0
    result["wall_seconds"] = time.perf_counter() - started
    result["steps_per_s"] = rate(result["train_steps"], result["train_seconds"])
    result["tokens_per_s"] = rate(result["train_tokens"], result["train_seconds"])
    result["eval_samples_per_s"] = rate(result["eval_samples"], result["eval_seconds"])
    if "compile_seconds" in result:  # the same rates with the graph compiles taken out
        # the steps that compiled nothing; eval: a second pass over the timed batches
        result["steps_per_s_compiled"] = rate(result["warm_steps"], result["warm_step_seconds"])
    if "train_examples" in result:
        result["examples_per_s"] = rate(result["train_examples"], result["train_seconds"])
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_rss_mb_by_phase"]["eval"] = result["peak_rss_mb"]
    if cfg.get("device", "cpu").startswith("cuda"):
        import torch  # already imported by the side

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0
