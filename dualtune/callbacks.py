"""Events of the training loop, for everything around the step: progress, metrics.jsonl, the NaN
guard, checkpoints, early stopping, trackers, benchmark clocks, and a library user's own code.

A callback subclasses ``Callback`` and overrides the events it needs; each event gets the loop's
``LoopState`` (step, epoch, the model and optimizer, ``stop`` to end the run early) and the record
the loop already has. Framework-free: a callback sees numbers, not tensors.

A callback with state (early stopping's patience count, a tracker's run id) returns it from
``state_dict()`` as JSON-able values; every checkpoint keeps it, under ``state_key``, and a resumed
loop hands it back through ``load_state_dict`` before ``on_train_begin`` (Lightning's stateful
callbacks): a resumed run behaves as the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualtune.errors import DivergedError
from dualtune.metrics import better

log = logging.getLogger("dualtune")


@dataclass
class LoopState:
    """Where the loop is. ``step`` counts finished optimizer steps; ``position`` the batches of
    ``epoch`` already used (the next batch's index in the epoch's order)."""

    total_steps: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    position: int = 0
    optimizer: Any = None
    stop: bool = False  # a callback sets it to end training after this step
    stop_reason: str = ""
    last_eval: dict = field(default_factory=dict)
    skipped_steps: int = 0  # fp16: steps whose gradients overflowed, so the update was skipped
    train_seconds: float = 0.0  # the loop's own clock, from after on_train_begin to its last step
    # every callback of the loop, for the one that writes checkpoints: their state_dict() goes in it
    # and on_checkpoint is told of it
    callbacks: CallbackList | None = None


class Callback:
    """Override what you need; every event is optional."""

    @property
    def state_key(self) -> str:
        """Where a checkpoint keeps this callback's ``state_dict``: its class name (two callbacks
        of one class with state each need a key of their own)."""
        return type(self).__qualname__

    def state_dict(self) -> dict | None:
        """What a resumed run needs to carry on as if uninterrupted (JSON-able); None: nothing."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (a resume, before ``on_train_begin``)."""

    def on_train_begin(self, state: LoopState) -> None: ...

    def on_step_begin(self, state: LoopState) -> None:
        """Before the batch is turned into tensors (``state.step`` steps are done)."""

    def on_step_end(self, state: LoopState, record: dict) -> None:
        """After the update; ``record``: step, epoch, loss (a float: the step has synchronised), lr,
        grad_norm, tokens; and ``skipped: True`` when fp16's gradients overflowed (no update)."""

    def on_evaluate(self, state: LoopState, record: dict) -> None:
        """After an in-loop evaluation; ``record``: step, epoch and the metrics."""

    def on_checkpoint(self, state: LoopState, path: Path) -> None:
        """After a checkpoint was written to ``path``."""

    def on_train_end(self, state: LoopState, records: list[dict]) -> None:
        """After the last step (also when a callback stopped the run early)."""


class CallbackList(Callback):
    """Several callbacks, called in order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def on_train_begin(self, state):
        for c in self.callbacks:
            c.on_train_begin(state)

    def on_step_begin(self, state):
        for c in self.callbacks:
            c.on_step_begin(state)

    def on_step_end(self, state, record):
        for c in self.callbacks:
            c.on_step_end(state, record)

    def on_evaluate(self, state, record):
        for c in self.callbacks:
            c.on_evaluate(state, record)

    def on_checkpoint(self, state, path):
        for c in self.callbacks:
            c.on_checkpoint(state, path)

    def on_train_end(self, state, records):
        for c in self.callbacks:
            c.on_train_end(state, records)

    def state_dict(self) -> dict:
        """``{state_key: state}`` of every callback that has state."""
        out: dict[str, dict] = {}
        for c in self.callbacks:
            state = c.state_dict()
            if state is not None:
                if c.state_key in out:
                    raise ValueError(
                        f"two callbacks keep their state under {c.state_key!r}: give one a state_key"
                    )
                out[c.state_key] = state
        return out

    def load_state_dict(self, states: dict) -> None:
        for c in self.callbacks:
            if c.state_key in states:
                c.load_state_dict(states[c.state_key])


class NanGuard(Callback):
    """Stops the run at the first non-finite loss, with the step and what to try."""

    def on_step_end(self, state, record):
        if not math.isfinite(record["loss"]):
            raise DivergedError(
                f"loss is {record['loss']} at step {record['step']}; lower optim.lr or set optim.grad_clip"
            )


class MetricsFile(Callback):
    """Each ``log_every``-th step record and every evaluation, as JSON lines (``RunDir.log_metrics``)."""

    def __init__(self, write: Callable[[dict], None], log_every: int = 1):
        self.write, self.log_every = write, log_every

    def on_step_end(self, state, record):
        if record["step"] % self.log_every == 0:
            self.write(record)

    def on_evaluate(self, state, record):
        self.write({"split": "eval", **record})


class Progress(Callback):
    """A tqdm bar on a terminal; elsewhere (a log file, CI, nohup) one line every ``every`` steps
    and at the end: step, loss, lr, steps/s and time left."""

    def __init__(self, desc: str, every: int = 1, bar: bool | None = None, min_interval_s: float = 0.0):
        self.desc, self.every, self.min_interval_s = desc, every, min_interval_s
        self.bar_wanted = sys.stderr.isatty() if bar is None else bar
        self._bar: Any = None

    def on_train_begin(self, state):
        self._started, self._start_step, self._last_line = time.perf_counter(), state.step, 0.0
        if self.bar_wanted:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.total_steps, initial=state.step, desc=self.desc, unit="step")

    def on_step_end(self, state, record):
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            self._bar.update(1)
            return
        now = time.perf_counter()
        last = record["step"] == state.total_steps
        if (record["step"] % self.every == 0 and now - self._last_line >= self.min_interval_s) or last:
            self._last_line = now
            done = record["step"] - self._start_step
            rate = done / max(now - self._started, 1e-9)
            eta = (state.total_steps - record["step"]) / rate if rate > 0 else float("inf")
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  eta %s",
                record["step"],
                state.total_steps,
                record["loss"],
                record["lr"],
                rate,
                _duration(eta),
            )

    def on_train_end(self, state, records):
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class EarlyStopping(Callback):
    """Stops when ``metric`` has not improved for ``patience`` evaluations in a row."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.best: float | None = None
        self.bad = 0

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") == self.metric:  # a resume that changed best_metric starts counting afresh
            self.best, self.bad = state["best"], state["bad"]

    def on_evaluate(self, state, record):
        value = record[self.metric]
        if self.best is None or better(self.metric, value, self.best):
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            state.stop = True
            state.stop_reason = (
                f"early stopping at step {record['step']}: {self.metric} has not improved on "
                f"{self.best:.4f} for {self.bad} evaluation{'s' * (self.bad > 1)}"
            )
