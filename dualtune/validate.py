"""``dualtune validate``: everything about a run that can be checked without loading a framework or
the model's weights, and the plan the run would follow.

Checked: the recipe (by ``load_recipe``), the data (readable, decodable, its label set against
``model.num_labels`` and ``data.label_names``, rows and classes per split), lengths against the
model's ``config.json`` (``max_position_embeddings`` / ``n_positions``; T5 has relative positions),
label words against ``data.label_max_length``, the output location (free, writable, space) and the
device. ``dualtune run`` makes the same checks before its backend loads, so bad input fails in a
second, in one line, and leaves no run directory behind.

Framework-free on purpose: ``import transformers`` imports torch, which must not happen in a process
that later activates MindSpore. Tokenizing uses the ``tokenizers`` library on the model's
``tokenizer.json`` (what transformers' fast tokenizers run); a model without one gets no token
statistics.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dualtune import data as datamap
from dualtune.backend import check_precision, default_backend, framework, no_pad_token
from dualtune.errors import BackendError, DataError, RecipeError, RunDirError
from dualtune.prepare import class_weights
from dualtune.recipe import PEFT_LIBRARY_METHODS, TEXT_TASKS, Recipe
from dualtune.rundir import RunPlan, plan_run
from dualtune.tracking import check_trackers, probe_trackers

# An eval split smaller than this gives metrics that move by whole percent per row.
SMALL_EVAL = 20
# Warn when more than this share of the rows loses tokens to data.max_length.
TRUNCATED_SHARE = 0.5
# Room a run directory needs besides what the method saves (logs, metrics, plots, the adapter).
BASE_SPACE_MB = 16
# Model types whose positions are relative (no table to overrun).
RELATIVE_POSITIONS = ("t5", "mt5", "umt5", "longt5", "bart_relative")


@dataclass
class Plan:
    """What a run would do: sizes, steps, lengths, and what looks wrong but is legal."""

    recipe: str
    backend: str
    device: str
    output: str | None
    task: str
    label_names: list[str]
    rows: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    steps_per_epoch: int
    total_steps: int
    epochs: float
    eval_points: list[int]
    input_tokens: dict[str, int] | None = None  # p50, p95, max (before truncation), padded max
    target_tokens: dict[str, int] | None = None  # seq2seq, causal_lm: label words' token counts
    model_parameters: int | None = None  # from the weights file's header
    max_positions: int | None = None
    warnings: list[str] = field(default_factory=list)
    run: RunPlan | None = None  # where it writes and what it resumes (rundir.plan_run)

    def lines(self) -> list[str]:
        out = [
            f"recipe {self.recipe} on {self.backend} ({self.device})"
            + (f" -> {self.output}" if self.output else ""),
            f"task {self.task}, {len(self.label_names)} labels: {', '.join(map(datamap.shown, self.label_names))}",
            "rows: " + ", ".join(f"{k} {v}" for k, v in self.rows.items()),
        ]
        for split, counts in self.class_counts.items():
            out.append(
                f"  {split} per class: " + ", ".join(f"{datamap.shown(k)} {v}" for k, v in counts.items())
            )
        out.append(
            f"steps: {self.total_steps} ({self.steps_per_epoch} per epoch, {self.epochs:.3g} epochs); "
            f"evaluation at steps {', '.join(map(str, self.eval_points)) or 'none'}"
        )
        if self.input_tokens:
            t = self.input_tokens
            out.append(
                f"input tokens: p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; padded to at most "
                f"{t['padded']} (data.max_length {t['max_length']}), {t['truncated']} rows cut"
            )
        if self.target_tokens:
            out.append(
                "label tokens: " + ", ".join(f"{datamap.shown(k)} {v}" for k, v in self.target_tokens.items())
            )
        if self.max_positions:
            out.append(f"model positions: {self.max_positions}")
        if self.model_parameters:
            out.append(f"base model parameters: {self.model_parameters:,} (its weights file)")
        if self.run is not None and self.run.checkpoint is not None:
            out.append(f"resume: from {self.run.checkpoint} (step {self.run.step})")
            out += self.run.notes + ([self.run.changed] if self.run.changed else [])
        out += [f"warning: {w}" for w in self.warnings]
        return out


# ---------------------------------------------------------------- model files (config, tokenizer, weights)


def model_dir(name_or_path: str) -> Path | None:
    """The model's local directory: a path, ``pkg:``, or the hub cache's snapshot; None if not here."""
    from dualtune.hub import resolve_model_path

    # A zip not yet unpacked resolves to its cache folder, absent: unpacking is the run's work.
    path = Path(resolve_model_path(name_or_path, unpack=False)).expanduser()
    if path.is_dir():
        return path
    if path.name.endswith(".gguf") or gguf_file(name_or_path) is not None:
        return None  # a GGUF file: gguf_file() checks it, read_gguf() reads it
    if name_or_path.startswith("pkg:"):
        return None  # a zipped model, unpacked on the first run
    if path.exists():
        raise BackendError(f"model.name_or_path {name_or_path}: a file, not a model directory")
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise BackendError(f"model.name_or_path {name_or_path}: no such directory")
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # not a valid repo id, or no cache: the backend says what is wrong
        return None
    return Path(found).parent if isinstance(found, str) else None


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file ``name_or_path`` names (checked: it exists, and ``gguf`` can read it), or None."""
    from dualtune.hub import require_gguf, resolve_model_path

    if not name_or_path.endswith(".gguf"):
        return None
    path = Path(resolve_model_path(name_or_path)).expanduser()
    if not path.is_file():
        raise BackendError(f"model.name_or_path {name_or_path}: no such GGUF file")
    require_gguf(name_or_path)
    return path


