"""The training loop: framework-free, driving a ``Backend`` one optimizer step at a time and telling
its callbacks (``dualtune.callbacks``) what happened. Everything around the step (progress,
metrics.jsonl, checkpoints, early stopping, trackers) is a callback."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dualtune import data as datamap
from dualtune.backend import Backend
from dualtune.callbacks import Callback, CallbackList, LoopState, NanGuard
from dualtune.evaluation import evaluate
from dualtune.metrics import better
from dualtune.prepare import Prepared
from dualtune.recipe import Recipe
from dualtune.schedule import lr_at

log = logging.getLogger("dualtune")


def total_steps(recipe: Recipe, n_train: int) -> int:
    steps = recipe.train.epochs * datamap.num_batches(n_train, recipe.train.batch_size)
    return min(steps, recipe.train.max_steps) if recipe.train.max_steps else steps


@dataclass
class BestCheckpoint:
    """The evaluation with the best ``metric`` so far, and the trainable tensors at that point."""

    metric: str
    value: float | None = None
    step: int | None = None
    state: dict[str, np.ndarray] | None = None

    def beats(self, value: float) -> bool:
        """Is ``value`` strictly better than the best so far?"""
        return self.value is None or better(self.metric, value, self.value)


class KeepBest(Callback):
    """Remembers the trainable tensors of the best evaluation (``train.best_metric``)."""

    def __init__(self, backend: Backend, prep: Prepared, best: BestCheckpoint):
        self.backend, self.prep, self.best = backend, prep, best

    def on_evaluate(self, state, record):
        if self.best.beats(record[self.best.metric]):
            self.best.value, self.best.step = record[self.best.metric], record["step"]
            self.best.state = self.backend.trainable_state(self.prep.model)


@dataclass
class Resume:
    """Where a resumed run starts: the loop state and AdamW's and the generators' state as numpy."""

    step: int
    epoch: int
    position: int
    optimizer_state: dict[str, Any]
    rng_state: dict[str, np.ndarray] | None = None  # None: another framework wrote it
    records: list[dict] = field(default_factory=list)  # the step records before ``step``


def epoch_order(prep: Prepared, epoch: int) -> np.ndarray:
    """The training batches' order in ``epoch``: a function of (seed, epoch) only, identical on every
    backend and after a resume."""
    r = prep.recipe
    return datamap.shuffled_order(prep.train_set, r.train.batch_size, r.train.seed + epoch, r.train.group_by_length)


def train(backend: Backend, prep: Prepared, callbacks: Sequence[Callback] = (), full_eval: bool = False,
          resume: Resume | None = None) -> tuple[list[dict], LoopState]:
    """Run the recipe's optimizer steps; returns the per-step records and the final loop state.

    Evaluates every ``train.eval_every`` (by default each epoch) except after the last step: that
    evaluation is the caller's, so it is not done twice. ``full_eval``: in-loop evaluations also
    generate (a best metric may need the generated text); otherwise they are quick."""
    r = prep.recipe
    task, pad = r.model.task, prep.tokenizer.pad_token_id
    events = CallbackList([NanGuard(), *callbacks])
    state = LoopState(total_steps=total_steps(r, len(prep.train_set)),
                      steps_per_epoch=datamap.num_batches(len(prep.train_set), r.train.batch_size),
                      optimizer=backend.make_optimizer(prep.params, r.optim))
    records: list[dict] = []
    if resume is not None:
        backend.load_optimizer_state(state.optimizer, resume.optimizer_state)
        if resume.rng_state is not None:
            backend.set_rng_state(resume.rng_state)
        state.step, state.epoch, state.position = resume.step, resume.epoch, resume.position
        records = list(resume.records)
    eval_every = r.train.eval_every if isinstance(r.train.eval_every, int) else None
    backend.set_training(prep.model, True)
    events.on_train_begin(state)
    started = time.perf_counter()
    first_step = state.step
    while state.step < state.total_steps and not state.stop:
        if state.position >= state.steps_per_epoch:
            state.epoch, state.position = state.epoch + 1, 0
        order = epoch_order(prep, state.epoch)
        bs = r.train.batch_size
        while state.position < state.steps_per_epoch and state.step < state.total_steps and not state.stop:
            events.on_step_begin(state)
            np_batch = datamap.collate(prep.train_set, order[state.position * bs: (state.position + 1) * bs],
                                       pad, r.data, task)
            lr = lr_at(state.step, r.optim.lr, r.schedule, state.total_steps)
            loss, grads = backend.value_and_grad(prep.model, prep.params, backend.to_tensors(np_batch))
            grads, grad_norm = backend.clip_grads(grads, r.optim.grad_clip)
            backend.apply_update(state.optimizer, grads, lr)
            state.step += 1
            state.position += 1
            # tokens: non-padding input tokens, plus label tokens for seq2seq (what a step learns from)
            tokens = int(np_batch["attention_mask"].sum())
            if task == "seq2seq":
                tokens += int((np_batch["labels"] != -100).sum())
            record = {"step": state.step, "epoch": state.epoch, "loss": backend.to_float(loss), "lr": lr,
                      "grad_norm": grad_norm, "tokens": tokens}
            records.append(record)
            events.on_step_end(state, record)
            end_of_epoch = state.position == state.steps_per_epoch
            if state.step < state.total_steps and (
                    (eval_every and state.step % eval_every == 0) or (eval_every is None and end_of_epoch)):
                evaluation = evaluate(backend, prep, generate=None if full_eval else False)
                state.last_eval = {"step": state.step, "epoch": state.epoch, **evaluation.metrics}
                log.info("eval at step %d: %s", state.step,
                         ", ".join(f"{k}={v:.4f}" for k, v in evaluation.metrics.items()))
                events.on_evaluate(state, state.last_eval)
    log.info("trained %d steps in %.1f s", state.step - first_step, time.perf_counter() - started)
    if state.stop and state.stop_reason:
        log.info("%s", state.stop_reason)
    events.on_train_end(state, records)
    return records, state
