"""Fuzzing the input surfaces (hypothesis, fixed seed, bounded): the recipe parser and overrides, and
the data loaders. Every input either works or raises a UserError whose message is one line; no
other exception type ever escapes. The CLI turns a few fuzzed bad inputs into exit 2 and exactly one
stderr line."""

from __future__ import annotations

import itertools
import json
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dualtune import data as datamap
from dualtune.errors import UserError
from dualtune.recipe import DataSpec, load_recipe, recipe_from_dict
from helpers import RECIPES, dualtune_cli

FUZZ = dict(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
TMP = Path(tempfile.mkdtemp(prefix="dualtune-fuzz-"))
_names = (f"f{i}" for i in itertools.count())  # a fresh file name per example (datasets caches by path)
BASE = yaml.safe_load((RECIPES / "t5_lora.yaml").read_text())


def works_or_one_line(fn, *args, **kwargs):
    """``fn`` succeeds, or raises a UserError with a one-line message; anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        message = str(err)
        assert message and "\n" not in message, repr(message)
        return None


def test_hypothesis_imports_no_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import hypothesis, sys; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "False"


# ---------------------------------------------------------------- recipes and overrides

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = [
    "model.name_or_path",
    "model.task",
    "model.num_labels",
    "data.source",
    "data.label_names",
    "data.max_length",
    "data.label_max_length",
    "data.train_split",
    "data.max_rows",
    "data.padding",
    "peft.method",
    "peft.lora.r",
    "peft.lora.target_modules",
    "optim.lr",
    "optim.betas",
    "schedule.name",
    "schedule.warmup_steps",
    "schedule.warmup_ratio",
    "loss.class_weights",
    "train.epochs",
    "train.batch_size",
    "train.eval_every",
    "train.best_metric",
    "train.keep_checkpoints",
    "train",
    "model",
    "nonsense.key",
    "optim",
]


@settings(max_examples=150, **FUZZ)
@given(st.text(max_size=200))
def test_recipe_text(text):
    path = TMP / f"{next(_names)}.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    works_or_one_line(load_recipe, path)


@settings(max_examples=60, **FUZZ)
@given(st.binary(max_size=120))
def test_recipe_bytes(raw):
    path = TMP / f"{next(_names)}.yaml"
    path.write_bytes(raw)
    works_or_one_line(load_recipe, path)


@settings(max_examples=200, **FUZZ)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
@example({"train": {"\n": None}})  # found by fuzzing: a key with a newline made a two-line error
@example({"data.label_names": ["a\nb", "c"], "model.num_labels": 3})
def test_recipe_values(changes):
    """A valid recipe with some keys replaced by random values of random types."""
    raw = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    works_or_one_line(recipe_from_dict, raw)


@settings(max_examples=200, **FUZZ)
@given(
    st.lists(
        st.one_of(
            st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=12)),
            st.builds(
                lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}",
                st.sampled_from(KEYS),
                values,
            ),
            st.text(max_size=16),
        ),
        max_size=3,
    )
)
@example(["optim.x\ny.z=1", "train.\n=1"])
def test_overrides(overrides):
    works_or_one_line(recipe_from_dict, BASE, overrides)


# ---------------------------------------------------------------- data loaders

SUFFIXES = [".jsonl", ".csv", ".tsv", ".json", ".txt", ".parquet", ".zip"]
FAST = [".jsonl", ".txt", ".zip"]  # read without the datasets builders: many examples are cheap


def load(path: Path, **kw):
    return works_or_one_line(datamap.load_rows, DataSpec(source=str(path), **kw))


@settings(max_examples=120, **FUZZ)
@given(st.sampled_from(FAST), st.binary(max_size=200))
def test_random_bytes_fast_formats(suffix, raw):
    path = TMP / f"{next(_names)}{suffix}"
    path.write_bytes(raw)
    load(path)


@settings(max_examples=25, **FUZZ)
@given(st.sampled_from([".csv", ".tsv", ".json", ".parquet"]), st.binary(max_size=120))
def test_random_bytes_tables(suffix, raw):
    path = TMP / f"{next(_names)}{suffix}"
    path.write_bytes(raw)
    load(path)


texts = st.one_of(st.text(max_size=20), st.none(), st.integers(), st.floats(), st.booleans())
labels = st.one_of(
    st.sampled_from(["negative", "neutral", "positive", "0", "2", "7", "-1", "", " ", "²"]),
    st.text(max_size=6),
    st.integers(-3, 5),
    st.floats(-3, 5),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=150, **FUZZ)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["sentence", "label", "other"]), st.one_of(texts, labels), max_size=3
        ),
        max_size=6,
    ),
    st.sampled_from([None, ["negative", "neutral", "positive"], ["a"]]),
    st.sampled_from(["utf-8", "latin-1", "utf-16"]),
)
def test_jsonl_shapes(records, names, encoding):
    """One-column, empty, mistyped and mixed rows; other encodings."""
    path = TMP / f"{next(_names)}.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes(text.encode(encoding, "replace"))
    rows = load(path, label_names=names)
    if rows is not None:
        assert len(rows.texts) == len(rows.labels) and all(
            0 <= item < len(rows.label_names) for item in rows.labels
        )


@settings(max_examples=20, **FUZZ)
@given(
    st.lists(
        st.lists(
            st.text(alphabet=string.ascii_letters + " ,\"'\n0123456789", max_size=8), min_size=1, max_size=3
        ),
        max_size=5,
    )
)
def test_csv_shapes(table):
    path = TMP / f"{next(_names)}.csv"
    path.write_text("\n".join(",".join(row) for row in table))
    load(path, label_names=["negative", "neutral", "positive"])


@settings(max_examples=150, **FUZZ)
@given(
    st.lists(
        st.tuples(st.text(max_size=12), st.sampled_from(["@", "@@", ""]), st.text(max_size=8)), max_size=6
    )
)
def test_sentence_at_label_shapes(lines):
    path = TMP / f"{next(_names)}.txt"
    path.write_text("\n".join(a + sep + b for a, sep, b in lines), encoding="utf-8", errors="replace")
    load(path)


@settings(max_examples=80, **FUZZ)
@given(
    st.lists(st.sampled_from([0, 1, 2, "negative", "positive", "3", 1.0, 2.5]), min_size=2, max_size=12),
    st.floats(0.05, 0.95),
)
def test_labels_and_splits(values, split):
    path = TMP / f"{next(_names)}.jsonl"
    path.write_text(
        "".join(json.dumps({"sentence": f"row {i}", "label": v}) + "\n" for i, v in enumerate(values))
    )
    rows = load(path)
    if rows is not None:
        works_or_one_line(datamap.split_rows, rows, split, 0)


# ---------------------------------------------------------------- the CLI


@settings(max_examples=4, **FUZZ)
@given(
    st.one_of(
        st.builds(
            lambda v: ["optim.lr=" + v], st.text(alphabet=string.ascii_letters, min_size=1, max_size=8)
        ),
        st.builds(
            lambda v: ["train.batch_size=" + v], st.sampled_from(["true", "0", "-3", "1.5", "[1]", "{a: 1}"])
        ),
        st.builds(lambda raw: ["DATA", raw], st.binary(min_size=1, max_size=40).map(lambda b: b"\xff" + b)),
    )
)
def test_cli_bad_input_is_exit_2_and_one_line(tiny_t5, case):
    args = [
        str(RECIPES / "t5_lora.yaml"),
        f"model.name_or_path={tiny_t5}",
        "data.source=synthetic",
        "--output-dir",
        str(TMP / next(_names)),
    ]
    if case[0] == "DATA":
        path = TMP / f"{next(_names)}.jsonl"
        path.write_bytes(case[1])
        args[2] = f"data.source={path}"
    else:
        args += case
    proc = dualtune_cli("validate", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("dualtune: error: "), proc.stderr[
        -2000:
    ]


# ---------------------------------------------------------------- validate and saved files


@settings(max_examples=40, **FUZZ)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=30), st.sampled_from(["negative", "neutral", "positive", 0, 2])
        ),
        min_size=0,
        max_size=12,
    ),
    st.sampled_from(
        [
            [],
            ["data.max_length=2"],
            ["data.label_max_length=1"],
            ["data.train_split=0.5"],
            ["data.label_names=[positive, positive2]"],
            ["model.num_labels=2", "data.label_names=null"],
        ]
    ),
)
def test_validate_on_random_data(tiny_t5, rows, overrides):
    from dualtune.validate import validate

    path = TMP / f"{next(_names)}.jsonl"
    path.write_text("".join(json.dumps({"sentence": s, "label": item}) + "\n" for s, item in rows))
    recipe = works_or_one_line(
        load_recipe,
        RECIPES / "t5_lora.yaml",
        [f"model.name_or_path={tiny_t5}", f"data.source={path}", *overrides],
    )
    if recipe is not None:
        plan = works_or_one_line(validate, recipe, "torch", "cpu", check_out=False)
        if plan is not None:
            assert all("\n" not in line for line in plan.lines())


@settings(max_examples=100, **FUZZ)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda header, pad, extra: len(header).to_bytes(8, "little") + header + b"\0" * pad + extra,
            st.recursive(
                scalars,
                lambda inner: st.one_of(
                    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
                ),
                max_leaves=6,
            ).map(lambda v: json.dumps(v).encode()),
            st.integers(0, 64),
            st.binary(max_size=8),
        ),
    )
)
def test_safetensors_header(raw):
    from dualtune.validate import safetensors_header

    path = TMP / f"{next(_names)}.safetensors"
    path.write_bytes(raw)
    works_or_one_line(safetensors_header, path)
