"""The space file: what a sweep searches, as a pydantic schema with the recipe's error lines.

Unknown keys, wrong types and bad ranges name the dotted path (``params.optim.lr.low``), through the
recipe's own formatter; then every distribution's sample values (each choice, both ends of a range)
are applied to the recipe as overrides and validated, so a recipe key that does not exist, or a value
the recipe rejects, is one line naming it too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticKnownError

from dualtune.errors import RecipeError
from dualtune.recipe import TASK_METRICS, _format_error, _Strict, _yaml_error, load_recipe

Kind = Literal["categorical", "int", "float"]
_SCALARS = (bool, int, float, str)


def _required() -> PydanticKnownError:
    """A key this parameter's type needs: the recipe's 'required key is missing' line."""
    return PydanticKnownError("missing")


class ParamSpec(_Strict):
    """One distribution: ``choices`` (categorical), or ``type: int|float`` with ``low``/``high`` and
    ``step`` or ``log``. Fields are declared in the order their checks need one another."""

    type: Kind
    choices: list[Any] | None = Field(default=None, validate_default=True)
    log: bool = False
    low: float | None = Field(default=None, validate_default=True)
    high: float | None = Field(default=None, validate_default=True)
    step: float | None = None

    @field_validator("choices")
    @classmethod
    def _choices(cls, choices: list | None, info: ValidationInfo) -> list | None:
        kind = info.data.get("type")
        if kind != "categorical":
            if choices is not None and kind is not None:
                raise ValueError("only for type categorical")
            return choices
        if choices is None:
            raise _required()
        if not choices:
            raise ValueError(f"expected a non-empty list, got {choices!r}")
        for c in choices:
            items = c if isinstance(c, list) else [c]
            if not items or any(x is not None and not isinstance(x, _SCALARS) for x in items):
                raise ValueError(
                    f"{c!r}: expected numbers, strings, booleans, null, or non-empty lists of them"
                )
        listed = {json.dumps(c) for c in choices if isinstance(c, list)}  # how Optuna stores a list
        if len({json.dumps(c) for c in choices}) != len(choices) or any(
            isinstance(c, str) and c in listed for c in choices
        ):
            raise ValueError(f"{choices!r} repeats a value")
        return choices

    @field_validator("log")
    @classmethod
    def _log(cls, log: bool, info: ValidationInfo) -> bool:
        if info.data.get("type") == "categorical":
            raise ValueError("not for a categorical parameter (choices only)")
        return log

    @field_validator("low", "high", "step")
    @classmethod
    def _number(cls, value: float | None, info: ValidationInfo) -> float | int | None:
        kind = info.data.get("type")
        if kind is None:
            return value  # the type itself is wrong: that is the error to report
        if kind == "categorical":
            if value is not None:
                raise ValueError("not for a categorical parameter (choices only)")
            return None
        if value is None:
            if info.field_name == "step":
                return None
            raise _required()
        if kind == "int":
            if value != int(value):
                raise ValueError(f"got {value!r}, expected an integer")
            value = int(value)
        if info.field_name == "low" and info.data.get("log") and value <= 0:
            raise ValueError(f"{value!r}: a log scale needs low > 0")
        if info.field_name == "step":
            if value <= 0:
                raise ValueError(f"got {value!r}, expected > 0")
            if info.data.get("log"):
                raise ValueError("Optuna takes step or log, not both")
        return value

    @model_validator(mode="after")
    def _range(self) -> ParamSpec:
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low {self.low!r} must be below high {self.high!r}")
        return self


class PrunerSpec(_Strict):
    """Optuna's MedianPruner; a key left out keeps Optuna's default."""

    n_startup_trials: int = Field(default=5, ge=0)
    n_warmup_steps: int = Field(default=0, ge=0)
    interval_steps: int = Field(default=1, ge=1)


class SpaceFile(BaseModel):
    """The file as written. ``metric`` is checked against the recipe's task (validation context)."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    direction: Literal["maximize", "minimize"] | None = None  # None: minimize eval_loss, else maximize
    params: dict[str, ParamSpec]
    pruner: PrunerSpec | None = Field(default_factory=PrunerSpec)  # None: no pruning

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str, info: ValidationInfo) -> str:
        task = (info.context or {})["task"]
        if metric not in TASK_METRICS[task]:
            raise ValueError(
                f"got {metric!r}, expected one of the {task} metrics: {', '.join(TASK_METRICS[task])}"
            )
        return metric

    @field_validator("params")
    @classmethod
    def _params(cls, params: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not params:
            raise ValueError("expected a mapping of recipe keys (e.g. optim.lr) to distributions")
        for key in params:
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"{key!r}: expected a dotted recipe key, e.g. optim.lr")
        return params

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_words(cls, spec: Any) -> Any:
        if spec is None or spec == "median":  # `pruner:` left empty, or named: the median pruner
            return {}
        if spec == "none" or spec is False:  # YAML reads `pruner: no` / `off` as false
            return None
        return spec


