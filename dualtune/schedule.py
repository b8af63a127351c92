"""Learning-rate schedules as pure functions of the optimizer step (0-based)."""

from __future__ import annotations

import math

from dualtune.recipe import ScheduleSpec


def warmup_steps(spec: ScheduleSpec, total_steps: int) -> int:
    if spec.warmup_steps is not None:
        return spec.warmup_steps
    if spec.warmup_ratio is not None:
        # As transformers' TrainingArguments.get_warmup_steps: rounded up, same operand order.
        return math.ceil(total_steps * spec.warmup_ratio)
    return 0


def lr_at(step: int, base_lr: float, spec: ScheduleSpec, total_steps: int) -> float:
    """The learning rate for optimizer step ``step``: the same numbers as
    ``transformers.get_linear_schedule_with_warmup`` / ``get_constant_schedule_with_warmup``."""
    warmup = warmup_steps(spec, total_steps)
    if step < warmup:
        return base_lr * step / max(1, warmup)
    if spec.name == "constant":
        return base_lr
    return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))