def read_gguf(path: Path) -> tuple[dict, int]:
    """A config.json-like mapping (model_type, max_position_embeddings) and the parameter count,
    from a GGUF file's metadata and tensor table (numpy only: no framework)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError, struct.error, ... on a damaged file
        raise BackendError(f"{path}: not a readable GGUF file ({str(err).splitlines()[0][:120]})") from None

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    config: dict = {"model_type": arch}
    positions = value(f"{arch}.context_length")
    if isinstance(positions, int):
        config["max_position_embeddings"] = positions
    return config, int(sum(int(t.n_elements) for t in reader.tensors))


def read_config(directory: Path | None) -> dict | None:
    if directory is None or not (directory / "config.json").is_file():
        return None
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise BackendError(
            f"{directory / 'config.json'}: not valid JSON ({str(err).splitlines()[0]})"
        ) from None
    return config if isinstance(config, dict) else None


def max_positions(config: dict | None) -> int | None:
    """Positions the model can embed; None where positions are relative (T5) or unknown."""
    if (
        not config
        or config.get("model_type") in RELATIVE_POSITIONS
        or config.get("relative_attention_num_buckets")
    ):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def load_tokenizer(directory: Path | None):
    """The ``tokenizers`` tokenizer in ``tokenizer.json`` (no truncation, no padding), or None."""
    if directory is None or not (directory / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as err:
        raise BackendError(
            f"{directory / 'tokenizer.json'}: cannot be read ({str(err).splitlines()[0][:120]})"
        ) from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file, checked against the file's size (reads the header only)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise RunDirError(f"{path}: not a safetensors file ({size} bytes, truncated or empty)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise RunDirError(
                    f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file: "
                    f"truncated or corrupt)"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise RunDirError(f"{path}: not a safetensors file (its header is not JSON: corrupt)") from None
    if not isinstance(header, dict):
        raise RunDirError(f"{path}: not a safetensors file (corrupt header)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        if not all(isinstance(v, dict) for v in tensors.values()):
            raise TypeError
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError, OverflowError):
        raise RunDirError(f"{path}: not a safetensors file (corrupt header)") from None
    if 8 + n + end > size:
        raise RunDirError(
            f"{path}: truncated ({size} bytes, its header describes {8 + n + end}); the file "
            f"was cut while written or copied"
        )
    return tensors


def _shape(entry: dict) -> list[int]:
    shape = entry.get("shape")
    ok = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    return [int(d) for d in shape or []] if ok else []


def weight_names(directory: Path | None) -> dict[str, list[int]] | None:
    """Tensor name -> shape of the model's weights (safetensors headers, sharded or not); None if absent."""
    if directory is None:
        return None
    single = directory / "model.safetensors"
    if single.is_file():
        return {k: _shape(v) for k, v in safetensors_header(single).items()}
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(
                {str(v) for v in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()}
            )
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return None
        out: dict[str, list[int]] = {}
        for shard in shards:
            if (directory / shard).is_file():
                out.update({k: _shape(v) for k, v in safetensors_header(directory / shard).items()})
        return out
    return None


