"""The recipe: validation messages (whole strings), overrides, and the shipped recipes."""

from __future__ import annotations

import copy

import pytest
import yaml

from dualtune.recipe import Recipe, RecipeError, load_recipe, parse_override, recipe_from_dict
from helpers import dualtune_cli
from torch_helpers import RECIPES

LORA = RECIPES / "t5_lora.yaml"


def raw_recipe(name: str = "t5_lora.yaml") -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


def error_of(overrides: list[str], raw: dict | None = None) -> str:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw_recipe() if raw is None else raw, overrides)
    return str(err.value)


# ---------------------------------------------------------------- validation messages


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1e-3"], "optim.lrr: unknown key"),
        (["train.nope=1"], "train.nope: unknown key"),
        (["colour=red"], "colour: unknown key"),
        (
            ["train.epochs=abc"],
            "train.epochs: got 'abc' (str), expected a valid integer, unable to parse string as an integer",
        ),
        (
            ["optim.lr=abc"],
            "optim.lr: got 'abc' (str), expected a valid number, unable to parse string as a number",
        ),
        (["optim.lr=-1"], "optim.lr: got -1 (int), expected greater than 0"),
        (["optim.lr=.inf"], "optim.lr: got inf (float), expected a finite number"),
        (
            ["model.task=translation"],
            "model.task: got 'translation' (str), expected 'seq2seq', 'classification' or 'causal_lm'",
        ),
        (
            ["optim.betas=[0.9, x]"],
            "optim.betas.1: got 'x' (str), expected a valid number, unable to parse string as a number",
        ),
        # a union: the path is the user's key, and both alternatives are named
        (
            ["train.eval_every=often"],
            "train.eval_every: got 'often' (str), expected 'epoch' or a valid integer, "
            "unable to parse string as an integer",
        ),
        (
            ["train.eval_every=0"],
            "train.eval_every: got 0 (int), expected 'epoch' or greater than or equal to 1",
        ),
        (
            ["schedule.warmup_steps=2", "schedule.warmup_ratio=0.1"],
            "schedule: give warmup_steps or warmup_ratio, not both",
        ),
        (
            ["model.task=classification", "data.label_names=null"],
            "classification needs model.num_labels or data.label_names",
        ),
        (["model.num_labels=2"], "data.label_names has 3 names but model.num_labels is 2"),
        # malformed overrides
        (["justtext"], "override 'justtext': expected key=value, e.g. optim.lr=3e-4"),
        (["=3"], "override '=3': expected key=value, e.g. optim.lr=3e-4"),
        (["optim..lr=3"], "override 'optim..lr=3': expected key=value, e.g. optim.lr=3e-4"),
        (["optim.lr.value=3"], "override 'optim.lr.value=3': lr is not a section"),
        (
            ["optim.betas=[0.9"],
            "override 'optim.betas=[0.9': value is not valid YAML (while parsing a flow sequence)",
        ),
    ],
)
def test_bad_recipe_or_override_gives_one_exact_line(overrides, message):
    assert error_of(overrides) == message


@pytest.mark.parametrize(
    "section, key, message",
    [
        ("model", "task", "model.task: required key is missing"),
        ("optim", "lr", "optim.lr: required key is missing"),
        (None, "peft", "peft: required key is missing"),
    ],
)
def test_missing_required_key(section, key, message):
    raw = raw_recipe()
    del (raw[section] if section else raw)[key]
    assert error_of([], raw) == message


def test_yaml_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as err:
        load_recipe(missing)
    assert str(err.value) == f"recipe {missing}: no such file"

    unknown = tmp_path / "unknown.yaml"
    raw = raw_recipe()
    raw["train"]["epoch"] = 3  # a typo for epochs, in the file rather than an override
    unknown.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as err:
        load_recipe(unknown)
    assert str(err.value) == "train.epoch: unknown key"

    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(not_mapping)
    assert str(err.value) == f"recipe {not_mapping}: expected a mapping at the top level"


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "text, value",
    [
        ("optim.lr=3e-4", 0.0003),
        ("optim.lr=1E-2", 0.01),
        ("optim.lr=5.0e-5", 5e-05),
        ("optim.lr=.5", 0.5),
    ],
)
def test_scientific_notation_override_is_a_float(text, value):
    path, parsed = parse_override(text)
    assert path == ["optim", "lr"]
    assert type(parsed) is float and parsed == value
    recipe = load_recipe(LORA, [text])
    assert type(recipe.optim.lr) is float and recipe.optim.lr == value


