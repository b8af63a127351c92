"""The torch backend: each PEFT method trains exactly its parameters (counted independently of the
backend, and by peft itself), and a training step moves those and nothing else; classification
adapters reload in plain transformers + peft."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dualtune import data as datamap
from dualtune import evaluation, runner, trainer
from dualtune import prepare as preparation
from dualtune.recipe import load_recipe
from helpers import assert_moved_exactly, snapshot
from torch_helpers import RECIPES, torch_backend

T5_Q_K_V_O_WI_WO = ("q", "k", "v", "o", "wi", "wo")


@pytest.fixture(scope="module")
def backend():
    return torch_backend()


def prepare(backend, recipe_file: str, *overrides: str):
    recipe = load_recipe(RECIPES / recipe_file, list(overrides))
    return preparation.prepare(recipe, backend)


def t5_prepared(backend, tiny_t5, fin_data, recipe_file, *overrides):
    return prepare(
        backend,
        recipe_file,
        f"model.name_or_path={tiny_t5}",
        f"data.source={fin_data}",
        # two steps: LoRA's B starts at zero, so A only gets a gradient from step 2
        "train.max_steps=2",
        "train.eval_every=1000",
        "optim.weight_decay=0",
        *overrides,
    )


def bert_prepared(backend, tiny_bert, fin_data, *overrides):
    return prepare(
        backend,
        "minilm_demo.yaml",
        f"model.name_or_path={tiny_bert}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "train.max_steps=2",
        "train.eval_every=1000",
        "optim.weight_decay=0",
        # no warmup: step 1 at lr 0 would leave LoRA's B at zero and A without a gradient
        "schedule.warmup_ratio=null",
        *overrides,
    )


def base_t5(tiny_t5):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)


def base_bert(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)


def linears(model, suffixes) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in suffixes
    }


def assert_one_step_moves_exactly(backend, prep):
    before = snapshot(backend, prep.model)
    records, _ = trainer.train(backend, prep)
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    assert_moved_exactly(before, snapshot(backend, prep.model), prep.trainable)
    trainable = set(prep.trainable)
    # the model's own requires_grad flags agree with what the backend reports
    assert trainable == {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert sum(prep.trainable.values()) == sum(p.numel() for p in prep.params)


def peft_count(prep) -> int:
    trainable, total = prep.model.get_nb_trainable_parameters()
    assert total == prep.total_params
    return trainable


# ---------------------------------------------------------------- tiny T5 (seq2seq)


def test_t5_prefix(backend, tiny_t5, fin_data):
    prep = t5_prepared(backend, tiny_t5, fin_data, "t5_prefix.yaml")
    cfg = prep.model.base_model.config
    n_tokens = prep.recipe.peft.prefix.num_virtual_tokens
    expected = n_tokens * cfg.num_layers * 2 * cfg.d_model  # tokens x layers x (key, value) x width
    assert sum(prep.trainable.values()) == expected == peft_count(prep)
    assert all("prompt_encoder" in n for n in prep.trainable)
    assert_one_step_moves_exactly(backend, prep)


def test_t5_lora(backend, tiny_t5, fin_data):
    prep = t5_prepared(backend, tiny_t5, fin_data, "t5_lora.yaml")
    lo = prep.recipe.peft.lora
    targets = linears(base_t5(tiny_t5), lo.target_modules)
    assert len(targets) == 12  # q and v of 2 encoder self-, 2 decoder self- and 2 cross-attentions
    expected = sum(lo.r * (m.in_features + m.out_features) for m in targets.values())
    assert sum(prep.trainable.values()) == expected == peft_count(prep)
    adapted = {n.removeprefix("base_model.model.").split(".lora_")[0] for n in prep.trainable}
    assert adapted == set(targets)
    assert all(".lora_A." in n or ".lora_B." in n for n in prep.trainable)
    assert_one_step_moves_exactly(backend, prep)


def test_t5_bitfit_with_added_biases(backend, tiny_t5, fin_data):
    prep = t5_prepared(backend, tiny_t5, fin_data, "t5_bitfit.yaml")
    assert tuple(prep.recipe.peft.bitfit.add_bias_to) == T5_Q_K_V_O_WI_WO
    base = base_t5(tiny_t5)
    targets = linears(base, T5_Q_K_V_O_WI_WO)
    assert all(m.bias is None for m in targets.values())  # T5 has no biases of its own
    tables = {n: p.numel() for n, p in base.named_parameters() if "relative_attention_bias" in n}
    expected = {f"{n}.bias": m.out_features for n, m in targets.items()} | tables
    assert prep.trainable == expected
    assert len(tables) == 2 and len(targets) == 32
    # the added biases start at zero, so the model computes what it did before
    for name in targets:
        assert not prep.model.get_submodule(name).bias.any()
    assert_one_step_moves_exactly(backend, prep)


def test_t5_bitfit_without_added_biases_trains_only_relative_attention_tables(backend, tiny_t5, fin_data):
    prep = t5_prepared(backend, tiny_t5, fin_data, "t5_bitfit.yaml", "peft.bitfit.add_bias_to=[]")
    cfg = prep.model.config
    assert prep.trainable == {
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": cfg.relative_attention_num_buckets
        * cfg.num_heads,
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": cfg.relative_attention_num_buckets
        * cfg.num_heads,
    }
    assert_one_step_moves_exactly(backend, prep)


def test_t5_bitfit_without_added_biases_warns(backend, tiny_t5, fin_data, caplog):
    logger = logging.getLogger("dualtune")
    logger.addHandler(caplog.handler)  # the CLI may have turned propagation off
    try:
        with caplog.at_level(logging.WARNING, logger="dualtune"):
            t5_prepared(backend, tiny_t5, fin_data, "t5_bitfit.yaml", "peft.bitfit.add_bias_to=[]")
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("add_bias_to" in w for w in warnings), warnings


def test_t5_bitfit_with_added_biases_does_not_warn(backend, tiny_t5, fin_data, caplog):
    logger = logging.getLogger("dualtune")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="dualtune"):
            t5_prepared(backend, tiny_t5, fin_data, "t5_bitfit.yaml")
    finally:
        logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "dualtune"]


def test_t5_full_finetuning(backend, tiny_t5, fin_data):
    prep = t5_prepared(backend, tiny_t5, fin_data, "t5_prefix.yaml", "peft.method=none")
    base = base_t5(tiny_t5)
    assert prep.trainable == {n: p.numel() for n, p in base.named_parameters()}
    assert sum(prep.trainable.values()) == prep.total_params
    assert_one_step_moves_exactly(backend, prep)


# ---------------------------------------------------------------- tiny BERT (classification)

HEAD = ("classifier.weight", "classifier.bias")


def head_size(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n in HEAD)


def test_bert_lora(backend, tiny_bert, fin_data):
    prep = bert_prepared(backend, tiny_bert, fin_data)
    lo = prep.recipe.peft.lora
    base = base_bert(tiny_bert)
    targets = linears(base, lo.target_modules)
    # query, key, value and the 3 dense layers of 2 layers, and the pooler's dense (suffix match)
    assert len(targets) == 13
    expected = sum(lo.r * (m.in_features + m.out_features) for m in targets.values()) + head_size(base)
    assert sum(prep.trainable.values()) == expected == peft_count(prep)
    heads = {n for n in prep.trainable if "classifier.modules_to_save" in n}
    assert len(heads) == 2  # the fresh head trains (peft's modules_to_save)
    adapted = {n.removeprefix("base_model.model.").split(".lora_")[0] for n in set(prep.trainable) - heads}
    assert adapted == set(targets)
    assert_one_step_moves_exactly(backend, prep)


def test_bert_prefix(backend, tiny_bert, fin_data):
    prep = bert_prepared(backend, tiny_bert, fin_data, "peft.method=prefix")
    cfg = prep.model.base_model.config
    base = base_bert(tiny_bert)
    expected = (
        prep.recipe.peft.prefix.num_virtual_tokens * cfg.num_hidden_layers * 2 * cfg.hidden_size
        + head_size(base)
    )
    assert sum(prep.trainable.values()) == expected == peft_count(prep)
    assert {n.split(".")[0] for n in prep.trainable} == {"prompt_encoder", "base_model"}
    assert_one_step_moves_exactly(backend, prep)


def test_bert_bitfit(backend, tiny_bert, fin_data):
    prep = bert_prepared(backend, tiny_bert, fin_data, "peft.method=bitfit")
    base = base_bert(tiny_bert)
    expected = {n: p.numel() for n, p in base.named_parameters() if "bias" in n or n in HEAD}
    assert prep.trainable == expected
    assert "classifier.weight" in prep.trainable and "bert.pooler.dense.weight" not in prep.trainable
    assert_one_step_moves_exactly(backend, prep)


def test_bert_full_finetuning(backend, tiny_bert, fin_data):
    prep = bert_prepared(backend, tiny_bert, fin_data, "peft.method=none")
    base = base_bert(tiny_bert)
    assert prep.trainable == {n: p.numel() for n, p in base.named_parameters()}
    assert_one_step_moves_exactly(backend, prep)


# ---------------------------------------------------------------- classification adapters reload


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_classification_adapter_reloads_in_plain_peft(backend, tiny_bert, fin_data, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoTokenizer

    recipe = load_recipe(
        RECIPES / "minilm_demo.yaml",
        [
            f"model.name_or_path={tiny_bert}",
            f"data.source={fin_data}",
            "data.max_rows=null",
            f"peft.method={method}",
            "optim.lr=1e-2",
            "train.epochs=2",
        ],
    )
    run = runner.run_recipe(recipe, backend, tmp_path / method, progress=False)
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]

    model = PeftModel.from_pretrained(base_bert(tiny_bert), run / "adapter").eval()
    saved = load_recipe(run / "recipe.yaml")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = datamap.load_rows(saved.data)
    _, eval_rows = datamap.split_rows(rows, saved.data.train_split, saved.data.seed)
    enc = datamap.encode(eval_rows, tok, saved.data, "classification")
    logits = []
    with torch.no_grad():
        for b in datamap.batches(enc, saved.train.batch_size, tok.pad_token_id, saved.data, "classification"):
            out = model(
                input_ids=torch.from_numpy(b["input_ids"]),
                attention_mask=torch.from_numpy(b["attention_mask"]),
            )
            logits.append(out.logits.numpy())
    logits = np.concatenate(logits)

    assert len(predictions) == len(logits) == 40  # 200 rows, train_split 0.8
    assert [p["label"] for p in predictions] == [rows.label_names[i] for i in eval_rows.labels]
    assert [p["pred"] for p in predictions] == [rows.label_names[i] for i in logits.argmax(-1)]
    np.testing.assert_allclose(logits, [p["logits"] for p in predictions], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- evaluation order


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_evaluate_reads_longest_first_and_returns_dataset_order(backend, tiny_t5, tiny_bert, fin_data, kind):
    """Length-sorted eval batches (padding: longest) give the predictions of fixed-length batches, per row."""

    def predictions(padding):
        if kind == "bert":
            prep = bert_prepared(backend, tiny_bert, fin_data, f"data.padding={padding}")
        else:
            prep = t5_prepared(
                backend, tiny_t5, fin_data, "t5_lora.yaml", f"data.padding={padding}", "train.generate=true"
            )
        backend.seed(0)
        return prep, evaluation.evaluate(backend, prep).predictions

    prep, by_length = predictions("longest")
    _, fixed = predictions("max_length")
    assert datamap.eval_order(prep.eval_set, prep.recipe.data).tolist() != list(range(len(prep.eval_set)))
    assert [p["label"] for p in by_length] == [prep.label_names[item] for item in prep.eval_set.labels]
    if kind == "bert":
        np.testing.assert_allclose([p["logits"] for p in by_length], [p["logits"] for p in fixed], atol=1e-5)
    else:
        assert [(p["teacher_forced"], p["generated"]) for p in by_length] == [
            (p["teacher_forced"], p["generated"]) for p in fixed
        ]