# ---------------------------------------------------------------- device and output


def check_device(backend: str, device: str) -> None:
    """An accelerator asked for must be on this machine: MindSpore otherwise fails deep inside with
    30 lines ending 'Unsupported device target'. A probe for the device files only (cheap): a
    missing driver or CANN toolkit still fails when the backend loads. DUALTUNE_SKIP_DEVICE_CHECK=1
    skips it (a machine whose devices appear elsewhere)."""
    if os.environ.get("DUALTUNE_SKIP_DEVICE_CHECK") == "1":
        return
    framework(backend).check_device(device)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(target: Path, need_mb: float) -> None:
    """The run directory can be made next to ``target`` (a real write: read-only mounts, permissions)
    and its file system has ``need_mb`` free."""
    base = _existing_ancestor(target.parent if target.name else target)
    if not base.is_dir():
        raise RunDirError(f"{target}: {base} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dualtune-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        why = (
            {
                errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied",
                errno.ENOSPC: "no space left",
                errno.EDQUOT: "disk quota exceeded",
            }.get(err.errno or 0)
            or err.strerror
            or "error"
        )
        raise RunDirError(f"{target}: cannot write in {base} ({why}); choose another --output-dir") from None
    free_mb = shutil.disk_usage(base).free / 2**20
    if free_mb < need_mb:
        raise RunDirError(
            f"{target}: {free_mb:.0f} MB free in {base}, the run needs about {need_mb:.0f} MB; "
            f"free space or choose another --output-dir"
        )


def space_needed_mb(recipe: Recipe, weights_bytes: int | None) -> float:
    """A rough lower bound: full fine-tuning saves the whole model (and AdamW state in checkpoints)."""
    need = float(BASE_SPACE_MB)
    if recipe.peft.method == "none" and weights_bytes:
        keep = recipe.train.keep_checkpoints or 2
        need += weights_bytes / 2**20 * (1 + (3 * keep if recipe.train.save_every else 0))
    return need


# ---------------------------------------------------------------- the checks


def _percentile(values: list[int], q: float) -> int:
    return int(np.percentile(values, q, method="nearest")) if values else 0


def _eval_points(recipe: Recipe, steps_per_epoch: int, total: int) -> list[int]:
    every = recipe.train.eval_every
    if isinstance(every, int):
        points = list(range(every, total, every))
    else:
        points = [
            e * steps_per_epoch
            for e in range(1, math.ceil(total / max(1, steps_per_epoch)) + 1)
            if e * steps_per_epoch < total
        ]
    return points + [total]  # and once after the last step