def _written_out(raw: dict) -> dict:
    """The shorthands written out before validation, so an error names keys the file could hold:
    a list is the choices; choices alone are categorical; no type and no choices is ``type: None``."""
    params = raw.get("params")
    if not isinstance(params, dict):
        return raw
    out = {}
    for key, spec in params.items():
        if isinstance(spec, list):
            spec = {"choices": spec}
        if isinstance(spec, dict) and "type" not in spec:
            spec = {"type": "categorical" if "choices" in spec else None, **spec}
        out[key] = spec
    return {**raw, "params": out}


# ---------------------------------------------------------------------------------- what the sweep uses


@dataclass
class Param:
    key: str  # the recipe's dotted key
    kind: str  # categorical | int | float
    choices: list | None = None
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False

    @classmethod
    def from_spec(cls, key: str, spec: ParamSpec) -> Param:
        return cls(key, spec.type, spec.choices, spec.low, spec.high, spec.step, spec.log)

    def samples(self) -> list:
        """Values that must each make a valid recipe: every choice, else both ends of the range."""
        return list(self.choices or []) if self.kind == "categorical" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        """The trial's value: drawn now, or the one it already has (a trial run again)."""
        if self.kind == "categorical":
            choices = [json.dumps(c) if isinstance(c, list) else c for c in self.choices or []]
            return self.value(trial.suggest_categorical(self.key, choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def value(self, stored: Any) -> Any:
        """The recipe value of a value Optuna stored: a list choice (``target_modules``) is stored as
        its JSON text, since Optuna's categorical choices are numbers, strings, booleans or null."""
        if isinstance(stored, str) and any(
            isinstance(c, list) and json.dumps(c) == stored for c in self.choices or []
        ):
            return json.loads(stored)
        return stored

    def describe(self) -> dict:
        out: dict[str, Any] = {"type": self.kind}
        out.update(
            {k: getattr(self, k) for k in ("choices", "low", "high", "step") if getattr(self, k) is not None}
        )
        if self.log:
            out["log"] = True
        return out


@dataclass
class Space:
    path: Path
    metric: str
    direction: str
    params: dict[str, Param]
    pruner: dict | None = field(default_factory=dict)  # MedianPruner's arguments; None: no pruning

    def describe(self) -> dict:
        return {
            "metric": self.metric,
            "direction": self.direction,
            "params": {k: p.describe() for k, p in self.params.items()},
            "pruner": self.pruner,
        }


def override(key: str, value: Any) -> str:
    """``key=value`` as ``dualtune run`` reads it (JSON is YAML: numbers, strings, booleans, null)."""
    return f"{key}={json.dumps(value)}"


def load_space(path: str | Path, recipe: str | Path, overrides: Sequence[str] = ()) -> Space:
    """The space file, validated, then checked against the recipe: each sample value of each
    distribution applied as an override must make a valid recipe."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"space {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"space {path}: {_yaml_error(err)}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"space {path}: not UTF-8 text (byte {err.start})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"space {path}: expected a mapping with metric, direction and params")
    base = load_recipe(recipe, list(overrides))
    raw = _written_out(raw)
    try:
        spec = SpaceFile.model_validate(raw, context={"task": base.model.task})
    except ValidationError as err:
        raise RecipeError(f"space {path}: {_format_error(err, raw)}") from None
    params = {key: Param.from_spec(key, p) for key, p in spec.params.items()}
    for p in params.values():
        for value in p.samples():
            try:
                load_recipe(recipe, [*overrides, override(p.key, value)])
            except RecipeError as err:
                msg = str(err)
                if not msg.startswith(p.key):
                    msg = f"{p.key}={json.dumps(value)}: {msg}"
                raise RecipeError(f"space {path}: params: {msg}") from None
    direction = spec.direction or ("minimize" if spec.metric == "eval_loss" else "maximize")
    pruner = None if spec.pruner is None else spec.pruner.model_dump(exclude_unset=True)
    return Space(path, spec.metric, direction, params, pruner)
