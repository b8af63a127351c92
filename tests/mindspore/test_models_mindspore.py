"""Models from files and packages on MindSpore (the torch suite's tests/test_models.py): a tiny Llama
as a GGUF file and a tiny MPNet zipped in parts load as written and train (3 LoRA steps lower the
loss). gguf and the tiny models' writers need no torch: the process stays mindtorch's."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from dualtune.recipe import ModelSpec
from helpers import dualtune_cli, prepared, steps_on_one_batch
from model_files import write_tiny_llama_gguf, zip_folder_in_parts

pytestmark = [
    pytest.mark.mindspore,
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf"),
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return str(path), write_tiny_llama_gguf(path)


def test_gguf_loads_as_written_and_keeps_mindtorch(ms, tiny_gguf):
    path, weights = tiny_gguf
    spec = ModelSpec(name_or_path=path, task="classification")
    tok = ms.load_tokenizer(spec)
    model = ms.load_model(spec, ["a", "b"], tok)
    params = {n: ms.to_numpy(p) for n, p in model.named_parameters()}
    for name, value in weights.items():
        if name != "lm_head.weight":
            np.testing.assert_array_equal(params[name], value, err_msg=name)
    assert (tok.eos_token, tok.pad_token) == ("</s>", "</s>") and tok("the growth")["input_ids"] == [
        119,
        260,
        35,
        106,
        264,
        122,
        119,
        107,
    ]
    assert "mindtorch" in sys.modules["torch"].__file__


def test_gguf_lora_steps_lower_the_loss(ms, tiny_gguf, fin_data):
    prep = prepared(
        ms,
        "minilm_demo.yaml",
        f"model.name_or_path={tiny_gguf[0]}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "schedule.warmup_ratio=null",
        "peft.lora.target_modules=[q_proj,v_proj]",
    )
    losses = steps_on_one_batch(ms, prep, steps=3, lr=1e-2)
    assert losses[2] < losses[0] - 1e-3, losses


def test_zipped_mpnet_lora_steps_lower_the_loss(ms, workdir, tmp_path, monkeypatch, fin_data):
    folder = workdir / "tiny-mpnet"
    if not folder.exists():
        dualtune_cli("tiny", "mpnet", str(folder), "--backend", "torch")  # a child process: real torch
    site = tmp_path / "site"
    site.mkdir()
    zip_folder_in_parts(folder, site, "tiny-mpnet", parts=3)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DUALTUNE_CACHE", str(tmp_path / "cache"))
    prep = prepared(
        ms,
        "minilm_demo.yaml",
        "model.name_or_path=pkg:tiny-mpnet-part_001/input/tiny-mpnet.zip",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "schedule.warmup_ratio=null",
        "peft.lora.target_modules=[q,v]",
    )
    losses = steps_on_one_batch(ms, prep, steps=3, lr=1e-2)
    assert losses[2] < losses[0] - 1e-3, losses