def check_labels(recipe: Recipe, raw: list[dict], rows: datamap.Rows, warnings: list[str]) -> None:
    """num_labels and label_names against what the data gives; degenerate label sets."""
    spec, model = recipe.data, recipe.model
    present = sorted(set(rows.labels))
    seen = [rows.label_names[i] for i in present]
    if model.num_labels is not None and not spec.label_names and len(rows.label_names) != model.num_labels:
        raise DataError(
            f"model.num_labels is {model.num_labels} but {spec.source} gives {len(rows.label_names)} "
            f"class{'es' if len(rows.label_names) != 1 else ''} ({', '.join(map(datamap.shown, rows.label_names))}); "
            f"set data.label_names to name all {model.num_labels}, or fix model.num_labels"
        )
    if len(present) == 1:
        if model.task == "classification":
            raise DataError(
                f"{spec.source}: every row has the label {seen[0]!r}; a classifier needs rows of "
                f"at least two classes"
            )
        warnings.append(f"{spec.source}: every row has the label {seen[0]!r}: the model learns one answer")
    missing = [n for i, n in enumerate(rows.label_names) if i not in present]
    if missing and len(present) > 1:
        warnings.append(
            f"{spec.source}: no rows of label{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
        )
    values = [r["label"] for r in raw]
    by_id = sum(1 for v in values if not isinstance(v, str) or datamap._is_id(v))
    if 0 < by_id < len(values):
        warnings.append(
            f"{spec.source}: the label column mixes names ({len(values) - by_id} rows) and ids "
            f"({by_id} rows); ids count in data.label_names order"
        )


def check_lengths(recipe: Recipe, config: dict | None, tok, rows: datamap.Rows, plan: Plan) -> None:
    spec, task = recipe.data, recipe.model.task
    limit = max_positions(config)
    plan.max_positions = limit
    virtual = 0
    if recipe.peft.method in ("prompt", "p_tuning") and not (config or {}).get("is_encoder_decoder"):
        virtual = getattr(recipe.peft, recipe.peft.method).num_virtual_tokens
    # causal_lm: the target and its EOS follow the prompt in the same positions
    target = spec.label_max_length + 1 if task == "causal_lm" else 0
    if limit is not None and spec.max_length + target + virtual > limit:
        plus = f" + {virtual} virtual tokens ({recipe.peft.method})" if virtual else ""
        if target:
            plus = f" + data.label_max_length {spec.label_max_length} + EOS{plus}"
        where = "its GGUF metadata" if recipe.model.name_or_path.endswith(".gguf") else "config.json"
        raise RecipeError(
            f"data.max_length {spec.max_length}{plus}: above the {limit} positions of "
            f"{recipe.model.name_or_path} ({where}); set data.max_length to at most "
            f"{limit - target - virtual}"
        )
    if tok is None:
        what = (
            "a GGUF file (its tokenizer is built when it loads)"
            if recipe.model.name_or_path.endswith(".gguf")
            else "no tokenizer.json"
        )
        plan.warnings.append(f"{recipe.model.name_or_path}: {what}; token counts and label words not checked")
        return
    special = len(tok.encode("").ids)
    if spec.max_length <= special:
        raise RecipeError(
            f"data.max_length {spec.max_length}: no room for text (the tokenizer adds {special} "
            f"special token{'s' if special != 1 else ''} to every input)"
        )
    lengths = [len(e.ids) for e in tok.encode_batch(rows.texts)]
    cut = sum(1 for n in lengths if n > spec.max_length)
    padded = spec.max_length if spec.padding == "max_length" else min(max(lengths), spec.max_length)
    plan.input_tokens = {
        "p50": _percentile(lengths, 50),
        "p95": _percentile(lengths, 95),
        "max": max(lengths),
        "padded": padded,
        "max_length": spec.max_length,
        "truncated": cut,
    }
    if cut > TRUNCATED_SHARE * len(lengths):
        plan.warnings.append(
            f"data.max_length {spec.max_length} cuts the input of {cut} of {len(lengths)} rows "
            f"({100 * cut / len(lengths):.0f} %; p50 {plan.input_tokens['p50']}, p95 "
            f"{plan.input_tokens['p95']} tokens)"
        )
    if task in TEXT_TASKS:
        check_label_words(recipe, tok, rows.label_names, sorted(set(rows.labels)), plan)


