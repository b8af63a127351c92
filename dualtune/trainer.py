"""The training loop: framework-free, driving a ``Backend`` one optimizer step at a time and telling
its callbacks (``dualtune.callbacks``) what happened. Everything around the step (progress,
metrics.jsonl, checkpoints, early stopping, trackers) is a callback."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dualtune import data as datamap
from dualtune.backend import Backend
from dualtune.callbacks import Callback, CallbackList, LoopState, NanGuard
from dualtune.evaluation import evaluate
from dualtune.metrics import better
from dualtune.prepare import Prepared
from dualtune.recipe import TEXT_TASKS, Recipe
from dualtune.rundir import fault_point
from dualtune.schedule import lr_at

log = logging.getLogger("dualtune")


def step_batch_size(recipe: Recipe, world: int = 1) -> int:
    """Rows per optimizer step: ``batch_size`` x ``grad_accum_steps`` x processes."""
    return recipe.train.batch_size * recipe.train.grad_accum_steps * world


def total_steps(recipe: Recipe, n_train: int, world: int = 1) -> int:
    steps = recipe.train.epochs * datamap.num_batches(n_train, step_batch_size(recipe, world))
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
    callbacks: dict[str, dict] = field(default_factory=dict)  # their state_dict()s, by state_key


def epoch_order(prep: Prepared, epoch: int, world: int = 1) -> np.ndarray:
    """The training batches' order in ``epoch``: a function of (seed, epoch) only, identical on every
    backend, on every process and after a resume."""
    r = prep.recipe
    return datamap.shuffled_order(
        prep.train_set, step_batch_size(r, world), r.train.seed + epoch, r.train.group_by_length
    )


def loss_shares(prep: Prepared, micro_batches: list[dict[str, np.ndarray]]) -> list[float]:
    """Each micro-batch's share of the step's loss, so that the weighted sum of their mean losses is
    the mean loss of the whole step batch: label tokens for seq2seq and causal_lm (token means; a
    causal_lm row's label tokens are its target's), examples for classification, or their class
    weights under a weighted loss (torch's weighted mean)."""
    if prep.recipe.model.task in TEXT_TASKS:
        sizes = [float((b["labels"] != -100).sum()) for b in micro_batches]
    elif prep.class_weights is not None:
        sizes = [float(prep.class_weights[b["labels"]].sum()) for b in micro_batches]
    else:
        sizes = [float(len(b["labels"])) for b in micro_batches]
    total = sum(sizes)
    return [s / total for s in sizes]


def step_loss_and_grads(
    backend: Backend, prep: Prepared, micro: list[dict[str, np.ndarray]]
) -> tuple[Any, list]:
    """The step batch's mean loss and gradients, from its micro-batches (``batch_size`` rows each).

    One process and one micro-batch: the backend's own (the loss still a tensor). Otherwise process
    ``rank`` takes micro-batches ``rank * k`` to ``rank * k + k - 1``, weights each mean by its
    share of the whole step (``loss_shares``), and the weighted sums are added over processes: the
    numbers of one process with one batch of all the rows."""
    rank, world = backend.world()
    if world == 1 and len(micro) == 1:
        return backend.value_and_grad(prep.model, prep.params, backend.to_tensors(micro[0]))
    k = prep.recipe.train.grad_accum_steps
    shares = loss_shares(prep, micro)
    loss, grads = 0.0, []  # type: float, list
    for i in range(rank * k, min(rank * k + k, len(micro))):
        part_loss, part = backend.value_and_grad(prep.model, prep.params, backend.to_tensors(micro[i]))
        loss += backend.to_float(part_loss) * shares[i]
        grads = (
            [g * shares[i] for g in part] if not grads else [a + g * shares[i] for a, g in zip(grads, part)]
        )
    if not grads:  # the epoch's last, short step left no rows for this process
        grads = [p.detach() * 0.0 for p in prep.params]
    if world > 1:
        grads, (loss,) = backend.all_reduce_sum(grads, [loss])
    return loss, grads


def train(
    backend: Backend,
    prep: Prepared,
    callbacks: Sequence[Callback] = (),
    full_eval: bool = False,
    resume: Resume | None = None,
) -> tuple[list[dict], LoopState]:
    """Run the recipe's optimizer steps; returns the per-step records and the final loop state.

    Evaluates every ``train.eval_every`` (by default each epoch) except after the last step: that
    evaluation is the caller's, so it is not done twice. ``full_eval``: in-loop evaluations also
    generate (a best metric may need the generated text); otherwise they are quick."""
    r = prep.recipe
    task, pad = r.model.task, prep.tokenizer.pad_token_id
    events = CallbackList([NanGuard(), *callbacks])
    rank, world = backend.world()
    state = LoopState(
        total_steps=total_steps(r, len(prep.train_set), world),
        steps_per_epoch=datamap.num_batches(len(prep.train_set), step_batch_size(r, world)),
        optimizer=backend.make_optimizer(prep.params, r.optim),
    )
    state.callbacks = events
    records: list[dict] = []
    if resume is not None:
        backend.load_optimizer_state(state.optimizer, resume.optimizer_state)
        if resume.rng_state is not None:
            backend.set_rng_state(resume.rng_state)
        state.step, state.epoch, state.position = resume.step, resume.epoch, resume.position
        events.load_state_dict(resume.callbacks)
    eval_every = r.train.eval_every if isinstance(r.train.eval_every, int) else None
    backend.set_training(prep.model, True)
    events.on_train_begin(state)
    started = time.perf_counter()
    first_step = state.step
    # Several processes stop together, at the start of a step where one of them asks to (below): one
    # that left on its own flag would leave the others waiting in the step's all-reduce.
    stop_agreed = False
    while state.step < state.total_steps and not (state.stop if world == 1 else stop_agreed):
        if state.position >= state.steps_per_epoch:
            state.epoch, state.position = state.epoch + 1, 0
        order = epoch_order(prep, state.epoch, world)
        bs, step_rows = r.train.batch_size, step_batch_size(r, world)
        while (
            state.position < state.steps_per_epoch
            and state.step < state.total_steps
            and not (state.stop if world == 1 else stop_agreed)
        ):
            events.on_step_begin(state)
            if world > 1 and backend.all_reduce_sum([], [float(state.stop)])[1][0] > 0:
                # one process was stopped (a signal, early stopping): all stop here
                state.stop = stop_agreed = True
                break
            rows = order[state.position * step_rows : (state.position + 1) * step_rows]
            micro = [
                datamap.collate(prep.train_set, rows[i : i + bs], pad, r.data, task)
                for i in range(0, len(rows), bs)
            ]
            lr = lr_at(state.step, r.optim.lr, r.schedule, state.total_steps)
            loss, grads = step_loss_and_grads(backend, prep, micro)
            grads, finite = backend.unscale_grads(state.optimizer, grads)
            grads, grad_norm = backend.clip_grads(grads, r.optim.grad_clip)
            backend.apply_update(state.optimizer, grads, lr)  # fp16 overflow: changes nothing
            state.skipped_steps += not finite
            loss = (
                loss if isinstance(loss, float) else backend.to_float(loss)
            )  # after the update: the step is done
            state.step += 1
            state.position += 1
            # tokens: non-padding input tokens, plus label tokens for seq2seq (what a step learns from;
            # a causal_lm target is part of its input)
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            if task == "seq2seq":
                tokens += sum(int((b["labels"] != -100).sum()) for b in micro)
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
            }
            if not finite:
                record["skipped"] = True  # fp16: the gradients overflowed; the loss scale drops
            records.append(record)
            fault_point(f"step-{state.step}")
            events.on_step_end(state, record)
            end_of_epoch = state.position == state.steps_per_epoch
            if (
                rank == 0
                and state.step < state.total_steps
                and ((eval_every and state.step % eval_every == 0) or (eval_every is None and end_of_epoch))
            ):
                fault_point("evaluation")
                evaluation = evaluate(backend, prep, generate=None if full_eval else False)
                state.last_eval = {"step": state.step, "epoch": state.epoch, **evaluation.metrics}
                log.info(
                    "eval at step %d: %s",
                    state.step,
                    ", ".join(f"{k}={v:.4f}" for k, v in evaluation.metrics.items()),
                )
                events.on_evaluate(state, state.last_eval)
    state.train_seconds = time.perf_counter() - started
    log.info("trained %d steps in %.1f s", state.step - first_step, state.train_seconds)
    if r.train.precision == "fp16":
        log.info(
            "fp16: %d of %d steps skipped (gradients overflowed; the loss scale adapts)",
            state.skipped_steps,
            state.step - first_step,
        )
    if state.stop and state.stop_reason:
        log.info("%s", state.stop_reason)
    events.on_train_end(state, records)
    return records, state
