"""The recipe: one YAML file that says what to fine-tune and how, validated into a typed object.

Unknown keys and wrong types are errors that name the dotted path, the value and what was
expected. ``key=value`` overrides (torchtune style) are applied to the raw mapping before
validation, so they are checked by the same rules.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dualtune.errors import RecipeError
from dualtune.metrics import AVERAGES


def _takes(annotation: Any, kind: type) -> bool:
    """Whether ``kind`` is one of the types ``annotation`` names (at any depth)."""
    return annotation is kind or any(_takes(a, kind) for a in get_args(annotation))


def _takes_bool(annotation: Any) -> bool:
    return _takes(annotation, bool)


class _Strict(BaseModel):
    # inf/nan are never meant (optim.lr=inf would pass gt=0 and train to nan).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: train.batch_size=true would train with batch 1.
        annotation = cls.model_fields[str(info.field_name)].annotation
        if isinstance(value, bool) and not _takes_bool(annotation):
            what = (
                "an integer"
                if _takes(annotation, int)
                else "a number"
                if _takes(annotation, float)
                else "text"
            )
            raise ValueError(f"got {value!r} (bool), expected {what}")
        return value


class ModelSpec(_Strict):
    name_or_path: str
    # causal_lm: a decoder-only model writes the target text after the prompt (text-to-text, as seq2seq)
    task: Literal["seq2seq", "classification", "causal_lm"]
    num_labels: int | None = Field(default=None, ge=2)
    # Decoder LLMs ship without a pad token; the seeds' workflow sets it to eos.
    pad_token_as_eos: bool = False


class DataSpec(_Strict):
    source: str  # hub id, or a local file or directory
    config: str | None = None  # hub config / financial_phrasebank agreement level
    text_field: str = "sentence"
    label_field: str = "label"
    label_names: list[str] | None = None  # label id -> name; seq2seq and causal_lm targets use these words
    train_split: float = Field(default=0.9, gt=0.0, lt=1.0)
    seed: int = 42
    max_length: int = Field(default=128, ge=1)
    label_max_length: int = Field(default=3, ge=1)
    max_rows: int | None = Field(default=None, ge=2)  # keep the first N rows (smoke runs)
    padding: Literal["longest", "max_length"] = "longest"
    # causal_lm: the prompt as a user message in the tokenizer's chat template (auto: when it has
    # one, as instruction-tuned models were trained), or the bare text (none).
    chat_template: Literal["auto", "none"] = "auto"


class PrefixSpec(_Strict):
    num_virtual_tokens: int = Field(default=20, ge=1)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None


class LoraSpec(_Strict):
    r: int = Field(default=8, ge=1)
    alpha: float = 32
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None: peft's default for the architecture


class PromptSpec(_Strict):
    """Prompt tuning (Lester et al.): trainable virtual-token embeddings before the input."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    # Start the virtual tokens from this text's token embeddings instead of random values.
    init_text: str | None = None