def check_pad_token(recipe: Recipe, directory: Path) -> None:
    """A tokenizer without a pad token (decoder LLMs: Llama, Mistral) needs
    ``model.pad_token_as_eos``; the run's own check (``no_pad_token``), made from the tokenizer's files."""
    if recipe.model.pad_token_as_eos:
        return
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            settings = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict) and settings.get("pad_token"):
            return
    if (directory / "tokenizer_config.json").is_file():  # else not known here: the run checks
        raise no_pad_token(recipe.model.name_or_path)


def check_label_words(recipe: Recipe, tok, names: list[str], present: list[int], plan: Plan) -> None:
    """seq2seq and causal_lm targets are the label words cut to ``data.label_max_length`` tokens
    (seq2seq's with the tokenizer's end token, causal_lm's the words' own, EOS after): cut words
    warn, words that become the same target (or no word at all) are an error."""
    limit = recipe.data.label_max_length
    special = recipe.model.task != "causal_lm"  # as data.encode_targets tokenizes them
    full = [tok.encode(n, add_special_tokens=special).ids for n in names]
    plan.target_tokens = {n: len(ids) for n, ids in zip(names, full)}
    tok.enable_truncation(limit)
    try:
        cut_ids = [tuple(tok.encode(n, add_special_tokens=special).ids) for n in names]
    finally:
        tok.no_truncation()
    kept = [tok.decode(list(ids), skip_special_tokens=True) for ids in cut_ids]
    cut = [(n, len(f), k) for n, f, ids, k in zip(names, full, cut_ids, kept) if len(f) > len(ids)]
    if not cut:
        return
    said = ", ".join(f"{n!r} ({t} tokens) -> {k!r}" for n, t, k in cut)
    empty = [n for n, k in zip(names, kept) if not k.strip()]
    same: dict[tuple, list[str]] = {}
    for i in present:
        same.setdefault(cut_ids[i], []).append(names[i])
    clash = next((group for group in same.values() if len(group) > 1), None)
    if empty or clash:
        need = max(len(full[i]) for i in present)
        why = (
            f"{', '.join(map(repr, empty))} become{'s' if len(empty) == 1 else ''} no word at all"
            if empty
            else f"{' and '.join(map(repr, clash or []))} become the same target"
        )
        raise RecipeError(
            f"data.label_max_length {limit}: {why} ({said}); set data.label_max_length to {need}"
        )
    plan.warnings.append(f"data.label_max_length {limit} cuts label words: {said}")


