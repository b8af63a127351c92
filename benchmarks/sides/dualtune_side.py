"""The dualtune side: ``dualtune.prepare.prepare`` + ``dualtune.trainer.train`` (the real loop, with
``train.max_steps`` = warm-up + N and in-loop evaluation switched off), timed through a loop callback;
then greedy ``backend.generate`` (seq2seq) or ``backend.eval_batch`` + argmax (classification) over
N eval batches spread over the eval order.

Under data parallel (``--nproc N``: this side runs as N processes under torchrun) every process
trains; process 0's clock times the steps (the processes step together: one all-reduce per step)
and process 0 alone evaluates, as ``dualtune run --nproc`` does."""

from __future__ import annotations

import math
import time

from common import (
    WARMUP_EVAL_BATCHES,
    WARMUP_STEPS,
    BenchError,
    data_settings,
    load_bench_recipe,
    timed_steps,
)

from dualtune.rundir import peak_rss_mb


def step_clock(n_train: int, step_rows: int, backend, model):
    """A loop callback that notes when each step ends (the loss has been read: the step is done),
    its tokens, its examples (``step_rows``, all processes' together; fewer in an epoch's last
    step) and the backend's compile seconds so far."""
    from dualtune.callbacks import Callback

    class StepClock(Callback):
        def __init__(self):
            self.step_ends: list[float] = []
            self.step_tokens: list[int] = []
            self.step_examples: list[int] = []
            self.compile_seconds: list[float] = []

        def on_step_end(self, state, record):
            self.step_ends.append(time.perf_counter())
            self.compile_seconds.append(backend.compile_seconds(model) or 0.0)
            self.step_tokens.append(record["tokens"])
            self.step_examples.append(min(step_rows, n_train - (state.position - 1) * step_rows))

    return StepClock()


def warm_steps(clock) -> dict:
    compiled = [
        b - a for a, b in zip(clock.compile_seconds[WARMUP_STEPS - 1 :], clock.compile_seconds[WARMUP_STEPS:])
    ]
    seconds = [b - a for a, b in zip(clock.step_ends[WARMUP_STEPS - 1 :], clock.step_ends[WARMUP_STEPS:])]
    warm = [t for t, c in zip(seconds, compiled) if c == 0]
    return {"warm_steps": len(warm), "warm_step_seconds": sum(warm)}


def timed_train(backend, prep, recipe, total: int) -> tuple[list[dict], object]:
    """dualtune's loop for ``total`` steps (enough epochs for them), with the step clock attached."""
    from dualtune import data as datamap
    from dualtune.trainer import step_batch_size, train

    step_rows = step_batch_size(recipe, backend.world()[1])
    per_epoch = datamap.num_batches(len(prep.train_set), step_rows)
    prep.recipe.train.epochs = max(recipe.train.epochs, math.ceil(total / per_epoch))
    clock = step_clock(len(prep.train_set), step_rows, backend, prep.model)
    records, _ = train(backend, prep, [clock])
    if len(records) != total or len(clock.step_ends) != total:
        raise BenchError(
            f"dualtune ran {len(records)} steps, the clock saw {len(clock.step_ends)}; expected {total}"
        )
    return records, clock


def timed_eval(backend, prep, n_batches: int) -> tuple[int, float, float, float]:
    """(samples, seconds, compile seconds, samples/s without compiles) of ``n_batches`` full eval
    batches after the warm-up batch(es); where the backend compiles graphs, the last is a second
    pass over the same batches.

    evaluate() reads the eval split longest first (data.eval_order); the batches timed are spread
    evenly over that order (the longest one is the warm-up), not just its longest few."""
    import numpy as np

    from dualtune import data as datamap

    r, task, tok = prep.recipe, prep.recipe.model.task, prep.tokenizer
    bs = r.train.eval_batch_size or r.train.batch_size
    backend.set_training(prep.model, False)
    order = datamap.eval_order(prep.eval_set, r.data)
    starts = range(0, max(1, len(order) - bs + 1), bs)
    picked = sorted(
        {starts[round(k)] for k in np.linspace(0, len(starts) - 1, WARMUP_EVAL_BATCHES + n_batches)}
    )
    it = datamap.batches(
        prep.eval_set,
        bs,
        tok.pad_token_id,
        r.data,
        task,
        order=np.concatenate([order[a : a + bs] for a in picked]),
    )
    batches = list(it)
    samples, seconds, compiled = _eval_pass(backend, prep, batches)
    if backend.compile_seconds(prep.model) is None:
        return samples, seconds, compiled, samples / seconds if seconds > 0 else float("nan")
    # graphs: the same batches once more, every shape compiled: the rate without compiles
    _, warm_seconds, _ = _eval_pass(backend, prep, batches)
    return samples, seconds, compiled, samples / warm_seconds if warm_seconds > 0 else float("nan")


