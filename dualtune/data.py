"""The dataset map: load rows, split them (seeded), tokenize once, and cut numpy batches.

Everything here is framework-free: the same recipe and seed give byte-identical batches in the
same order on every backend. Backends only turn the numpy arrays into tensors.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualtune.errors import DataError
from dualtune.recipe import DataSpec

FPB_REPO = "takala/financial_phrasebank"
FPB_ZIP = "data/FinancialPhraseBank-v1.0.zip"
FPB_CONFIGS = {
    "sentences_allagree": "AllAgree",
    "sentences_75agree": "75Agree",
    "sentences_66agree": "66Agree",
    "sentences_50agree": "50Agree",
}


@dataclass
class Rows:
    texts: list[str]
    labels: list[int]
    label_names: list[str]


@dataclass
class Encoded:
    """Tokenized examples, unpadded; ``targets`` are label token ids (seq2seq, causal_lm) or class ids."""

    input_ids: list[list[int]]
    targets: list  # list[list[int]] for seq2seq and causal_lm, list[int] for classification
    labels: list[int]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------- loading


def _parse_sentence_at_label(raw: bytes, origin: str) -> list[dict]:
    """financial_phrasebank's own format: ``sentence@label`` per line (latin-1 in the original)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    rows = []
    # Lines end at \n, \r\n or \r only, as when reading the file in text mode: str.splitlines()
    # would also split at \x85, \x0b, \x0c, \x1c-\x1e, which latin-1 text can hold inside a sentence.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("@")
        if not sep or not sentence.strip() or not label.strip():
            raise DataError(f"{origin}:{lineno}: expected 'sentence@label', got {line[:60]!r}")
        rows.append({"sentence": sentence.strip(), "label": label.strip(), "where": f"{origin}:{lineno}"})
    return rows


def _fpb_member(config: str | None) -> str:
    key = (config or "sentences_allagree").lower()
    if key not in FPB_CONFIGS:
        raise DataError(f"data.config {config!r}: expected one of {', '.join(FPB_CONFIGS)}")
    return f"Sentences_{FPB_CONFIGS[key]}.txt"


def _read_fpb_zip(path: Path, config: str | None) -> list[dict]:
    member = _fpb_member(config)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + member) or n == member]
            if not names:
                raise DataError(f"{path}: no {member} inside the zip")
            raw = zf.read(names[0])
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"{path}: not a readable zip ({' '.join(str(err).split())[:120] or type(err).__name__})"
        ) from None
    return _parse_sentence_at_label(raw, f"{path}!{names[0]}")


def _blank(path: Path) -> bool:
    """Empty or whitespace only, read no further than the first chunk that is not."""
    with path.open("rb") as f:
        return not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), b""))


