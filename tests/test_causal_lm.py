"""``model.task: causal_lm`` on the tiny Llama (torch): the collated rows (prompt masked out of the
loss, target and EOS learned), chat-template prompts, generation that stops at EOS, a run whose loss
falls and whose exact match is scored on the generated text, the methods, and a killed run resumed
to the same bytes. Gradient accumulation: tests/test_grad_accum.py; parity: tests/test_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dualtune import data as datamap
from dualtune.evaluation import generate_text
from dualtune.prepare import prepare
from dualtune.recipe import load_recipe
from dualtune.trainer import train
from helpers import RECIPES, steps_on_one_batch
from torch_helpers import run_cli_parallel, torch_backend

RECIPE = RECIPES / "smollm2_fpb_gen.yaml"


def tiny_overrides(tiny_llama: str, fin_data: str, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_llama}",
        f"data.source={fin_data}",
        "peft.lora.target_modules=null",
        "train.best_metric=null",
        "schedule.warmup_ratio=null",
        *extra,
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token  # model.pad_token_as_eos
    return tok


def test_collated_labels_mask_the_prompt_and_padding(tokenizer, tiny_llama, fin_data):
    spec = load_recipe(RECIPE, tiny_overrides(tiny_llama, fin_data)).data
    rows = datamap.Rows(
        ["Net sales rose by 5 % .", "Kone won an order ."], [2, 1], ["negative", "neutral", "positive"]
    )
    enc = datamap.encode(rows, tokenizer, spec, "causal_lm")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert enc.input_ids == [tokenizer(t)["input_ids"] for t in rows.texts]  # no chat template: the text
    assert enc.input_ids[0][0] == bos
    assert enc.targets == [
        tokenizer("positive", add_special_tokens=False)["input_ids"] + [eos],
        tokenizer("neutral", add_special_tokens=False)["input_ids"] + [eos],
    ]
    batch = datamap.collate(enc, [0, 1], eos, spec, "causal_lm")
    for i in range(2):
        prompt, target = enc.input_ids[i], enc.targets[i]
        n = len(prompt) + len(target)
        assert batch["input_ids"][i, :n].tolist() == prompt + target
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][i].tolist()
        assert labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt) : n] == target
        assert labels[n:] == [-100] * (len(labels) - n)
    assert (batch["labels"] != -100).sum() == 4  # one word + EOS each: the loss's token count

    prompts = datamap.collate_prompts(enc.input_ids, eos, spec)  # generation: padded on the left
    short = len(enc.input_ids[1])
    assert prompts["input_ids"][1, -short:].tolist() == enc.input_ids[1]
    assert prompts["attention_mask"][1].tolist()[-short - 1 :] == [0] + [1] * short


def test_chat_template_prompts(tokenizer, tiny_llama, fin_data):
    tokenizer = tokenizer.__class__.from_pretrained(tiny_llama)
    # a template of the tiny vocabulary's words: roles in it would be unknown tokens
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
        "{% if add_generation_prompt %}<s> the{% endif %}"
    )
    spec = load_recipe(RECIPE, tiny_overrides(tiny_llama, fin_data, "data.max_length=12")).data
    text = "Net sales rose by 5 % ."
    (ids,) = datamap.encode_prompts([text], tokenizer, spec)
    assert tokenizer.decode(ids) == "<s> net sales rose by 5 % . </s> <s> the"
    # too long: the text is cut, the assistant's turn still ends the prompt
    (long,) = datamap.encode_prompts([text + " Profit fell ." * 5], tokenizer, spec)
    assert tokenizer.decode(long) == "<s> net sales rose by 5 % . profit </s> <s> the"
    bare = spec.model_copy(update={"chat_template": "none"})
    assert datamap.encode_prompts([text], tokenizer, bare) == [tokenizer(text)["input_ids"]]


class FakeGenerator:
    """A backend whose greedy decoding returns fixed new tokens (what a model would write)."""

    def __init__(self, new: list[list[int]]):
        self.new, self.asked = np.asarray(new), None

    def to_tensors(self, batch):
        return batch

    def generate(self, model, batch, max_new_tokens):
        self.asked = (batch, max_new_tokens)
        return self.new


def test_generation_stops_at_eos(tokenizer, tiny_llama, fin_data):
    spec = load_recipe(RECIPE, tiny_overrides(tiny_llama, fin_data, "data.label_max_length=3")).data
    word = tokenizer.convert_tokens_to_ids
    eos = tokenizer.eos_token_id
    fake = FakeGenerator(
        [
            [word("positive"), eos, word("negative"), word("neutral")],
            [word("neutral"), word("kone"), eos, eos],
        ]
    )
    prompts = [[1, word("kone")], [1, word("net"), word("sales")]]
    texts = generate_text(fake, None, tokenizer, prompts, None, spec, "causal_lm")
    assert texts == ["positive", "neutral kone"]  # nothing after the first EOS
    batch, max_new_tokens = fake.asked
    assert max_new_tokens == 4  # label_max_length + EOS
    assert batch["input_ids"][0].tolist() == [eos, 1, word("kone")]  # left padding


@pytest.fixture(scope="module")
def full_run(tiny_llama, fin_data):
    """20 steps of full fine-tuning, then the final evaluation (in this process)."""
    from dualtune.evaluation import evaluate

    backend = torch_backend()
    recipe = load_recipe(
        RECIPE,
        tiny_overrides(
            tiny_llama,
            fin_data,
            "peft.method=none",
            "optim.lr=1e-2",
            "train.max_steps=20",
            "train.dropout=false",
        ),
    )
    prep = prepare(recipe, backend)
    records, _ = train(backend, prep)
    return prep, records, evaluate(backend, prep)


def test_loss_falls_and_exact_match_is_on_generated_text(full_run):
    prep, records, evaluation = full_run
    losses = [r["loss"] for r in records]
    assert len(losses) == 20
    # measured: 6.13 -> 0.9 (a random tiny Llama, lr 1e-2)
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    predictions = evaluation.predictions
    assert len(predictions) == len(prep.eval_set) == 20
    assert all(
        set(p) == {"text", "label", "teacher_forced", "teacher_forced_correct", "generated"}
        for p in predictions
    )
    m = evaluation.metrics
    assert m["exact_match"] == np.mean([p["generated"] == p["label"] for p in predictions]) > 0
    assert m["teacher_forced_accuracy"] == np.mean([p["teacher_forced_correct"] for p in predictions])
    # up to label_max_length + 1 = 4 tokens may come: a label word alone (or EOS at once: "") means
    # generation stopped at EOS (after 20 steps some rows' first token is already EOS)
    assert {p["generated"] for p in predictions} <= {"", *prep.label_names}
    assert sum(p["generated"] != "" for p in predictions) >= 5  # measured: 8 of 20
    # greedy generation from the left-padded prompt writes what teacher forcing predicts
    assert all(p["generated"] == p["teacher_forced"] for p in predictions if p["teacher_forced_correct"])
    assert evaluation.report["predicted_from"] == "generated"
    assert set(evaluation.report["per_class"]) == set(prep.label_names)
    assert {"f1_macro", "precision_macro", "recall_macro"} <= set(m)


# peft's CAUSAL_LM task for each of its methods, BitFit and full fine-tuning: the method's tensors
# train on one batch and generation writes text.
METHODS = {
    "lora": ("3e-2", []),
    "prompt": ("3e-1", []),
    "none": ("1e-2", []),
    "prefix": ("3e-2", []),
    "p_tuning": ("3e-2", []),
    "ia3": ("3e-1", []),
    "bitfit": ("3e-2", ["peft.bitfit.add_bias_to=[q_proj,v_proj]"]),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_and_generates(tiny_llama, fin_data, method):
    from dualtune.evaluation import evaluate

    lr, extra = METHODS[method]
    backend = torch_backend()
    recipe = load_recipe(
        RECIPE,
        tiny_overrides(
            tiny_llama, fin_data, f"peft.method={method}", f"optim.lr={lr}", "optim.weight_decay=0", *extra
        ),
    )
    prep = prepare(recipe, backend)
    losses = steps_on_one_batch(backend, prep, 8, float(lr))
    assert losses[-1] < losses[0] - 0.05, losses
    evaluation = evaluate(backend, prep)
    assert all(isinstance(p["generated"], str) for p in evaluation.predictions)
    # a batch of left-padded prompts writes what each prompt writes alone
    prompts = prep.eval_set.input_ids[:6]
    assert len({len(p) for p in prompts}) > 1
    together = generate_text(
        backend, prep.model, prep.tokenizer, prompts, None, recipe.data, "causal_lm", method
    )
    alone = [
        generate_text(backend, prep.model, prep.tokenizer, [p], None, recipe.data, "causal_lm", method)[0]
        for p in prompts
    ]
    assert together == alone


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_run_resumes_to_the_same_adapter(tiny_llama, fin_data, tmp_path):
    """kill -9 right after step 10's checkpoint, then --resume: the uninterrupted run's bytes."""
    base = [
        "run",
        str(RECIPE),
        "--backend",
        "torch",
        "--no-progress",
        *tiny_overrides(tiny_llama, fin_data, "optim.lr=3e-2", "train.max_steps=20", "train.save_every=5"),
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    first = run_cli_parallel({"ref": [*base, "--output-dir", str(ref)]})["ref"]
    assert first.returncode == 0, first.stderr[-3000:]
    import os
    import subprocess

    from torch_helpers import CLI_ENV, cli_command

    killed = subprocess.run(
        cli_command(*base, "--output-dir", str(cut)),
        env={**CLI_ENV, "DUALTUNE_FAULT_AT": "checkpoint-10"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode != 0 and not cut.exists()
    resumed = subprocess.run(
        cli_command(*base, "--output-dir", str(cut), "--resume"), env=CLI_ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step-0000010" in resumed.stderr
    for name in ("adapter/adapter_model.safetensors", "metrics.jsonl", "predictions.jsonl"):
        assert (cut / name).read_bytes() == (ref / name).read_bytes(), name
    assert os.path.getsize(ref / "adapter/adapter_model.safetensors") > 0
    # predict generates as evaluation does: the eval rows' texts give their predictions' generated text
    rows = read_jsonl(ref / "predictions.jsonl")[:3]
    predicted = subprocess.run(
        cli_command("predict", str(ref), *[r["text"] for r in rows], "--backend", "torch"),
        env=CLI_ENV,
        capture_output=True,
        text=True,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert [json.loads(line)["label"] for line in predicted.stdout.splitlines()] == [
        r["generated"] for r in rows
    ]


def test_validate_counts_the_target_in_the_positions_and_needs_a_pad_token(tiny_llama, fin_data, tmp_path):
    from dualtune import validate as vmod
    from dualtune.errors import BackendError, RecipeError

    def plan(*extra: str):
        recipe = load_recipe(RECIPE, tiny_overrides(tiny_llama, fin_data, *extra))
        return vmod.validate(recipe, "torch", "cpu", tmp_path / "run")

    good = plan()
    assert good.task == "causal_lm"
    # the target words' own tokens, without the BOS the tokenizer puts before a prompt
    assert good.target_tokens == {"negative": 1, "neutral": 1, "positive": 1}
    with pytest.raises(RecipeError) as err:
        plan("data.max_length=254")
    assert str(err.value) == (
        f"data.max_length 254 + data.label_max_length 3 + EOS: above the 256 positions of {tiny_llama} "
        f"(config.json); set data.max_length to at most 252"
    )
    with pytest.raises(BackendError) as err:
        plan("model.pad_token_as_eos=false")
    assert str(err.value) == (
        f"tokenizer of {tiny_llama} has no pad token; set model.pad_token_as_eos=true (decoder LLMs)"
    )
