"""What the bench's parent and its sides share: the warm-up counts, the error, the recipe as a side
runs it, token counting and the timed-steps fields of a side's result. No framework is imported here."""

from __future__ import annotations

WARMUP_STEPS = 1
WARMUP_EVAL_BATCHES = 1


class BenchError(RuntimeError):
    """One line for the user."""


def count_tokens(input_mask, labels) -> int:
    """Non-pad input tokens + label tokens (labels != -100), numpy or tensor alike."""
    return int((input_mask != 0).sum()) + int((labels != -100).sum())


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def load_bench_recipe(cfg: dict, extra: list[str] = (), side: str = "dualtune"):
    """The recipe as a side runs it: the bench's overrides, then the side's own (the reference's:
    --reference; the dualtune side's: --nproc's batch size per process)."""
    from dualtune.recipe import load_recipe

    own = list(cfg.get(f"{side}_overrides", []))
    return load_recipe(cfg["recipe"], list(cfg["overrides"]) + own + list(extra))


def data_settings(recipe) -> dict:
    """The data settings a side ran with (they may differ between sides: --reference)."""
    return {"padding": recipe.data.padding, "group_by_length": recipe.train.group_by_length}


def timed_steps(steps: int, step_ends: list[float], step_tokens: list[int]) -> dict:
    """The timed part of a side's training: the ``steps`` after the warm-up, from the time each step
    ended and its tokens (warm-up steps included in both lists)."""
    return {
        "train_steps": steps,
        "train_seconds": step_ends[-1] - step_ends[WARMUP_STEPS - 1],
        "step_seconds": [b - a for a, b in zip(step_ends[WARMUP_STEPS - 1 :], step_ends[WARMUP_STEPS:])],
        "train_tokens": sum(step_tokens[WARMUP_STEPS:]),
    }