def _eval_pass(backend, prep, batches) -> tuple[int, float, float]:
    r, task, tok = prep.recipe, prep.recipe.model.task, prep.tokenizer
    samples, started, compiled = 0, None, 0.0
    for i, np_batch in enumerate(batches):
        if i == WARMUP_EVAL_BATCHES:
            started, compiled = time.perf_counter(), backend.compile_seconds(prep.model) or 0.0
        batch = backend.to_tensors(np_batch)
        if task == "seq2seq":
            ids = backend.generate(prep.model, batch, r.data.label_max_length)
            tok.batch_decode(ids, skip_special_tokens=True)
        else:
            _, logits = backend.eval_batch(prep.model, batch)
            logits.argmax(-1)
        if i >= WARMUP_EVAL_BATCHES:
            samples += len(np_batch["input_ids"])
    if started is None:
        return samples, 0.0, 0.0
    return samples, time.perf_counter() - started, (backend.compile_seconds(prep.model) or 0.0) - compiled


def run_dualtune(cfg: dict, side: str = "dualtune") -> dict:
    from dualtune.backend import get_backend

    backend = get_backend(cfg["backend"], cfg.get("device", "cpu"))
    nproc = cfg.get("nproc", 1) if side == "dualtune" else 1
    if cfg["backend"] == "torch":
        import torch

        torch.set_num_threads(cfg["threads"] // nproc)  # --nproc: the threads shared out
    from dualtune import data as datamap
    from dualtune.prepare import prepare

    total = cfg["steps"] + WARMUP_STEPS
    # train.max_steps bounds the run; an int eval_every that is never reached keeps evaluation out.
    recipe = load_bench_recipe(cfg, [f"train.max_steps={total}", "train.eval_every=1000000000"], side)
    prep = prepare(recipe, backend)
    rss = {"setup": peak_rss_mb()}
    records, clock = timed_train(backend, prep, recipe, total)
    rss["train"] = peak_rss_mb()
    if backend.world()[0] != 0:  # data parallel: process 0 reports the side (and evaluates)
        return {"peak_rss_mb_by_phase": rss}
    samples, eval_seconds, eval_compile, eval_warm_rate = timed_eval(backend, prep, cfg["eval_batches"])
    r, tok = prep.recipe, prep.tokenizer
    return {
        "data": data_settings(r),
        "what": f"dualtune prepare + train ({backend.name}), backend.generate / eval_batch",
        **timed_steps(cfg["steps"], clock.step_ends, clock.step_tokens),
        "train_examples": sum(clock.step_examples[WARMUP_STEPS:]),
        "nproc": backend.world()[1],
        "peak_rss_mb_by_phase": rss,
        "eval_samples": samples,
        "eval_seconds": eval_seconds,
        # graph compilation inside the timed steps / eval batches (MindSpore's compiled graphs: each
        # new batch shape compiles once); 0 where the backend compiles nothing
        "compile_seconds": clock.compile_seconds[-1] - clock.compile_seconds[WARMUP_STEPS - 1],
        # the timed steps that compiled nothing: how many, and their seconds
        **warm_steps(clock),
        "eval_samples_per_s_compiled": eval_warm_rate,
        "eval_compile_seconds": eval_compile,
        "compile_seconds_total": backend.compile_seconds(prep.model) or 0.0,
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "trainable_parameters": sum(prep.trainable.values()),
        "total_parameters": prep.total_params,
        "train_batch_shape": list(
            datamap.collate(
                prep.train_set, range(r.train.batch_size), tok.pad_token_id, r.data, r.model.task
            )["input_ids"].shape
        ),
    }
