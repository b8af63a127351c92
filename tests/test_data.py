"""The dataset map: seeded splits and batches that are byte-identical from run to run, and the
financial_phrasebank formats (``sentence@label`` text, latin-1, the original zip)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dualtune import data as datamap
from dualtune import synthetic
from dualtune.data import DataError, Encoded, Rows
from dualtune.recipe import DataSpec, load_recipe
from torch_helpers import RECIPES

LABELS = ["negative", "neutral", "positive"]


def spec(source, **kw) -> DataSpec:
    return DataSpec(source=str(source), label_names=kw.pop("label_names", LABELS), **kw)


def pipeline(data_spec: DataSpec, tokenizer, task: str, batch_size: int, shuffle_seed: int | None):
    """load -> split -> encode -> batches, from scratch."""
    rows = datamap.load_rows(data_spec)
    train, evaluation = datamap.split_rows(rows, data_spec.train_split, data_spec.seed)
    enc = datamap.encode(train, tokenizer, data_spec, task)
    return list(
        datamap.batches(enc, batch_size, tokenizer.pad_token_id, data_spec, task, shuffle_seed=shuffle_seed)
    ), evaluation


def assert_identical(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype == np.int64
            assert a[key].shape == b[key].shape
            assert a[key].tobytes() == b[key].tobytes()


@pytest.fixture(scope="module")
def t5_tokenizer(tiny_t5):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_t5)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", ["seq2seq", "classification"])
def test_two_passes_give_byte_identical_batches(fin_data, t5_tokenizer, task):
    data_spec = load_recipe(RECIPES / "t5_lora.yaml", [f"data.source={fin_data}"]).data
    first, eval_a = pipeline(data_spec, t5_tokenizer, task, 8, shuffle_seed=42)
    second, eval_b = pipeline(data_spec, t5_tokenizer, task, 8, shuffle_seed=42)
    assert len(first) == math.ceil(180 / 8)  # 200 rows, 20 to eval
    assert_identical(first, second)
    assert eval_a.texts == eval_b.texts and eval_a.labels == eval_b.labels


def test_other_shuffle_seed_reorders_the_same_examples(fin_data, t5_tokenizer):
    data_spec = spec(fin_data)
    a, _ = pipeline(data_spec, t5_tokenizer, "classification", 1, shuffle_seed=42)
    b, _ = pipeline(data_spec, t5_tokenizer, "classification", 1, shuffle_seed=43)
    rows_a = [(x["input_ids"].tobytes(), int(x["labels"][0])) for x in a]
    rows_b = [(x["input_ids"].tobytes(), int(x["labels"][0])) for x in b]
    assert rows_a != rows_b
    assert sorted(rows_a) == sorted(rows_b)  # a permutation, nothing lost or repeated
    unshuffled, _ = pipeline(data_spec, t5_tokenizer, "classification", 1, shuffle_seed=None)
    assert [(x["input_ids"].tobytes(), int(x["labels"][0])) for x in unshuffled] not in (rows_a, rows_b)


def test_other_split_seed_gives_another_split(fin_data):
    rows = datamap.load_rows(spec(fin_data))
    _, eval_42 = datamap.split_rows(rows, 0.9, 42)
    _, eval_7 = datamap.split_rows(rows, 0.9, 7)
    assert len(eval_42.texts) == len(eval_7.texts) == 20
    assert eval_42.texts != eval_7.texts


_CHILD = r"""
import hashlib, json, sys
from dualtune import data as datamap
from dualtune.recipe import DataSpec

class Words:  # a deterministic stand-in tokenizer: the map, not the tokenizer, is under test
    pad_token_id = 0
    def __call__(self, texts, truncation, max_length):
        ids = [[3 + sum(map(ord, w)) % 1000 for w in t.split()][: max_length - 1] + [1] for t in texts]
        return {"input_ids": ids}