def _check_text_file(path: Path) -> list[tuple[int, dict]] | None:
    """A csv/tsv/json/jsonl file must be UTF-8 (the builders' own errors name neither file nor line,
    and count rows from 0). JSONL is parsed here, one JSON object per line: returns (line, object)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            f"save the file as UTF-8"
        ) from None
    if path.suffix.lower() != ".jsonl":
        return None
    records = []
    for lineno, record in enumerate(text.split("\n"), 1):
        if not record.strip():
            continue
        try:
            value = json.loads(record)
        except ValueError as err:
            msg = getattr(err, "msg", str(err).splitlines()[0] if str(err) else type(err).__name__)
            col = f" at column {err.colno}" if hasattr(err, "colno") else ""
            raise DataError(f"{path}:{lineno}: not valid JSON ({msg}{col})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(value).__name__}")
        records.append((lineno, value))
    return records


def _rows_from_jsonl(records: list[tuple[int, dict]], spec: DataSpec, path: Path) -> list[dict]:
    """JSONL rows as ``_rows_from_hf`` gives them, without Arrow (which refuses a label column that
    mixes numbers and names, and counts rows from 0)."""
    columns = list(dict.fromkeys(k for _, r in records for k in r))
    missing = [f for f in (spec.text_field, spec.label_field) if f not in columns]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(map(shown, columns))}); "
            f"set data.text_field / data.label_field"
        )
    rows = []
    for lineno, record in records:
        text, label = record.get(spec.text_field), record.get(spec.label_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: empty or missing {spec.text_field!r}")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{path}:{lineno}: empty or missing {spec.label_field!r}")
        rows.append({"sentence": text, "label": label, "where": f"{path}:{lineno}"})
    return rows


def _read_table(path: Path, spec: DataSpec) -> list[dict]:
    import datasets

    builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    kind = builder.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type (csv, tsv, json, jsonl, parquet, txt, zip)")
    if _blank(path):
        raise DataError(f"{path}: empty file")
    if kind != "parquet":
        records = _check_text_file(path)
        if records is not None:
            return _rows_from_jsonl(records, spec, path)
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    datasets.disable_progress_bars()  # a one-off conversion of a small file; our own bar is the run's
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # the builders' errors (pyarrow, pandas) name neither file nor line
        cause = err.__cause__ or err
        raise DataError(
            f"{path}: cannot be read as {path.suffix.lower()[1:]} "
            f"({type(cause).__name__}: {str(cause).splitlines()[0][:120]})"
        ) from None
    # Where a row came from, for error lines: csv/tsv and jsonl by line (csv has a header line).
    first_line = {".csv": 2, ".tsv": 2, ".jsonl": 1}.get(path.suffix.lower())
    where = (lambda i: f"{path}:{first_line + i}") if first_line else (lambda i: f"{path}: record {i + 1}")
    return _rows_from_hf(ds, spec, str(path), where)


def _rows_from_hf(ds, spec: DataSpec, origin: str, where=None) -> list[dict]:
    where = where or (lambda i: f"{origin}: row {i + 1}")
    missing = [f for f in (spec.text_field, spec.label_field) if f not in ds.column_names]
    if missing:
        raise DataError(
            f"{origin}: no column {missing[0]!r} (columns: {', '.join(map(shown, ds.column_names))}); "
            f"set data.text_field / data.label_field"
        )
    feature = ds.features[spec.label_field]
    names = getattr(feature, "names", None)
    rows = []
    for i, (text, label) in enumerate(zip(ds[spec.text_field], ds[spec.label_field])):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where(i)}: empty or missing {spec.text_field!r}")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where(i)}: empty or missing {spec.label_field!r}")
        rows.append({"sentence": text, "label": names[label] if names else label, "where": where(i)})
    return rows


def _read_local(path: Path, spec: DataSpec) -> list[dict]:
    if path.is_dir():
        hits = sorted(path.rglob(_fpb_member(spec.config)))
        if hits:
            return _parse_sentence_at_label(hits[0].read_bytes(), str(hits[0]))
        zips = sorted(path.rglob("FinancialPhraseBank*.zip"))
        if zips:
            return _read_fpb_zip(zips[0], spec.config)
        raise DataError(f"{path}: directory has no {_fpb_member(spec.config)} or FinancialPhraseBank zip")
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return _read_fpb_zip(path, spec.config)
    if suffix == ".txt":
        return _parse_sentence_at_label(path.read_bytes(), str(path))
    return _read_table(path, spec)


def _read_hub(spec: DataSpec) -> list[dict]:
    hint = (
        f"no local file or directory {spec.source!r}, and the hub could not be reached; "
        f"point data.source at a local copy (a csv/jsonl file, a Sentences_*.txt or the "
        f"FinancialPhraseBank zip)"
    )
    if spec.source in ("financial_phrasebank", FPB_REPO):
        # The script loader is gone from current `datasets`; the repo still holds the original zip.
        from huggingface_hub import hf_hub_download

        try:
            zip_path = hf_hub_download(FPB_REPO, FPB_ZIP, repo_type="dataset")
        except Exception as err:  # offline, DNS, auth: all mean "get a local copy"
            raise DataError(f"dataset {spec.source!r}: {hint} ({type(err).__name__})") from None
        return _read_fpb_zip(Path(zip_path), spec.config)
    import datasets

    try:
        ds = datasets.load_dataset(spec.source, spec.config, split="train")
    except Exception as err:
        raise DataError(f"dataset {spec.source!r}: {hint} ({type(err).__name__})") from None
    return _rows_from_hf(ds, spec, spec.source)


LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".zip")


def looks_local(source: str) -> bool:
    """A path the user means as a local file (a hub id is ``name`` or ``owner/name``)."""
    return (
        source.lower().endswith(LOCAL_SUFFIXES)
        or source.startswith(("/", "./", "../", "~"))
        or "\\" in source
    )


def read_raw(spec: DataSpec) -> list[dict]:
    """The dataset's rows as read (``sentence``, ``label`` as the source has it, ``where``), before
    labels become ids; at most ``data.max_rows``."""
    if spec.source == "synthetic":
        from dualtune import synthetic

        raw = synthetic.generate(rows=spec.max_rows or 1000, seed=0)
    elif Path(spec.source).expanduser().exists():
        raw = _read_local(Path(spec.source).expanduser(), spec)
    elif looks_local(spec.source):
        raise DataError(f"data.source {spec.source}: no such file")
    else:
        raw = _read_hub(spec)
    if spec.max_rows is not None:
        raw = raw[: spec.max_rows]
    if not raw:
        raise DataError(f"{spec.source}: no usable rows")
    return raw


def load_rows(spec: DataSpec) -> Rows:
    """Read the dataset named by ``spec.source`` into texts and integer labels."""
    return label_rows(read_raw(spec), spec)


def shown(name) -> str:
    """A name from the data as error lines show it: as is, or its repr when it holds a newline or
    another character that is not printable (an error stays one line)."""
    return str(name) if str(name).isprintable() else repr(name)


def _is_id(value: str) -> bool:
    """A label written as a class id ("2", "-1"), not a name."""
    return re.fullmatch(r"-?[0-9]+", value) is not None


def label_rows(raw: list[dict], spec: DataSpec) -> Rows:
    """``read_raw``'s rows with labels as ids into the label names (given, or found in the data)."""
    values = [r["label"] for r in raw]
    for i, (row, v) in enumerate(zip(raw, values)):
        if (
            isinstance(v, bool)
            or not isinstance(v, (str, int, float))
            or (isinstance(v, float) and not v.is_integer())
        ):
            raise DataError(
                f"{row.get('where', f'{spec.source}: row {i + 1}')}: label {v!r} is not a class name or id"
            )
    names = list(spec.label_names) if spec.label_names else None
    if names is None and not all(isinstance(v, str) for v in values):
        named = next((i for i, v in enumerate(values) if isinstance(v, str) and not _is_id(v)), None)
        if named is not None:
            raise DataError(
                f"{raw[named].get('where', spec.source)}: label {values[named]!r} is a name where other "
                f"rows give ids; set data.label_names to say which id is which name"
            )
    if names is None:
        names = (
            sorted({str(v) for v in values})
            if all(isinstance(v, str) for v in values)
            else [str(i) for i in range(max(int(v) for v in values) + 1)]
        )
    index = {n: i for i, n in enumerate(names)}
    labels = []
    for i, (row, v) in enumerate(zip(raw, values)):
        where = row.get("where", f"{spec.source}: row {i + 1}")
        if isinstance(v, str) and not _is_id(v):
            if v not in index:
                raise DataError(f"{where}: label {v!r} is not one of {names}")
            labels.append(index[v])
        elif isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise DataError(f"{where}: label {v!r} is not a class name or id")
        else:
            if not 0 <= int(v) < len(names):
                raise DataError(f"{where}: label {v!r} is outside 0..{len(names) - 1}")
            labels.append(int(v))
    return Rows([str(r["sentence"]) for r in raw], labels, names)