class PTuningSpec(_Strict):
    """P-tuning (Liu et al.): virtual tokens produced by a small trained encoder."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    encoder: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = Field(default=None, ge=1)  # None: the model's hidden size
    encoder_num_layers: int = Field(default=2, ge=1)
    encoder_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class IA3Spec(_Strict):
    """IA3 (Liu et al.): learned vectors that rescale keys, values and feed-forward activations."""

    target_modules: list[str] | None = None  # None: peft's default for the architecture
    feedforward_modules: list[str] | None = None  # the targets whose input (not output) is scaled


class BitFitSpec(_Strict):
    # Parameters whose name contains one of these train.
    patterns: list[str] = ["bias"]
    # Bias-free models (T5): add zero-initialised biases to Linear layers whose name ends with
    # one of these (e.g. [q, v, o, wi, wo]), so BitFit trains what the paper meant.
    add_bias_to: list[str] = []


# A classification head trains with every method (peft does the same through modules_to_save):
# a fresh head is random and must learn.
HEAD_NAMES = ("classifier", "score")


def is_head_parameter(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


# Methods peft implements (its config, layers and file format); bitfit is dualtune's; none = full fine-tuning.
PEFT_LIBRARY_METHODS = ("prefix", "prompt", "p_tuning", "lora", "ia3")
# peft's prompt learning: virtual tokens (or their keys and values) before the input.
PROMPT_LEARNING_METHODS = ("prefix", "prompt", "p_tuning")


class PeftSpec(_Strict):
    method: Literal["prefix", "prompt", "p_tuning", "lora", "ia3", "bitfit", "none"]
    # Start from these adapter weights (a saved adapter directory, e.g. another run's
    # adapter_init/) instead of a fresh random initialisation: how two backends start equal.
    init_from: str | None = None
    prefix: PrefixSpec = PrefixSpec()
    prompt: PromptSpec = PromptSpec()
    p_tuning: PTuningSpec = PTuningSpec()
    lora: LoraSpec = LoraSpec()
    ia3: IA3Spec = IA3Spec()
    bitfit: BitFitSpec = BitFitSpec()


class LossSpec(_Strict):
    # Classification: weight each class's cross-entropy. "balanced" = n / (classes * count), counted
    # on the training split (scikit-learn's rule), or one weight per label in label order.
    class_weights: Literal["balanced"] | list[Annotated[float, Field(gt=0.0)]] | None = None


# What evaluation reports, per task: the names train.best_metric may use.
TASK_METRICS = {
    "classification": ["eval_loss", "accuracy", *AVERAGES],
    "seq2seq": ["eval_loss", "teacher_forced_accuracy", "exact_match", *AVERAGES],
    "causal_lm": ["eval_loss", "teacher_forced_accuracy", "exact_match", *AVERAGES],
}
# Tasks whose model writes the label as text: token-mean losses, teacher forcing, generation.
TEXT_TASKS = ("seq2seq", "causal_lm")


FLOAT32_MAX = 3.4028234663852886e38


def _float32(value: float) -> float:
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"got {value:g}, expected a number float32 can hold (at most 3.4e38)")
    return value


Float32 = Annotated[float, AfterValidator(_float32)]


class OptimSpec(_Strict):
    """AdamW (decoupled weight decay, Loshchilov & Hutter), with optional global-norm clipping."""

    # Every number must fit float32 (the parameters' and AdamW's state's type on both stacks).
    lr: Float32 = Field(gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: Float32 = Field(default=1e-8, gt=0.0)
    weight_decay: Float32 = Field(default=0.01, ge=0.0)
    grad_clip: Float32 | None = Field(default=None, gt=0.0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"got {list(betas)}, expected two numbers each in [0, 1) (AdamW's moment decays)"
            )
        return betas

    @model_validator(mode="after")
    def _update_fits_float32(self) -> OptimSpec:
        # AdamW's first step moves by lr / (1 - beta1) (bias correction): a scalar both stacks hold
        # in float32
        if self.lr / (1.0 - self.betas[0]) > FLOAT32_MAX:
            raise ValueError(
                f"lr {self.lr:g} with betas[0] {self.betas[0]:g}: AdamW's first step size lr / (1 - betas[0]) = "
                f"{self.lr / (1.0 - self.betas[0]):g} overflows float32; lower optim.lr"
            )
        return self


class ScheduleSpec(_Strict):
    name: Literal["linear", "constant"] = "linear"
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleSpec:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        return self


class TrainSpec(_Strict):
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # stop early (smoke runs, parity checks)
    batch_size: int = Field(default=8, ge=1)
    # k micro-batches of batch_size per optimizer step: the step of one batch of k * batch_size
    # (the same rows, the loss weighted by each micro-batch's share of examples or label tokens).
    grad_accum_steps: int = Field(default=1, ge=1)
    # Batches of similar length (seeded, the same on every backend): less padding, faster steps.
    group_by_length: bool = False
    eval_batch_size: int | None = Field(default=None, ge=1)
    # "epoch" or every N optimizer steps (N >= 1: 0 would silently never evaluate)
    eval_every: Literal["epoch"] | Annotated[int, Field(ge=1)] = "epoch"
    seed: int = 42
    output_dir: str = "runs/{recipe}-{backend}"  # {recipe} and {backend} are filled in
    log_every: int = Field(default=1, ge=1)
    generate: bool = True  # seq2seq, causal_lm: also evaluate by generating label text
    dropout: bool = True  # false: every dropout off (backends cannot share dropout masks)
    # bf16/fp16: the forward and loss autocast to that type; weights, gradients and AdamW's state stay
    # float32. fp16 scales the loss (dynamic) and skips steps whose gradients overflow.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # transformers' own activation checkpointing: each layer's activations are recomputed in the
    # backward pass instead of kept (less memory, about one more forward per step).
    gradient_checkpointing: bool = False
    # Keep the adapter from the evaluation with the best value of this metric (eval_loss is
    # minimised, the rest maximised); None keeps the last. Evaluations then run in full.
    best_metric: str | None = None
    # Checkpoints (checkpoints/step-N/: trainable tensors, AdamW state, loop position, RNG) every N
    # steps and at each evaluation; what `dualtune run --resume` continues from. None: only when a
    # signal stops the run.
    save_every: int | None = Field(default=None, ge=1)
    keep_checkpoints: int | None = Field(default=2, ge=1)  # the newest N (and the best); None: all
    # Stop when best_metric has not improved for this many evaluations in a row.
    early_stopping_patience: int | None = Field(default=None, ge=1)
    overwrite: bool = False  # replace output_dir if it holds a finished run (never anything else)
    save_initial: bool = False  # also write adapter_init/: the weights before step 1
    dump_activations: bool = False  # write activations.safetensors: module outputs on one batch
    # Experiment trackers (pip install dualtune[tracking]; dualtune.tracking says what goes where):
    # TensorBoard files in RUN_DIR/tensorboard, MLflow beside the run or at $MLFLOW_TRACKING_URI,
    # W&B offline unless WANDB_MODE is set. A single name is a list of one.
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    tracking_project: str | None = None  # MLflow experiment and W&B project (default: the recipe's name)
    # A tracker that fails mid-run: false (default) logs one warning and the run goes on without it
    # (metrics.jsonl and the run directory are the record); true stops the run (its checkpoints stay).
    report_to_strict: bool = False

    @field_validator("output_dir")
    @classmethod
    def _output_dir_template(cls, value: str) -> str:
        import string

        try:
            fields = [
                (name, spec, conv)
                for _, name, spec, conv in string.Formatter().parse(value)
                if name is not None
            ]
        except ValueError as err:
            raise ValueError(f"got {value!r}: {err} (a literal brace is written {{{{ or }}}})") from None
        for name, spec, conv in fields:
            if name not in ("recipe", "backend") or spec or conv:
                raise ValueError(
                    f"got {value!r}: {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} is not a "
                    "field it fills in; expected {recipe} and {backend} only"
                )
        return value

    @model_validator(mode="before")
    @classmethod
    def _report_to_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("report_to"), str):  # train.report_to=tensorboard
            data = {**data, "report_to": [data["report_to"]]}
        if isinstance(data, dict) and isinstance(data.get("report_to"), list):
            data = {**data, "report_to": list(dict.fromkeys(data["report_to"]))}
        return data


class Recipe(_Strict):
    name: str | None = None
    model: ModelSpec
    data: DataSpec
    peft: PeftSpec
    optim: OptimSpec
    schedule: ScheduleSpec = ScheduleSpec()
    loss: LossSpec = LossSpec()
    train: TrainSpec = TrainSpec()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        task = self.model.task
        if self.loss.class_weights is not None and task != "classification":
            raise ValueError("loss.class_weights applies to classification only")
        weights = self.loss.class_weights
        n_labels = self.model.num_labels or (len(self.data.label_names) if self.data.label_names else None)
        if isinstance(weights, list) and n_labels is not None and len(weights) != n_labels:
            raise ValueError(f"loss.class_weights has {len(weights)} weights for {n_labels} labels")
        metric = self.train.best_metric
        if metric is not None and metric not in TASK_METRICS[task]:
            raise ValueError(f"train.best_metric {metric!r}: expected one of {', '.join(TASK_METRICS[task])}")
        if self.train.early_stopping_patience is not None and metric is None:
            raise ValueError("train.early_stopping_patience needs train.best_metric (what must improve)")
        if task in TEXT_TASKS and metric == "exact_match" and not self.train.generate:
            raise ValueError("train.best_metric exact_match needs train.generate=true")
        if self.train.gradient_checkpointing and self.peft.method == "prefix":
            # transformers' checkpointed layers set past_key_values=None, where peft puts the prefix.
            raise ValueError(
                "train.gradient_checkpointing does not work with peft.method=prefix: transformers "
                "drops the prefix (past_key_values) inside checkpointed layers"
            )
        return self

    @model_validator(mode="after")
    def _labels_known(self) -> Recipe:
        names = self.data.label_names
        if names:
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(
                    f"data.label_names names {dup[0]!r} twice; each class needs a name of its own"
                )
        if self.model.task == "classification" and self.model.num_labels is None and not names:
            raise ValueError("classification needs model.num_labels or data.label_names")
        if names and self.model.num_labels is not None and len(names) != self.model.num_labels:
            raise ValueError(
                f"data.label_names has {len(names)} names but model.num_labels is {self.model.num_labels}"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _user_path(loc: tuple, raw: Any) -> tuple:
    """``loc`` without the tags pydantic appends for the members of a union (``literal['epoch']``,
    ``int``): the longest prefix that names something in the raw input."""
    node, path = raw, []
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, str):
            continue  # a union member's tag (list[...]) before the index into that list
        else:
            break
        path.append(part)
    return tuple(path)


def _expected(msg: str) -> str:
    msg = msg[len("Value error, ") :] if msg.startswith("Value error, ") else msg
    return msg[len("Input should be ") :] if msg.startswith("Input should be ") else msg


def _dotted(loc: tuple) -> str:
    """``train.epochs``; a key that is not plain text (a newline, a control character) as its repr,
    so the error stays one line."""
    return ".".join(str(p) if str(p).isprintable() else repr(p) for p in loc)


def _format_error(err: ValidationError, raw: Any) -> str:
    # The deepest error first: for a union, the member that got furthest into the value says most.
    errors = sorted(err.errors(), key=lambda e: -len(_user_path(e["loc"], raw)))
    first = errors[0]
    kind = first["type"]
    if kind in ("extra_forbidden", "missing"):
        path = _dotted(first["loc"])
        return f"{path}: {'unknown key' if kind == 'extra_forbidden' else 'required key is missing'}"
    loc = _user_path(first["loc"], raw)
    path = _dotted(loc)
    where = f"{path}: " if path else ""
    if "input" in first and kind != "value_error":
        # A union reports one error per member, all at the same user path: say what each accepts.
        alternatives = [
            _expected(e["msg"])
            for e in errors
            if e["type"] not in ("extra_forbidden", "missing") and _user_path(e["loc"], raw) == loc
        ]
        return f"{where}got {_describe(first['input'])}, expected {' or '.join(alternatives)}"
    return f"{where}{_expected(first['msg'])}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=3e-4`` -> (["optim", "lr"], 0.0003). The value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: expected key=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(
            f"override {text!r}: value is not valid YAML ({str(err).splitlines()[0]})"
        ) from None
    # YAML 1.1 reads 3e-4 as a string; a number is what anyone typing it means.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(
                    f"override {text!r}: {part if part.isprintable() else repr(part)} is not a section"
                )
            node = child
        node[path[-1]] = value
    return raw


def recipe_from_dict(raw: dict, overrides: Sequence[str] = ()) -> Recipe:
    raw = apply_overrides(copy.deepcopy(raw), list(overrides))
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_error(err, raw)) from None


def _yaml_error(err: yaml.YAMLError) -> str:
    """'not valid YAML at line 3, column 5: <cause>' (1-based, where the parser stopped)."""
    mark = getattr(err, "problem_mark", None)
    cause = " ".join(str(getattr(err, "problem", None) or str(err).splitlines()[0]).split())
    context = getattr(err, "context", None)
    if context:
        cause += f" ({' '.join(str(context).split())})"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML{where}: {cause}"


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path}: {_yaml_error(err)}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {path}: not UTF-8 text (byte {err.start})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: expected a mapping at the top level")
    raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, overrides)