spec = DataSpec(source=sys.argv[1], label_names=["negative", "neutral", "positive"], max_length=16)
rows = datamap.load_rows(spec)
train, _ = datamap.split_rows(rows, spec.train_split, spec.seed)
enc = datamap.encode(train, Words(), spec, "seq2seq")
h = hashlib.sha256()
for b in datamap.batches(enc, 8, 0, spec, "seq2seq", shuffle_seed=42, group_by_length=True):
    for k in sorted(b):
        h.update(k.encode()); h.update(str(b[k].dtype).encode()); h.update(str(b[k].shape).encode())
        h.update(b[k].tobytes())
print(h.hexdigest())
"""


def test_batches_do_not_depend_on_the_process(fin_data):
    """Two fresh processes with different string-hash seeds cut the same bytes."""
    digests = []
    for hash_seed in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, fin_data],
            capture_output=True,
            text=True,
            env={
                "PYTHONHASHSEED": hash_seed,
                "PATH": "/usr/bin:/bin",
                "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_OFFLINE": "1",
                "HOME": str(Path.home()),
            },
            check=True,
        )
        digests.append(proc.stdout.strip())
    assert len(digests[0]) == 64 and digests[0] == digests[1]


# ---------------------------------------------------------------- length-grouped batches


def test_length_grouped_batches_pad_less_and_keep_every_example(fin_data, t5_tokenizer):
    data_spec = spec(fin_data, max_rows=None)
    rows = datamap.load_rows(data_spec)
    enc = datamap.encode(rows, t5_tokenizer, data_spec, "classification")
    lengths = [len(x) for x in enc.input_ids]

    def cut(group):
        return list(
            datamap.batches(enc, 8, 0, data_spec, "classification", shuffle_seed=7, group_by_length=group)
        )

    plain, grouped = cut(False), cut(True)
    assert [b["input_ids"].tobytes() for b in grouped] == [b["input_ids"].tobytes() for b in cut(True)]

    # the same examples, each once: sorted (text length, label) pairs agree
    def seen(bs):
        return sorted(
            (int(m.sum()), int(item)) for b in bs for m, item in zip(b["attention_mask"], b["labels"])
        )

    assert seen(grouped) == seen(plain) and len(seen(grouped)) == len(enc)
    padded = lambda bs: sum(b["input_ids"].size for b in bs)  # noqa: E731
    assert padded(grouped) < 0.8 * padded(plain)
    assert grouped[0]["input_ids"].shape[1] == max(lengths)  # the longest batch comes first


def test_length_grouping_sorts_within_windows():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    order = np.arange(10)
    grouped = datamap.length_grouped(order, lengths, batch_size=2)  # one window of 50 batches
    assert [lengths[i] for i in grouped] == [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    # windows of 50 x 1 examples: each window sorted on its own, longest window head first
    lengths = list(range(60)) + list(range(100, 140))
    grouped = datamap.length_grouped(np.arange(100), lengths, batch_size=1)
    assert [lengths[i] for i in grouped[:3]] == [139, 48, 47]  # 139 swapped with window 1's head 49
    assert sorted(grouped.tolist()) == list(range(100))


def test_eval_order_is_longest_first_and_stable_unless_padding_to_max_length(fin_data, t5_tokenizer):
    data_spec = spec(fin_data, max_rows=None)
    enc = datamap.encode(datamap.load_rows(data_spec), t5_tokenizer, data_spec, "classification")
    order = datamap.eval_order(enc, data_spec)
    keys = [(-len(enc.input_ids[i]), i) for i in order]
    assert keys == sorted(keys) and sorted(order.tolist()) == list(range(len(enc)))
    sorted_pad = sum(
        b["input_ids"].size for b in datamap.batches(enc, 8, 0, data_spec, "classification", order=order)
    )
    plain_pad = sum(b["input_ids"].size for b in datamap.batches(enc, 8, 0, data_spec, "classification"))
    assert sorted_pad < 0.8 * plain_pad
    fixed = spec(fin_data, max_rows=None, padding="max_length")
    assert datamap.eval_order(enc, fixed).tolist() == list(range(len(enc)))


# ---------------------------------------------------------------- split sizes


@pytest.mark.parametrize(
    "n, train_fraction, n_eval",
    [
        (2264, 0.9, 227),  # financial_phrasebank (all agree)
        (200, 0.9, 20),
        (10, 0.75, 3),  # ceil(2.5)
        (10, 0.7, 3),  # (1 - 0.7) * 10 is 3.0000000000000004 in floats: still 3
        (7, 0.5, 4),  # ceil(3.5)
    ],
)
def test_split_sizes_round_eval_up(n, train_fraction, n_eval):
    rows = Rows([f"row {i}" for i in range(n)], [i % 3 for i in range(n)], LABELS)
    train, evaluation = datamap.split_rows(rows, train_fraction, seed=42)
    assert len(evaluation.texts) == n_eval and len(train.texts) == n - n_eval
    # a partition of the rows, labels travelling with their texts
    assert sorted(train.texts + evaluation.texts) == sorted(rows.texts)
    for part in (train, evaluation):
        assert all(label == int(text.split()[1]) % 3 for text, label in zip(part.texts, part.labels))


@pytest.mark.parametrize("n, train_fraction", [(2264, 0.9), (200, 0.9), (10, 0.75), (7, 0.5), (1001, 0.8)])
def test_split_sizes_match_datasets_train_test_split(n, train_fraction):
    import datasets

    hf = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(
        test_size=round(1 - train_fraction, 6), seed=0
    )
    rows = Rows([str(i) for i in range(n)], [0] * n, ["x"])
    train, evaluation = datamap.split_rows(rows, train_fraction, seed=0)
    assert (len(train.texts), len(evaluation.texts)) == (len(hf["train"]), len(hf["test"]))


def test_2264_row_file_gives_227_eval_rows(tmp_path):
    path = tmp_path / "fpb_sized.jsonl"
    datamap.write_jsonl(synthetic.generate(rows=2264, seed=3), path)
    rows = datamap.load_rows(spec(path))
    assert len(rows.texts) == 2264
    train, evaluation = datamap.split_rows(rows, 0.9, 42)
    assert (len(train.texts), len(evaluation.texts)) == (2037, 227)


def test_too_few_rows_to_split():
    rows = Rows(["only one"], [0], ["x"])
    with pytest.raises(DataError) as err:
        datamap.split_rows(rows, 0.9, 42)
    assert str(err.value) == "1 rows cannot be split 0.9/0.1"


# ---------------------------------------------------------------- padding


def test_seq2seq_labels_pad_with_minus_100_and_inputs_with_pad_id():
    enc = Encoded(
        input_ids=[[5, 6, 7, 1], [8, 1]], targets=[[20, 1], [21, 22, 1]], labels=[0, 1], texts=["a", "b"]
    )
    d = DataSpec(source="x", max_length=6, label_max_length=4)
    batch = datamap.collate(enc, [0, 1], pad_id=0, spec=d, task="seq2seq")
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 1], [8, 1, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["labels"], [[20, 1, -100], [21, 22, 1]])

    fixed = datamap.collate(
        enc, [1, 0], pad_id=0, spec=d.model_copy(update={"padding": "max_length"}), task="seq2seq"
    )
    np.testing.assert_array_equal(fixed["input_ids"], [[8, 1, 0, 0, 0, 0], [5, 6, 7, 1, 0, 0]])
    np.testing.assert_array_equal(fixed["labels"], [[21, 22, 1, -100], [20, 1, -100, -100]])
    assert all(v.dtype == np.int64 for v in fixed.values())


def test_real_tokenizer_label_padding(fin_data, t5_tokenizer):
    d = spec(fin_data, padding="max_length", max_length=40, label_max_length=3)
    batches, _ = pipeline(d, t5_tokenizer, "seq2seq", 8, shuffle_seed=None)
    labels = np.concatenate([b["labels"] for b in batches])
    assert labels.shape[1] == 3
    words = t5_tokenizer(LABELS)["input_ids"]
    # each label row is one label word's ids followed by -100 only; never the pad id
    for row in labels:
        ids = [int(x) for x in row if x != -100]
        assert ids in words
        assert list(row[len(ids) :]) == [-100] * (3 - len(ids))
    assert (labels == t5_tokenizer.pad_token_id).sum() == 0
    assert (labels == -100).any()


def test_classification_batches_hold_class_ids(fin_data, t5_tokenizer):
    batches, _ = pipeline(spec(fin_data), t5_tokenizer, "classification", 8, shuffle_seed=None)
    assert batches[0]["labels"].shape == (8,)
    assert set(np.concatenate([b["labels"] for b in batches]).tolist()) <= {0, 1, 2}


# ---------------------------------------------------------------- financial_phrasebank formats

FPB_LINES = (
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn .@positive\r\n"
    "\r\n"
    "Contact: info@example.com for the annual report .@neutral\r\n"
    "L\u00e4nnen Tehtaat 's net sales fell \u00a3 3 mn@negative\r\n"
    "Sales dropped \x85 sharply in Q3 .@negative\r\n"
)
FPB_ROWS = (
    [
        "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn .",
        "Contact: info@example.com for the annual report .",
        "L\u00e4nnen Tehtaat 's net sales fell \u00a3 3 mn",
        "Sales dropped \x85 sharply in Q3 .",
    ],
    [2, 1, 0, 0],
)


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_sentence_at_label_text_file(tmp_path, encoding):
    path = tmp_path / "Sentences_AllAgree.txt"
    path.write_bytes(FPB_LINES.encode(encoding))
    rows = datamap.load_rows(spec(path))
    assert (rows.texts, rows.labels) == FPB_ROWS
    assert rows.label_names == LABELS


def test_label_names_default_to_sorted_label_strings(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(b"good news@up\nbad news@down\nno news@flat\n")
    rows = datamap.load_rows(DataSpec(source=str(path)))
    assert rows.label_names == ["down", "flat", "up"]
    assert rows.labels == [2, 0, 1]


@pytest.mark.parametrize(
    "content, lineno, shown",
    [
        (b"Fine line@positive\n\nno separator on this line\n", 3, "no separator on this line"),
        (b"Fine line@positive\nThe label is missing@\n", 2, "The label is missing@"),
        (b"@neutral\n", 1, "@neutral"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, content, lineno, shown):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        datamap.load_rows(spec(path))
    assert str(err.value) == f"{path}:{lineno}: expected 'sentence@label', got {shown!r}"


def test_unknown_label_is_an_error(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_bytes(b"Fine line@positive\nOdd line@bullish\n")
    with pytest.raises(DataError) as err:
        datamap.load_rows(spec(path))
    assert str(err.value) == f"{path}:2: label 'bullish' is not one of ['negative', 'neutral', 'positive']"


# ---------------------------------------------------------------- tables (csv, tsv, json, jsonl, parquet)

TABLE = {
    "text": ["Profit rose 5 % .", "Sales fell , again", "The board met on Monday ."],
    "sentiment": ["positive", "negative", "neutral"],
}


def write_table(path: Path, columns: dict) -> Path:
    import pandas as pd

    frame = pd.DataFrame(columns)
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_table_with_named_columns(tmp_path, suffix):
    path = write_table(tmp_path / f"fin{suffix}", TABLE)
    rows = datamap.load_rows(spec(path, text_field="text", label_field="sentiment"))
    assert rows.texts == TABLE["text"]
    assert rows.labels == [2, 0, 1]
    train, evaluation = datamap.split_rows(rows, 0.5, seed=3)
    assert (len(train.texts), len(evaluation.texts)) == (1, 2)


def test_integer_labels_in_a_table(tmp_path):
    path = write_table(tmp_path / "ids.csv", {"sentence": ["a b", "c d", "e f"], "label": [2, 0, 1]})
    rows = datamap.load_rows(spec(path))
    assert rows.labels == [2, 0, 1]


def test_missing_column_names_the_columns(tmp_path):
    path = write_table(tmp_path / "fin.csv", TABLE)
    with pytest.raises(DataError) as err:
        datamap.load_rows(spec(path))  # default text_field "sentence"
    assert str(err.value) == (
        f"{path}: no column 'sentence' (columns: text, sentiment); set data.text_field / data.label_field"
    )


@pytest.mark.parametrize(
    "suffix, content, where, what",
    [
        (".csv", "sentence,label\nfine,positive\n,negative\n", ":3", "empty or missing 'sentence'"),
        (".csv", "sentence,label\nfine,positive\nno label here,\n", ":3", "empty or missing 'label'"),
        (
            ".jsonl",
            '{"sentence": "fine", "label": "positive"}\n{"sentence": "odd", "label": "bullish"}\n',
            ":2",
            "label 'bullish' is not one of ['negative', 'neutral', 'positive']",
        ),
        (".csv", "sentence,label\nfine,positive\nway off,7\n", ":3", "label '7' is outside 0..2"),
    ],
)
def test_bad_table_row_names_file_and_line(tmp_path, suffix, content, where, what):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        datamap.load_rows(spec(path))
    assert str(err.value) == f"{path}{where}: {what}"


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl", "empty.parquet", "Sentences_AllAgree.txt"])
def test_empty_file_is_an_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\n\n" if name.endswith(".txt") else b"")
    with pytest.raises(DataError) as err:
        datamap.load_rows(spec(path))
    assert str(err.value) == (f"{path}: no usable rows" if name.endswith(".txt") else f"{path}: empty file")


def test_unreadable_table_is_one_line(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError) as err:
        datamap.load_rows(spec(path))
    assert str(err.value).startswith(f"{path}: cannot be read as parquet (")
    assert "\n" not in str(err.value)


def make_fpb_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("FinancialPhraseBank-v1.0/License.txt", "not data")
        zf.writestr("FinancialPhraseBank-v1.0/Sentences_AllAgree.txt", FPB_LINES.encode("latin-1"))
        zf.writestr(
            "FinancialPhraseBank-v1.0/Sentences_50Agree.txt",
            "Half agree on this one .@neutral\nAnd this one@positive\n".encode("latin-1"),
        )
    return path


@pytest.mark.parametrize(
    "config, expected",
    [
        (None, FPB_ROWS),
        ("sentences_allagree", FPB_ROWS),
        ("sentences_50agree", (["Half agree on this one .", "And this one"], [1, 2])),
    ],
)
def test_fpb_zip_loads_by_config(tmp_path, config, expected):
    archive = make_fpb_zip(tmp_path / "FinancialPhraseBank-v1.0.zip")
    rows = datamap.load_rows(spec(archive, config=config))
    assert (rows.texts, rows.labels) == expected
    # a directory holding the zip loads the same rows
    rows = datamap.load_rows(spec(tmp_path, config=config))
    assert (rows.texts, rows.labels) == expected


def test_fpb_zip_errors(tmp_path):
    archive = make_fpb_zip(tmp_path / "FinancialPhraseBank-v1.0.zip")
    with pytest.raises(DataError) as err:
        datamap.load_rows(spec(archive, config="sentences_75agree"))
    assert str(err.value) == f"{archive}: no Sentences_75Agree.txt inside the zip"
    with pytest.raises(DataError) as err:
        datamap.load_rows(spec(archive, config="sentences_99agree"))
    assert str(err.value) == (
        "data.config 'sentences_99agree': expected one of sentences_allagree, "
        "sentences_75agree, sentences_66agree, sentences_50agree"
    )


def test_max_rows_keeps_the_first_rows(fin_data):
    full = datamap.load_rows(spec(fin_data))
    first = datamap.load_rows(spec(fin_data, max_rows=50))
    assert first.texts == full.texts[:50] and first.labels == full.labels[:50]
    assert full.texts == [r["sentence"] for r in map(json.loads, Path(fin_data).read_text().splitlines())]