def validate(
    recipe: Recipe,
    backend: str | None = None,
    device: str = "cpu",
    output: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | bool | None = None,
    check_out: bool = True,
    processes: int | None = 1,
) -> Plan:
    """Every check a run can make before its framework loads; returns the plan or raises a UserError.

    ``check_out``: plan the output (``rundir.plan_run``: the target, --resume's checkpoint, and
    that the resume continues that run on ``processes`` processes; None: not known here, the run
    checks it); the run acts on that plan (``Plan.run``)."""
    backend = backend or default_backend()
    check_device(backend, device)
    check_precision(backend, device, recipe.train.precision)
    check_trackers(recipe)  # a tracker asked for but not installed: one line, before a framework loads
    probe_trackers(recipe)  # a tracker server that does not answer: one line, in seconds
    if recipe.peft.init_from and not (Path(recipe.peft.init_from) / "trainable_state.safetensors").is_file():
        # a saved adapter (not another run's exact adapter_init): whole, of this method and model
        check_adapter(recipe.peft.init_from, recipe, recipe.peft.init_from)
        config = json.loads((Path(recipe.peft.init_from) / "adapter_config.json").read_text(encoding="utf-8"))
        if recipe.peft.method == "lora" and config.get("r") not in (None, recipe.peft.lora.r):
            raise RecipeError(
                f"peft.init_from {recipe.peft.init_from}: a LoRA adapter of rank {config['r']}, but "
                f"peft.lora.r is {recipe.peft.lora.r}"
            )
    run = plan_run(recipe, backend, output, overwrite, resume) if check_out else None
    target = run.target if run is not None else None
    directory = model_dir(recipe.model.name_or_path)
    config = read_config(directory)
    weights = weight_names(directory)
    gguf, gguf_parameters = gguf_file(recipe.model.name_or_path), None
    if gguf is not None:
        config, gguf_parameters = read_gguf(gguf)

    raw = datamap.read_raw(recipe.data)
    rows = datamap.label_rows(raw, recipe.data)
    warnings: list[str] = []
    check_labels(recipe, raw, rows, warnings)
    if run is not None:
        run.data = datamap.fingerprint(rows, recipe.data)
        run.check_continuation(recipe, processes)
    train_rows, eval_rows = datamap.split_rows(rows, recipe.data.train_split, recipe.data.seed)
    names = rows.label_names
    counts = {
        split: {n: c for n, c in zip(names, np.bincount(r.labels, minlength=len(names)).tolist())}
        for split, r in (("train", train_rows), ("eval", eval_rows))
    }
    for split, per in counts.items():
        nonzero = [n for n, c in per.items() if c]
        if len(nonzero) == 1 and len(set(rows.labels)) > 1:
            warnings.append(f"the {split} split has rows of one class only ({nonzero[0]!r})")
    present = set(rows.labels)
    for split, what in (
        ("train", "the model never learns it"),
        (
            "eval",
            "it has no score; the macro averages leave it out unless it is predicted (classification_report.json: absent_labels)",
        ),
    ):
        missing = [n for i, n in enumerate(names) if i in present and not counts[split][n]]
        if missing:
            warnings.append(f"the {split} split has no rows of {', '.join(map(repr, missing))}: {what}")
    # the loss's class weights as the run computes them (balanced: every class needs training rows)
    class_weights(recipe, train_rows.labels, names)
    if len(eval_rows.texts) < SMALL_EVAL:
        warnings.append(
            f"the eval split has {len(eval_rows.texts)} rows: each one moves accuracy by "
            f"{100 / len(eval_rows.texts):.0f} points"
        )

    t = recipe.train
    per_epoch = datamap.num_batches(len(train_rows.texts), t.batch_size)
    total = min(t.epochs * per_epoch, t.max_steps) if t.max_steps else t.epochs * per_epoch
    plan = Plan(
        recipe=recipe.name or "run",
        backend=backend,
        device=device,
        output=str(target) if target is not None else None,
        task=recipe.model.task,
        label_names=list(names),
        rows={"all": len(rows.texts), "train": len(train_rows.texts), "eval": len(eval_rows.texts)},
        class_counts=counts,
        steps_per_epoch=per_epoch,
        total_steps=total,
        epochs=total / per_epoch,
        eval_points=_eval_points(recipe, per_epoch, total),
        warnings=warnings,
        run=run,
    )
    if weights:
        plan.model_parameters = int(sum(int(np.prod(s)) for s in weights.values()))
    if gguf is not None:
        plan.model_parameters = gguf_parameters
        check_lengths(recipe, config, None, rows, plan)
    elif directory is None and recipe.model.name_or_path.startswith("pkg:"):
        plan.warnings.append(
            f"model {recipe.model.name_or_path}: a zipped model, unpacked into the cache on the first "
            f"run; lengths and label words not checked"
        )
    elif directory is None:
        plan.warnings.append(
            f"model {recipe.model.name_or_path}: not on this machine (nor in the hub cache); "
            f"lengths and label words not checked"
        )
    else:
        check_pad_token(recipe, directory)
        check_lengths(recipe, config, load_tokenizer(directory), rows, plan)
    if target is not None:
        weights_bytes = None
        if directory is not None and (directory / "model.safetensors").is_file():
            weights_bytes = (directory / "model.safetensors").stat().st_size
        check_writable(target, space_needed_mb(recipe, weights_bytes))
    return plan


# ---------------------------------------------------------------- a saved adapter (eval, predict)


def _module_names(weights: dict[str, list[int]]) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in weights}