# ---------------------------------------------------------------- split, tokenize, batch


def split_rows(rows: Rows, train_fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Seeded shuffle, then the first part trains; eval gets ceil((1 - f) * n) rows as in
    ``datasets.Dataset.train_test_split`` (2264 rows at 0.9 -> 227 eval rows)."""
    train_idx, eval_idx = split_indices(len(rows.texts), train_fraction, seed)

    def take(idx) -> Rows:
        return Rows([rows.texts[i] for i in idx], [rows.labels[i] for i in idx], rows.label_names)

    return take(train_idx), take(eval_idx)


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The row indices of ``split_rows``'s train and eval parts."""
    n_eval = math.ceil(round((1.0 - train_fraction) * n, 6))
    if n_eval < 1 or n - n_eval < 1:
        raise DataError(f"{n} rows cannot be split {train_fraction:g}/{1 - train_fraction:g}")
    order = np.random.default_rng(seed).permutation(n)
    return order[: n - n_eval], order[n - n_eval :]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(rows: Rows, spec: DataSpec) -> dict:
    """What a run trained on, as ``data.json`` and every checkpoint record it: the source and its
    content (a local file's sha256, or for the hub and synthetic data a hash of the rows read), the
    rows, the label names and per-split class counts, and a hash of each split's row indices. A
    resume compares it whole: the same path with other content is another run."""
    local = Path(spec.source).expanduser()
    train_idx, eval_idx = split_indices(len(rows.texts), spec.train_split, spec.seed)
    content = hashlib.sha256(
        json.dumps([rows.texts, rows.labels, rows.label_names], ensure_ascii=False).encode()
    ).hexdigest()

    def counts(idx: np.ndarray) -> dict[str, int]:
        found = np.bincount(np.asarray(rows.labels)[idx], minlength=len(rows.label_names)).tolist()
        return dict(zip(rows.label_names, found))

    return {
        "source": spec.source,
        "file_sha256": _sha256_file(local) if local.is_file() else None,
        "rows_sha256": content,
        "rows": len(rows.texts),
        "label_names": list(rows.label_names),
        "label_counts": {"train": counts(train_idx), "eval": counts(eval_idx)},
        "train_indices_sha256": hashlib.sha256(np.ascontiguousarray(train_idx, "<i8").tobytes()).hexdigest(),
        "eval_indices_sha256": hashlib.sha256(np.ascontiguousarray(eval_idx, "<i8").tobytes()).hexdigest(),
    }


def encode_texts(texts: list[str], tokenizer, spec: DataSpec) -> list[list[int]]:
    """Input token ids, truncated to ``data.max_length``, unpadded (training, evaluation, predict)."""
    return [list(x) for x in tokenizer(list(texts), truncation=True, max_length=spec.max_length)["input_ids"]]


def uses_chat_template(tokenizer, spec: DataSpec) -> bool:
    """Whether causal_lm prompts go through the tokenizer's chat template (``data.chat_template``)."""
    return spec.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(texts: list[str], tokenizer, spec: DataSpec) -> list[list[int]]:
    """causal_lm prompts: each text as a user message in the chat template, up to the assistant's
    turn (``uses_chat_template``), else the text as the tokenizer encodes it (BOS and all); at most
    ``data.max_length`` tokens, the text cut to fit."""
    if not uses_chat_template(tokenizer, spec):
        return encode_texts(texts, tokenizer, spec)

    def templated(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        # the template writes the special tokens (BOS, turn markers) itself
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    out = []
    for text in texts:
        ids = templated(text)
        if len(ids) > spec.max_length:
            # cut the text, not the template's end: the assistant's turn must open the prompt's end
            words = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = max(0, len(words) - (len(ids) - spec.max_length))
            ids = templated(tokenizer.decode(words[:keep]))[-spec.max_length :]
        out.append(ids)
    return out


def encode_targets(words: list[str], tokenizer, spec: DataSpec, task: str) -> list[list[int]]:
    """Target token ids: seq2seq's as the tokenizer ends them (T5: ``</s>``), at most
    ``data.label_max_length``; causal_lm's the words' own tokens (no BOS), at most
    ``data.label_max_length``, then EOS, where generation stops."""
    if task != "causal_lm":
        return [
            list(t) for t in tokenizer(words, truncation=True, max_length=spec.label_max_length)["input_ids"]
        ]
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    return [list(t[: spec.label_max_length]) + [tokenizer.eos_token_id] for t in ids]


def encode(rows: Rows, tokenizer, spec: DataSpec, task: str) -> Encoded:
    """Tokenize once, without padding (padding happens per batch). causal_lm: ``input_ids`` are the
    prompts alone; ``collate`` appends the targets."""
    if task == "causal_lm":
        input_ids = encode_prompts(rows.texts, tokenizer, spec)
    else:
        input_ids = encode_texts(rows.texts, tokenizer, spec)
    if task in ("seq2seq", "causal_lm"):
        words = [rows.label_names[item] for item in rows.labels]
        targets: list = encode_targets(words, tokenizer, spec, task)
    else:
        targets = list(rows.labels)
    return Encoded(input_ids, targets, list(rows.labels), list(rows.texts))


def _pad(seqs: list[list[int]], value: int, length: int) -> np.ndarray:
    out = np.full((len(seqs), length), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def collate_inputs(ids: list[list[int]], pad_id: int, spec: DataSpec) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask``, padded as ``data.padding`` says (no labels: predict)."""
    length = spec.max_length if spec.padding == "max_length" else max(len(s) for s in ids)
    return {
        "input_ids": _pad(ids, pad_id, length),
        "attention_mask": _pad([[1] * len(s) for s in ids], 0, length),
    }


def collate_prompts(ids: list[list[int]], pad_id: int, spec: DataSpec) -> dict[str, np.ndarray]:
    """causal_lm prompts for generation: padded on the LEFT, so every row's next token follows
    its own last token (positions come from the attention mask), to the longest prompt whatever
    ``data.padding`` says (generation's shapes grow token by token anyway)."""
    length = max(len(s) for s in ids)
    input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(ids), length), dtype=np.int64)
    for i, s in enumerate(ids):
        if s:
            input_ids[i, -len(s) :] = s
            attention_mask[i, -len(s) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_causal(prompts: list[list[int]], targets: list[list[int]], pad_id: int, spec: DataSpec):
    """causal_lm training rows: prompt + target (EOS included), padded on the right; labels -100 on
    the prompt and the padding (the loss is the mean over target tokens), the target ids after."""
    rows = [p + t for p, t in zip(prompts, targets)]
    length = (
        spec.max_length + spec.label_max_length + 1 if spec.padding == "max_length" else max(map(len, rows))
    )
    labels = np.full((len(rows), length), -100, dtype=np.int64)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        labels[i, len(p) : len(p) + len(t)] = t
    return {
        "input_ids": _pad(rows, pad_id, length),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0, length),
        "labels": labels,
    }


def collate(enc: Encoded, idx, pad_id: int, spec: DataSpec, task: str) -> dict[str, np.ndarray]:
    if task == "causal_lm":
        return collate_causal([enc.input_ids[i] for i in idx], [enc.targets[i] for i in idx], pad_id, spec)
    batch = collate_inputs([enc.input_ids[i] for i in idx], pad_id, spec)
    if task == "seq2seq":
        tgt = [enc.targets[i] for i in idx]
        tlen = spec.label_max_length if spec.padding == "max_length" else max(len(t) for t in tgt)
        batch["labels"] = _pad(tgt, -100, tlen)  # -100: ignored by the loss
    else:
        batch["labels"] = np.asarray([enc.targets[i] for i in idx], dtype=np.int64)
    return batch


# Length grouping sorts within windows of this many batches (transformers' LengthGroupedSampler's rule).
MEGABATCH_BATCHES = 50


def length_grouped(order: np.ndarray, lengths: list[int], batch_size: int) -> np.ndarray:
    """``order`` regrouped so each batch holds examples of similar length, padding less: windows of
    MEGABATCH_BATCHES batches, each sorted longest first (stable), and the longest batch of all
    first, so a run that will run out of memory does so at step 1. Deterministic given ``order``."""
    window = MEGABATCH_BATCHES * batch_size
    parts = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        parts.append(chunk[np.argsort([-lengths[i] for i in chunk], kind="stable")])
    grouped = np.concatenate(parts) if parts else order
    # the window heads are their windows' longest batches; move the longest of them to the front
    heads = list(range(0, len(grouped), window))
    longest = max(heads, key=lambda h: lengths[grouped[h]])
    if longest:
        first, other = grouped[:batch_size].copy(), grouped[longest : longest + batch_size].copy()
        if len(other) == batch_size:
            grouped[:batch_size], grouped[longest : longest + batch_size] = other, first
    return grouped


def eval_order(enc: Encoded, spec: DataSpec) -> np.ndarray:
    """The order evaluation reads ``enc`` in: longest first (stable) when batches pad to their
    longest row, so each batch pads little; dataset order when every batch pads to max_length."""
    if spec.padding == "max_length":
        return np.arange(len(enc))
    return np.argsort([-len(x) for x in enc.input_ids], kind="stable")


def shuffled_order(enc: Encoded, batch_size: int, seed: int, group_by_length: bool = False) -> np.ndarray:
    """A seeded permutation of ``enc``'s rows (identical on every backend), regrouped into batches of
    similar length when ``group_by_length`` (``length_grouped``)."""
    order = np.random.default_rng(seed).permutation(len(enc))
    if group_by_length:
        order = length_grouped(order, [len(x) for x in enc.input_ids], batch_size)
    return order


def batches(
    enc: Encoded,
    batch_size: int,
    pad_id: int,
    spec: DataSpec,
    task: str,
    shuffle_seed: int | None = None,
    group_by_length: bool = False,
    order: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches in ``order``, else in a seeded order (``shuffle_seed``), else in dataset order;
    ``group_by_length`` regroups the seeded order into batches of similar length (``length_grouped``)."""
    if order is None and shuffle_seed is not None:
        order = shuffled_order(enc, batch_size, shuffle_seed, group_by_length)
    elif order is None:
        order = np.arange(len(enc))
    for start in range(0, len(order), batch_size):
        yield collate(enc, order[start : start + batch_size], pad_id, spec, task)


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def write_jsonl(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    for r in rows:
        buf.write(json.dumps(r, ensure_ascii=False) + "\n")
    path.write_text(buf.getvalue())