def test_overrides_set_nested_keys_by_yaml_type():
    raw = raw_recipe()
    before = copy.deepcopy(raw)
    r = recipe_from_dict(
        raw,
        [
            "peft.lora.r=4",
            "peft.lora.target_modules=[q, k, v]",
            "train.eval_every=5",
            "optim.grad_clip=1",
            "data.label_names=[bad, meh, good]",
            "train.generate=false",
            "data.source=/data/my.file.jsonl",
        ],
    )
    assert raw == before  # the caller's mapping is left alone
    assert r.peft.lora.r == 4 and r.peft.lora.target_modules == ["q", "k", "v"]
    assert r.train.eval_every == 5 and r.optim.grad_clip == 1.0 and r.train.generate is False
    assert r.data.label_names == ["bad", "meh", "good"]
    assert r.data.source == "/data/my.file.jsonl"
    # untouched keys keep the file's values
    assert r.peft.lora.alpha == 32 and r.optim.lr == 1e-3


def test_override_creates_a_section_the_file_lacks_and_last_one_wins():
    raw = raw_recipe()
    del raw["schedule"]
    r = recipe_from_dict(raw, ["schedule.warmup_steps=7", "optim.lr=1", "optim.lr=2"])
    assert r.schedule.warmup_steps == 7 and r.schedule.name == "linear"
    assert r.optim.lr == 2.0


def test_recipe_name_defaults_to_file_stem_and_round_trips_through_yaml():
    r = load_recipe(LORA, ["optim.lr=3e-4"])
    assert r.name == "t5_lora"
    again = recipe_from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r


# ---------------------------------------------------------------- the shipped recipes

FPB = ["negative", "neutral", "positive"]
DISASTER = ["not_disaster", "disaster"]
EXPECTED_RECIPES = {
    "t5_prefix": ("seq2seq", "prefix", FPB),
    "t5_lora": ("seq2seq", "lora", FPB),
    "t5_bitfit": ("seq2seq", "bitfit", FPB),
    "minilm_demo": ("classification", "lora", FPB),
    "minilm_fpb": ("classification", "lora", FPB),
    "smollm2_fpb": ("classification", "lora", FPB),
    "smollm2_fpb_gen": ("causal_lm", "lora", FPB),
    "disaster_mpnet": ("classification", "lora", DISASTER),
    "disaster_smollm2": ("classification", "lora", DISASTER),
}


def test_recipes_directory_holds_the_shipped_recipes():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(EXPECTED_RECIPES)


@pytest.mark.parametrize("name", sorted(EXPECTED_RECIPES))
def test_shipped_recipe_loads(name):
    r = load_recipe(RECIPES / f"{name}.yaml")
    assert isinstance(r, Recipe)
    assert (r.model.task, r.peft.method, r.data.label_names) == EXPECTED_RECIPES[name]


def test_t5_bitfit_recipe_adds_biases_to_all_projections():
    r = load_recipe(RECIPES / "t5_bitfit.yaml")
    assert sorted(r.peft.bitfit.add_bias_to) == sorted(["q", "k", "v", "o", "wi", "wo"])


# ---------------------------------------------------------------- the CLI's answer to a bad override


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["run", str(LORA), "optim.lr=abc"],
            "dualtune: error: optim.lr: got 'abc' (str), expected a valid number, unable to parse string as a number",
        ),
        (
            ["run", str(LORA), "--backend", "torch", "train.nope=1"],
            "dualtune: error: train.nope: unknown key",
        ),
        (
            ["run", str(LORA), "--backend", "torch", "justtext"],
            "dualtune: error: override 'justtext': expected key=value, e.g. optim.lr=3e-4",
        ),
        (["run", "recipes/nope.yaml"], "dualtune: error: recipe recipes/nope.yaml: no such file"),
    ],
)
def test_cli_bad_override_exits_2_with_one_line(args, line):
    proc = dualtune_cli(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [line]
    assert proc.stdout == ""