def check_adapter(run_dir: str | Path, recipe: Recipe, adapter: str | Path | None = None) -> None:
    """Before ``eval``/``predict`` load a framework: the adapter's files are whole and belong to the
    recipe's model (peft otherwise fails deep inside: 'Target modules {'v', 'q'} not found')."""
    adapter = Path(adapter) if adapter is not None else Path(run_dir) / "adapter"
    method = recipe.peft.method
    weights_file = adapter / ("model.safetensors" if method == "none" else "adapter_model.safetensors")
    if not weights_file.is_file():
        raise RunDirError(f"{weights_file}: missing (a {method} adapter is saved there)")
    tensors = safetensors_header(weights_file)
    if method == "none":
        return
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise RunDirError(f"{config_file}: missing (the adapter's configuration)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RunDirError(f"{config_file}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{config_file}: expected a JSON object")
    if not tensors:
        raise RunDirError(f"{weights_file}: holds no tensors")
    if method not in PEFT_LIBRARY_METHODS:
        return
    kind = str(config.get("peft_type", "")).lower()
    expected = {
        "prefix": "prefix_tuning",
        "prompt": "prompt_tuning",
        "p_tuning": "p_tuning",
        "lora": "lora",
        "ia3": "ia3",
    }[method]
    if kind and kind != expected:
        raise RunDirError(f"{config_file}: a {kind} adapter, but the run's recipe says peft.method {method}")
    targets = config.get("target_modules")
    trained_on = config.get("base_model_name_or_path")
    on = f"; the adapter was trained on {trained_on}" if trained_on else ""
    try:
        directory = model_dir(recipe.model.name_or_path)
        base = weight_names(directory)
        model_config = read_config(directory)
    except BackendError:
        return  # the backend says what is wrong with the model itself
    _check_sizes(
        config, config_file, tensors, weights_file, base, model_config, recipe.model.name_or_path, on
    )
    if not base or not targets:
        return
    modules = _module_names(base)
    if isinstance(targets, str):
        import re

        found = any(re.fullmatch(targets, m) for m in modules)
        wanted: str | list[str] = targets
    else:
        found = all(any(m == t or m.endswith("." + t) for m in modules) for t in targets)
        wanted = sorted(targets)
    if not found:
        raise RunDirError(
            f"{config_file}: target modules {wanted} not found in {recipe.model.name_or_path} "
            f"(the run's model.name_or_path){on}: the adapter belongs to another model"
        )


def _first_int(config: dict, *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _check_sizes(
    adapter_config: dict,
    config_file: Path,
    tensors: dict,
    weights_file: Path,
    base: dict[str, list[int]] | None,
    model_config: dict | None,
    model: str,
    on: str,
) -> None:
    """Sizes the adapter was made for against the model's: a prompt-learning adapter's width and
    layers, a LoRA matrix's input width (peft otherwise fails with a size-mismatch traceback)."""
    if model_config:
        width = _first_int(model_config, "d_model", "hidden_size", "n_embd")
        layers = _first_int(model_config, "num_layers", "num_hidden_layers", "n_layer")
        for key, have in (("token_dim", width), ("num_layers", layers)):
            want = adapter_config.get(key)
            if isinstance(want, int) and have is not None and want != have:
                raise RunDirError(
                    f"{config_file}: {key} {want}, but {model} has {have}{on}: the adapter belongs "
                    f"to another model"
                )
    if not base:
        return
    for key, entry in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        parts = module.split(".")
        # a task model's names carry a prefix the base file may lack (bert.encoder... vs encoder...)
        names = (".".join(parts[i:]) + ".weight" for i in range(len(parts)))
        match = next((name for name in names if name in base), None)
        if match is None:
            continue
        shape, base_shape = _shape(entry), base[match]
        if len(shape) == 2 and len(base_shape) == 2 and shape[1] != base_shape[1]:
            raise RunDirError(
                f"{weights_file}: {key} takes {shape[1]} inputs, but {model}'s {match} has "
                f"{base_shape[1]}{on}: the adapter belongs to another model"
            )
