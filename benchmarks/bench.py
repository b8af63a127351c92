#!/usr/bin/env python
"""Benchmark one recipe on one backend against the plain Hugging Face way of doing the same thing.

    .venv/bin/python benchmarks/bench.py recipes/t5_prefix.yaml --backend torch --steps 10 --eval-batches 2
    .venv/bin/python benchmarks/bench.py recipes/t5_prefix.yaml --backend mindspore --out bench-ms.json

Two sides, each in a child process of its own (so peak RSS is per side, and mindnlp never shares a
process with real torch), on the same model weights, data, batch size and sequence lengths:

* ``dualtune``: ``dualtune.prepare.prepare`` + ``dualtune.trainer.train`` (the real loop, with
  ``train.max_steps`` = warm-up + N and in-loop evaluation switched off), then greedy
  ``backend.generate`` (seq2seq) or ``backend.eval_batch`` + argmax (classification) over N eval
  batches in dataset order.
* ``reference``:
  - torch: ``transformers.Seq2SeqTrainer`` (``Trainer`` for classification) + ``peft.get_peft_model``,
    ``max_steps`` = warm-up + N, no evaluation, saving, logging or reporting, default optimizer
    (``adamw_torch_fused`` with torch >= 2.8), the recipe's lr / betas / eps / weight decay /
    schedule, clipping only if the recipe clips; then the notebooks' plain ``model.generate`` loop.
  - mindspore: a plain mindnlp loop: HF model + peft under mindtorch,
    ``mindtorch.autograd.value_and_grad`` over the trainable parameters (it fills ``p.grad``), a
    hand-written in-place AdamW (``torch.optim.AdamW`` has no CPU kernel under mindtorch), the
    linear / constant schedule by hand; then the same plain generate loop. No dualtune code runs
    there except the framework-free data loader (same rows, same split).

Only the steps after one warm-up step are timed (each side syncs on the loss every step); eval
times N batches after one warm-up batch. Reported per side: steps/s, tokens/s (non-pad input
tokens + label tokens of the timed steps, per second), eval samples/s, peak RSS (``ru_maxrss`` of
the child), and the ratios dualtune / reference. A table goes to stdout, everything to ``--out``.

Models: ``--model t5-small-config`` (default for seq2seq recipes whose model is not on this disk)
writes, once per run, a T5 built from t5-small's public config.json with random weights, paired
with dualtune's word-level tokenizer over the synthetic data; ``minilm-config`` does the same with
all-MiniLM-L6-v2's config; ``tiny`` uses dualtune's tiny config; ``recipe`` keeps the recipe's own
model; anything else is a model directory. The model is written by real torch in a child process,
so both sides and both backends load identical weights. Data defaults to ``data.source=synthetic``
and ``data.padding=max_length`` (every batch is batch_size x max_length); ``k=v`` overrides after
the recipe take precedence.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from dualtune.rundir import peak_rss_mb  # stdlib only: costs neither side memory

HERE = Path(__file__).resolve()
METRICS = ("steps_per_s", "tokens_per_s", "eval_samples_per_s", "peak_rss_mb")
LABELS = {"steps_per_s": "train steps/s", "tokens_per_s": "train tokens/s",
          "eval_samples_per_s": "eval samples/s", "peak_rss_mb": "peak RSS MB"}
# With --repeat, these are the medians over the runs (the other fields are the last run's).
MEDIAN_FIELDS = METRICS + ("train_seconds", "eval_seconds", "wall_seconds", "child_wall_seconds",
                           "child_cpu_seconds", "other_cpu_seconds", "other_cpu_share")
WARMUP_STEPS = 1
# --wait-quiet: "quiet" means other processes use less than this share of the cores; a side that
# ran while they used more is run again, at most BUSY_RETRIES times.
BUSY_SHARE = 0.10
BUSY_RETRIES = 2
WARMUP_EVAL_BATCHES = 1
# The bench's defaults, before the user's overrides: synthetic data (the word-level tokenizer's
# vocabulary), every batch padded to max_length.
DATA_DEFAULTS = ["data.source=synthetic", "data.padding=max_length"]

# t5-small's public config.json (https://huggingface.co/t5-small/blob/main/config.json), without
# task_specific_params. feed_forward_proj "relu" and tied embeddings are the T5Config defaults it relies on.
T5_SMALL_CONFIG = {
    "d_model": 512, "d_ff": 2048, "d_kv": 64, "num_heads": 8, "num_layers": 6, "num_decoder_layers": 6,
    "vocab_size": 32128, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
    "feed_forward_proj": "relu", "is_encoder_decoder": True, "tie_word_embeddings": True,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "n_positions": 512,
}
# sentence-transformers/all-MiniLM-L6-v2's config.json (BERT architecture).
MINILM_CONFIG = {
    "hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 12, "num_hidden_layers": 6,
    "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12,
    "initializer_range": 0.02, "pad_token_id": 0, "position_embedding_type": "absolute",
}
GENERATED = ("t5-small-config", "minilm-config", "tiny")


class BenchError(RuntimeError):
    """One line for the user."""


# ====================================================================== shared helpers (no framework)

def count_tokens(input_mask, labels) -> int:
    """Non-pad input tokens + label tokens (labels != -100), numpy or tensor alike."""
    return int((input_mask != 0).sum()) + int((labels != -100).sum())


def load_bench_recipe(cfg: dict, extra: list[str] = (), side: str = "dualtune"):
    """The recipe as a side runs it: the bench's overrides, then (reference side) --reference."""
    from dualtune.recipe import load_recipe

    own = list(cfg.get("reference_overrides", [])) if side == "reference" else []
    return load_recipe(cfg["recipe"], list(cfg["overrides"]) + own + list(extra))


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


# ====================================================================== child: make the model

def word_tokenizer(texts):
    """dualtune's word-level tokenizer over ``texts``, checked to split words (before 95aa88f it
    encoded every sentence as ``<unk> </s>``, which would make a benchmark of two-token inputs)."""
    from dualtune.tiny import tiny_tokenizer

    tok = tiny_tokenizer(texts)
    if tok.unk_token_id in tok("operating profit rose")["input_ids"]:
        raise BenchError("dualtune.tiny.tiny_tokenizer maps known words to <unk>; inputs would be 2 tokens long")
    return tok


def child_make_model(kind: str, out_dir: str, seed: int = 0) -> None:
    import torch
    import transformers

    from dualtune import synthetic
    from dualtune.tiny import tiny_config

    texts = [r["sentence"] for r in synthetic.generate()] + synthetic.LABEL_NAMES
    tok = word_tokenizer(texts)
    torch.manual_seed(seed)
    if kind == "t5-small-config":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_SMALL_CONFIG))
    elif kind == "minilm-config":
        model = transformers.BertModel(transformers.BertConfig(**MINILM_CONFIG))
    elif kind in ("tiny-t5", "tiny-bert"):
        config = tiny_config(kind.split("-")[1], tok)
        cls = transformers.T5ForConditionalGeneration if kind == "tiny-t5" else transformers.BertModel
        model = cls(config)
    else:
        raise BenchError(f"unknown model kind {kind}")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}))


# ====================================================================== child: the dualtune side

def step_clock():
    """A loop callback that notes when each step ends (the loss has been read: the step is done)
    and its tokens."""
    from dualtune.callbacks import Callback

    class StepClock(Callback):
        def __init__(self):
            self.step_ends: list[float] = []
            self.step_tokens: list[int] = []

        def on_step_end(self, state, record):
            self.step_ends.append(time.perf_counter())
            self.step_tokens.append(record["tokens"])

    return StepClock()


def child_dualtune(cfg: dict, side: str = "dualtune") -> dict:
    from dualtune.backend import get_backend

    backend = get_backend(cfg["backend"], "cpu")
    if cfg["backend"] == "torch":
        import torch

        torch.set_num_threads(cfg["threads"])
    from dualtune import data as datamap
    from dualtune.prepare import prepare
    from dualtune.trainer import train

    total = cfg["steps"] + WARMUP_STEPS
    # train.max_steps bounds the run; an int eval_every that is never reached keeps evaluation out.
    recipe = load_bench_recipe(cfg, [f"train.max_steps={total}", "train.eval_every=1000000000"], side)
    prep = prepare(recipe, backend)
    rss = {"setup": peak_rss_mb()}
    per_epoch = datamap.num_batches(len(prep.train_set), recipe.train.batch_size)
    prep.recipe.train.epochs = max(recipe.train.epochs, math.ceil(total / per_epoch))
    timed = step_clock()
    records, _ = train(backend, prep, [timed])
    if len(records) != total or len(timed.step_ends) != total:
        raise BenchError(f"dualtune ran {len(records)} steps, the clock saw {len(timed.step_ends)}; expected {total}")
    train_seconds = timed.step_ends[-1] - timed.step_ends[WARMUP_STEPS - 1]
    step_seconds = [b - a for a, b in zip(timed.step_ends[WARMUP_STEPS - 1:], timed.step_ends[WARMUP_STEPS:])]
    train_tokens = sum(timed.step_tokens[WARMUP_STEPS:])
    rss["train"] = peak_rss_mb()

    r, task, tok = prep.recipe, prep.recipe.model.task, prep.tokenizer
    bs = r.train.eval_batch_size or r.train.batch_size
    backend.set_training(prep.model, False)
    samples, started = 0, None
    # evaluate() reads the eval split longest first (data.eval_order); time batches spread evenly
    # over that order (the longest one is the warm-up), not just its longest few; full batches only.
    import numpy as np

    order = datamap.eval_order(prep.eval_set, r.data)
    starts = range(0, max(1, len(order) - bs + 1), bs)
    picked = sorted({starts[round(k)] for k in np.linspace(0, len(starts) - 1, WARMUP_EVAL_BATCHES + cfg["eval_batches"])})
    it = datamap.batches(prep.eval_set, bs, tok.pad_token_id, r.data, task,
                         order=np.concatenate([order[a: a + bs] for a in picked]))
    for i, np_batch in enumerate(it):
        if i == WARMUP_EVAL_BATCHES:
            started = time.perf_counter()
        batch = backend.to_tensors(np_batch)
        if task == "seq2seq":
            ids = backend.generate(prep.model, batch, r.data.label_max_length)
            tok.batch_decode(ids, skip_special_tokens=True)
        else:
            _, logits = backend.eval_batch(prep.model, batch)
            logits.argmax(-1)
        if i >= WARMUP_EVAL_BATCHES:
            samples += len(np_batch["input_ids"])
    eval_seconds = time.perf_counter() - started if started is not None else 0.0
    return {"data": {"padding": r.data.padding, "group_by_length": r.train.group_by_length},
            "what": f"dualtune prepare + train ({backend.name}), backend.generate / eval_batch",
            "train_steps": cfg["steps"], "train_seconds": train_seconds, "train_tokens": train_tokens,
            "step_seconds": step_seconds, "peak_rss_mb_by_phase": rss,
            "eval_samples": samples, "eval_seconds": eval_seconds,
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "trainable_parameters": sum(prep.trainable.values()), "total_parameters": prep.total_params,
            "train_batch_shape": list(datamap.collate(prep.train_set, range(r.train.batch_size),
                                                      tok.pad_token_id, r.data, task)["input_ids"].shape)}


# ====================================================================== reference: shared pieces

def reference_data(recipe, tok):
    """The notebooks' preprocessing: the same rows and split as dualtune (framework-free loader),
    tokenized by the HF tokenizer with truncation and the recipe's padding; label pads -> -100."""
    from dualtune import data as datamap

    rows = datamap.load_rows(recipe.data)
    train_rows, eval_rows = datamap.split_rows(rows, recipe.data.train_split, recipe.data.seed)
    pad_fixed = recipe.data.padding == "max_length"

    def encode(part):
        enc = tok(part.texts, max_length=recipe.data.max_length, truncation=True,
                  padding="max_length" if pad_fixed else False)
        feats = [{"input_ids": i, "attention_mask": m} for i, m in zip(enc["input_ids"], enc["attention_mask"])]
        if recipe.model.task == "seq2seq":
            words = [part.label_names[l] for l in part.labels]
            lab = tok(words, max_length=recipe.data.label_max_length, truncation=True,
                      padding="max_length" if pad_fixed else False)["input_ids"]
            for f, ids in zip(feats, lab):
                f["labels"] = [t if t != tok.pad_token_id else -100 for t in ids]
        else:
            for f, l in zip(feats, part.labels):
                f["labels"] = int(l)
        return feats

    return encode(train_rows), encode(eval_rows), rows.label_names


def reference_collator(recipe, tok):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, default_data_collator

    if recipe.data.padding == "max_length":
        return default_data_collator
    if recipe.model.task == "seq2seq":
        return DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    return DataCollatorWithPadding(tok)


def reference_model(recipe, path, label_names, pad_token_id, torch_device):
    """HF model + peft, as a notebook builds it (seeded as dualtune seeds the adapter init)."""
    import torch
    import transformers
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    task = recipe.model.task
    if task == "seq2seq":
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)})
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    model.to(torch_device)
    torch.manual_seed(recipe.train.seed)
    spec = recipe.peft
    task_type = TaskType.SEQ_2_SEQ_LM if task == "seq2seq" else TaskType.SEQ_CLS
    if spec.method == "prefix":
        kw = {"encoder_hidden_size": spec.prefix.encoder_hidden_size} if spec.prefix.encoder_hidden_size else {}
        model = get_peft_model(model, PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=spec.prefix.num_virtual_tokens,
            prefix_projection=spec.prefix.prefix_projection, **kw))
    elif spec.method == "lora":
        lo = spec.lora
        model = get_peft_model(model, LoraConfig(task_type=task_type, r=lo.r, lora_alpha=lo.alpha,
                                                 lora_dropout=lo.dropout, target_modules=lo.target_modules))
    elif spec.method == "bitfit":
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module.bias is None and any(
                    name == s or name.endswith("." + s) for s in spec.bitfit.add_bias_to):
                module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
        for name, p in model.named_parameters():
            p.requires_grad = any(s in name for s in spec.bitfit.patterns) or any(
                h in name.split(".") for h in ("classifier", "score"))
        model.to(torch_device)
    if not recipe.train.dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def reference_eval(recipe, model, tok, eval_feats, collator, n_batches, loader_cls, torch) -> tuple[int, float]:
    """The notebooks' eval loop: greedy generate (seq2seq) or forward + argmax, batch by batch."""
    bs = recipe.train.eval_batch_size or recipe.train.batch_size
    loader = loader_cls(eval_feats, batch_size=bs, shuffle=False, collate_fn=collator)
    model.eval()
    samples, started = 0, None
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == WARMUP_EVAL_BATCHES + n_batches:
                break
            if i == WARMUP_EVAL_BATCHES:
                started = time.perf_counter()
            if recipe.model.task == "seq2seq":
                out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=recipe.data.label_max_length, do_sample=False, num_beams=1)
                tok.batch_decode(out.detach().cpu().numpy(), skip_special_tokens=True)
            else:
                model(**batch).logits.argmax(-1).cpu().numpy()
            if i >= WARMUP_EVAL_BATCHES:
                samples += len(batch["input_ids"])
    return samples, (time.perf_counter() - started if started is not None else 0.0)


def _lr(step: int, total: int, recipe) -> float:
    """The schedule by hand, as transformers' linear / constant schedules with warmup (0-based step)."""
    s = recipe.schedule
    warm = s.warmup_steps if s.warmup_steps is not None else (
        math.ceil(total * s.warmup_ratio) if s.warmup_ratio is not None else 0)
    if step < warm:
        return recipe.optim.lr * step / max(1, warm)
    if s.name == "constant":
        return recipe.optim.lr
    return recipe.optim.lr * max(0.0, (total - step) / max(1, total - warm))


# ====================================================================== child: torch reference

def child_reference_torch(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    import transformers
    from torch.utils.data import DataLoader

    recipe = load_bench_recipe(cfg, side="reference")
    path = cfg["model_dir"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    train_feats, eval_feats, label_names = reference_data(recipe, tok)
    collator = reference_collator(recipe, tok)
    model = reference_model(recipe, path, label_names, tok.pad_token_id, "cpu")
    rss = {"setup": peak_rss_mb()}
    total = cfg["steps"] + WARMUP_STEPS
    seq2seq = recipe.model.task == "seq2seq"
    sched = recipe.schedule
    args_cls = transformers.Seq2SeqTrainingArguments if seq2seq else transformers.TrainingArguments
    trainer_cls = transformers.Seq2SeqTrainer if seq2seq else transformers.Trainer
    with tempfile.TemporaryDirectory() as out_dir:
        args = args_cls(
            output_dir=out_dir, per_device_train_batch_size=recipe.train.batch_size, max_steps=total,
            learning_rate=recipe.optim.lr, weight_decay=recipe.optim.weight_decay,
            adam_beta1=recipe.optim.betas[0], adam_beta2=recipe.optim.betas[1], adam_epsilon=recipe.optim.eps,
            max_grad_norm=recipe.optim.grad_clip or 0.0,  # 0: no clipping, as the recipe
            lr_scheduler_type="linear" if sched.name == "linear" else "constant_with_warmup",
            warmup_steps=sched.warmup_steps or 0, warmup_ratio=sched.warmup_ratio or 0.0,
            seed=recipe.train.seed, eval_strategy="no", save_strategy="no", logging_strategy="no",
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
            remove_unused_columns=False, group_by_length=recipe.train.group_by_length)

        step_ends, step_tokens, losses = [], [], []

        class Clock(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                step_ends.append(time.perf_counter())

        class CountingTrainer(trainer_cls):
            def training_step(self, model, inputs, num_items_in_batch=None):
                step_tokens.append(count_tokens(inputs["attention_mask"], inputs["labels"])
                                   if inputs["labels"].dim() == 2 else int(inputs["attention_mask"].sum()))
                loss = super().training_step(model, inputs, num_items_in_batch)
                losses.append(float(loss))
                return loss

        trainer = CountingTrainer(model=model, args=args, train_dataset=train_feats, data_collator=collator,
                                  callbacks=[Clock()])
        trainer.train()
    rss["train"] = peak_rss_mb()
    if len(step_ends) != total:
        raise BenchError(f"the Trainer ran {len(step_ends)} steps, expected {total}")
    samples, eval_seconds = reference_eval(recipe, model, tok, eval_feats, collator, cfg["eval_batches"],
                                           DataLoader, torch)
    return {"data": {"padding": recipe.data.padding, "group_by_length": recipe.train.group_by_length},
            "what": f"transformers.{trainer_cls.__name__} + peft (optim {getattr(args.optim, 'value', args.optim)}), plain generate loop",
            "train_steps": cfg["steps"], "train_seconds": step_ends[-1] - step_ends[WARMUP_STEPS - 1],
            "train_tokens": sum(step_tokens[WARMUP_STEPS:]), "eval_samples": samples,
            "step_seconds": [b - a for a, b in zip(step_ends[WARMUP_STEPS - 1:], step_ends[WARMUP_STEPS:])],
            "peak_rss_mb_by_phase": rss,
            "eval_seconds": eval_seconds, "first_loss": losses[0], "last_loss": losses[-1],
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in model.parameters())}


# ====================================================================== child: MindSpore reference

def child_reference_mindspore(cfg: dict) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindspore

    mindspore.set_device("CPU")
    import mindnlp  # noqa: F401  (from here on, `import torch` is mindtorch)
    import numpy as np
    import torch
    import transformers
    from mindtorch.autograd import value_and_grad
    from torch.utils.data import DataLoader

    recipe = load_bench_recipe(cfg, side="reference")
    path = cfg["model_dir"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    train_feats, eval_feats, label_names = reference_data(recipe, tok)
    collator = reference_collator(recipe, tok)
    mindspore.set_seed(recipe.train.seed)
    model = reference_model(recipe, path, label_names, tok.pad_token_id, "cpu")
    rss = {"setup": peak_rss_mb()}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    seq2seq = recipe.model.task == "seq2seq"

    def forward_fn(input_ids, attention_mask, labels):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    grad_fn = value_and_grad(forward_fn, params)  # fills p.grad
    o = recipe.optim
    b1, b2 = o.betas
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    total = cfg["steps"] + WARMUP_STEPS
    bs = recipe.train.batch_size
    step, step_ends, step_tokens, losses = 0, [], [], []
    epoch = 0
    while step < total:
        order = np.random.default_rng(recipe.train.seed + epoch).permutation(len(train_feats))
        if recipe.train.group_by_length:  # dualtune's data loader's grouping (framework-free)
            from dualtune.data import length_grouped

            order = length_grouped(order, [len(f["input_ids"]) for f in train_feats], bs)
        for start in range(0, len(order), bs):
            if step >= total:
                break
            batch = collator([train_feats[i] for i in order[start: start + bs]])
            step_tokens.append(count_tokens(batch["attention_mask"].numpy(), batch["labels"].numpy())
                               if seq2seq else int(batch["attention_mask"].sum()))
            loss = grad_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
            grads = [p.grad for p in params]
            if o.grad_clip is not None:
                norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
                scale = min(1.0, o.grad_clip / (norm + 1e-6))
                grads = [g * scale for g in grads]
            lr = _lr(step, total, recipe)
            step += 1
            bc1, bc2_sqrt = 1.0 - b1 ** step, math.sqrt(1.0 - b2 ** step)
            with torch.no_grad():
                for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
                    p.mul_(1.0 - lr * o.weight_decay)
                    m.mul_(b1).add_(g * (1.0 - b1))
                    v.mul_(b2).add_(g * g * (1.0 - b2))
                    p.sub_(m / (v.sqrt() / bc2_sqrt).add_(o.eps) * (lr / bc1))
            for p in params:
                p.grad = None
            losses.append(loss.item())
            step_ends.append(time.perf_counter())
        epoch += 1
    rss["train"] = peak_rss_mb()
    samples, eval_seconds = reference_eval(recipe, model, tok, eval_feats, collator, cfg["eval_batches"],
                                           DataLoader, torch)
    return {"data": {"padding": recipe.data.padding, "group_by_length": recipe.train.group_by_length},
            "what": "plain mindnlp loop: HF model + peft under mindtorch, mindtorch.autograd.value_and_grad, "
                    "in-place AdamW; plain generate loop",
            "train_steps": cfg["steps"], "train_seconds": step_ends[-1] - step_ends[WARMUP_STEPS - 1],
            "train_tokens": sum(step_tokens[WARMUP_STEPS:]), "eval_samples": samples,
            "step_seconds": [b - a for a, b in zip(step_ends[WARMUP_STEPS - 1:], step_ends[WARMUP_STEPS:])],
            "peak_rss_mb_by_phase": rss,
            "eval_seconds": eval_seconds, "first_loss": losses[0], "last_loss": losses[-1],
            "trainable_parameters": sum(int(p.numel()) for p in params),
            "total_parameters": sum(int(p.numel()) for p in model.parameters())}


# ====================================================================== child entry

def run_child(side: str, cfg_path: str, result_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    started = time.perf_counter()
    if side == "dualtune":
        result = child_dualtune(cfg)
    elif cfg.get("against") == "torch":  # the reference side is dualtune itself on the torch backend
        result = child_dualtune({**cfg, "backend": "torch"}, side)
    elif cfg["backend"] == "torch":
        result = child_reference_torch(cfg)
    else:
        result = child_reference_mindspore(cfg)
    result["wall_seconds"] = time.perf_counter() - started
    result["steps_per_s"] = rate(result["train_steps"], result["train_seconds"])
    result["tokens_per_s"] = rate(result["train_tokens"], result["train_seconds"])
    result["eval_samples_per_s"] = rate(result["eval_samples"], result["eval_seconds"])
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_rss_mb_by_phase"]["eval"] = result["peak_rss_mb"]
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0


# ====================================================================== parent

def _versions(backend: str) -> dict:
    names = ["torch", "transformers", "peft", "tokenizers"] + (["mindspore", "mindnlp"] if backend == "mindspore" else [])
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.pop("DUALTUNE_BACKEND", None)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "GLOG_v": env.get("GLOG_v", "3"),
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"})
    return env


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, say, threshold: float = BUSY_SHARE, window_s: float = 10.0) -> float | None:
    """Wait (up to ``limit_s``) until other processes use less than ``threshold`` of the cores over
    ``window_s`` seconds; returns the last share seen (None where /proc/stat cannot be read)."""
    deadline, share, told = time.monotonic() + limit_s, None, False
    while True:
        b0 = _busy_cpu_seconds()
        time.sleep(window_s)
        b1 = _busy_cpu_seconds()
        if b0 is None or b1 is None:
            return None
        share = (b1 - b0) / (window_s * (os.cpu_count() or 1))
        if share < threshold or time.monotonic() >= deadline:
            if share >= threshold:
                say(f"still busy after {limit_s:.0f} s ({100 * share:.0f} % of the cores); measuring anyway")
            return share
        if not told:
            say(f"other processes use {100 * share:.0f} % of the cores; waiting up to {limit_s:.0f} s for quiet")
            told = True


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _spawn(args: list[str], env: dict, log_path: Path, what: str, usage: dict | None = None) -> str:
    """Run this script as a child; ``usage`` receives its wall time, its CPU time and the CPU time
    everything else on the machine used meanwhile (other jobs competing for the cores)."""
    busy0, own0, wall0 = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(HERE), *args], stdout=subprocess.PIPE, stderr=log,
                              text=True, env=env)
    busy1, own1, wall1 = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    if usage is not None:
        usage["child_wall_seconds"] = wall1 - wall0
        usage["child_cpu_seconds"] = own1 - own0
        if busy0 is not None and busy1 is not None:
            other = max(0.0, (busy1 - busy0) - (own1 - own0))
            usage["other_cpu_seconds"] = other
            # Share of the machine's cores that other processes kept busy while this side ran.
            usage["other_cpu_share"] = other / ((wall1 - wall0) * (os.cpu_count() or 1))
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().strip().splitlines()[-15:])
        raise BenchError(f"{what} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return proc.stdout


def resolve_model(choice: str, recipe, work: Path, env: dict, say) -> tuple[str, str, dict]:
    """(kind, directory, info) for --model."""
    task = recipe.model.task
    if choice == "auto":
        own = recipe.model.name_or_path
        if own.startswith("pkg:") or Path(own).is_dir():
            choice = "recipe"
        else:
            choice = "t5-small-config" if task == "seq2seq" else "minilm-config"
    if choice == "recipe":
        from dualtune.hub import resolve_model_path

        return "recipe", resolve_model_path(recipe.model.name_or_path), {}
    if choice in GENERATED:
        kind = choice if choice != "tiny" else ("tiny-t5" if task == "seq2seq" else "tiny-bert")
        if (kind.startswith("tiny-t5") or kind == "t5-small-config") != (task == "seq2seq"):
            raise BenchError(f"--model {choice} does not fit a {task} recipe")
        out = work / "model"
        say(f"writing a {kind} model with random weights (real torch, child process) -> {out}")
        stdout = _spawn(["--make-model", kind, str(out)], env, work / "make-model.log", "making the model")
        return kind, str(out), json.loads(stdout.strip().splitlines()[-1])
    if not Path(choice).is_dir():
        raise BenchError(f"--model {choice}: not {', '.join(GENERATED + ('recipe', 'auto'))} and not a directory")
    return "path", str(Path(choice).resolve()), {}


def summarize(results: list[dict]) -> dict:
    """One run: itself. Several: the median of each metric, the runs kept under ``runs``."""
    if len(results) == 1:
        return results[0]
    import statistics

    out = dict(results[-1])
    for k in MEDIAN_FIELDS:
        if all(k in r for r in results):
            out[k] = statistics.median(r[k] for r in results)
    out["runs"] = results
    return out


def format_table(report: dict) -> str:
    d, r, q = report["dualtune"], report["reference"], report["ratios"]
    lines = [f"{'':<18}{'dualtune':>12}{'reference':>12}{'ratio d/r':>11}"]
    for k in METRICS:
        lines.append(f"{LABELS[k]:<18}{d[k]:>12.4g}{r[k]:>12.4g}{q[k]:>11.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py", description="Benchmark a recipe's training and evaluation on one backend against "
        "the plain HF reference (Trainer + peft on torch; a plain mindnlp loop on MindSpore).",
        epilog="overrides are recipe key=value pairs (after the bench's data.source=synthetic, "
               "data.padding=max_length defaults); --model wins over model.name_or_path")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--backend", choices=["torch", "mindspore"], default="torch")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 1 warm-up step)")
    p.add_argument("--eval-batches", type=int, default=2, help="timed eval batches (after 1 warm-up batch)")
    p.add_argument("--model", default="auto",
                   help="t5-small-config | minilm-config | tiny | recipe | PATH | auto (default: the "
                        "recipe's model if it is on this disk, else t5-small-config / minilm-config)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads for both sides (torch.set_num_threads, OMP_NUM_THREADS)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each side this many times, alternating; the medians are reported (default 1)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each side, wait up to SECONDS for other processes to use < 10 %% of the "
                        "cores, and run a side again (twice at most) if they used more while it ran")
    p.add_argument("--reference", nargs="+", default=[], metavar="key=value",
                   help="overrides for the reference side only, e.g. data.padding=max_length (the "
                        "notebooks' way) against dualtune's data.padding=longest train.group_by_length=true")
    p.add_argument("--against", choices=["reference", "torch"], default="reference",
                   help="what the reference side runs: the plain HF reference (default), or, with "
                        "--backend mindspore, dualtune on the torch backend (ratios are then MindSpore / torch)")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--only", choices=["dualtune", "reference"], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return run_child(*argv[1:4])
    if argv[:1] == ["--make-model"]:
        child_make_model(argv[1], argv[2])
        return 0
    parser = build_parser()
    # Overrides may also come after the options (`bench.py R --backend torch a=1`), as with dualtune.
    args, extra = parser.parse_known_args(argv)
    if any(e.startswith("-") for e in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra
    if min(args.steps, args.eval_batches, args.threads, args.repeat) < 1:
        print("bench: error: --steps, --eval-batches, --threads and --repeat must be >= 1", file=sys.stderr)
        return 2
    if args.against == "torch" and args.backend != "mindspore":
        print("bench: error: --against torch compares the mindspore backend with torch; add --backend mindspore",
              file=sys.stderr)
        return 2

    def say(msg):
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    from dualtune.recipe import RecipeError, load_recipe

    overrides = DATA_DEFAULTS + list(args.overrides)
    work = Path(tempfile.mkdtemp(prefix="dualtune-bench-"))
    env = _child_env(args.threads)
    ok = False
    try:
        recipe = load_recipe(args.recipe, overrides)
        kind, model_dir, model_info = resolve_model(args.model, recipe, work, env, say)
        overrides.append(f"model.name_or_path={model_dir}")
        recipe = load_recipe(args.recipe, overrides)
        load_recipe(args.recipe, overrides + list(args.reference))  # bad reference overrides: fail now
        cfg = {"recipe": str(Path(args.recipe).resolve()), "overrides": overrides,
               "reference_overrides": list(args.reference), "backend": args.backend,
               "steps": args.steps, "eval_batches": args.eval_batches, "threads": args.threads,
               "model_dir": model_dir, "against": args.against}
        cfg_path = work / "config.json"
        cfg_path.write_text(json.dumps(cfg))
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {}
        for rep in range(args.repeat):
            for side in ("dualtune", "reference"):
                if args.only and side != args.only:
                    continue
                say(f"{side} on {args.backend}: {args.steps} timed steps + {WARMUP_STEPS} warm-up, "
                    f"{args.eval_batches} eval batches" + (f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else "")
                    + " ...")
                discarded = []
                while True:
                    usage: dict = {}
                    if args.wait_quiet:
                        usage["other_cpu_share_before"] = wait_quiet(args.wait_quiet, say)
                    result = work / f"{side}-{rep}.json"
                    _spawn(["--child", side, str(cfg_path), str(result)], env, work / f"{side}-{rep}.log", side, usage)
                    got = {**json.loads(result.read_text()), **usage}
                    share = usage.get("other_cpu_share")
                    say(f"{side} done in {usage['child_wall_seconds']:.1f} s: {got['steps_per_s']:.4g} steps/s"
                        + (f", other processes used {100 * share:.0f} % of the cores meanwhile" if share is not None else ""))
                    if not args.wait_quiet or share is None or share < BUSY_SHARE or len(discarded) >= BUSY_RETRIES:
                        break
                    say(f"discarding that {side} run (the machine was busy); running it again")
                    discarded.append({k: got[k] for k in MEDIAN_FIELDS if k in got})
                runs.setdefault(side, []).append({**got, "discarded_busy_runs": discarded})
        sides = {side: summarize(results) for side, results in runs.items()}
        load_after = os.getloadavg()
        report = {
            "recipe": Path(args.recipe).stem, "recipe_path": str(args.recipe), "backend": args.backend,
            "against": "dualtune on torch" if args.against == "torch" else "plain HF reference",
            "command": shlex.join([".venv/bin/python", "benchmarks/bench.py", *argv]),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "model": {"choice": args.model, "kind": kind, "path": model_dir, **model_info},
            "overrides": overrides, "reference_overrides": list(args.reference), "method": recipe.peft.method, "task": recipe.model.task,
            "steps": args.steps, "warmup_steps": WARMUP_STEPS, "eval_batches": args.eval_batches,
            "warmup_eval_batches": WARMUP_EVAL_BATCHES, "batch_size": recipe.train.batch_size,
            "eval_batch_size": recipe.train.eval_batch_size or recipe.train.batch_size,
            "max_length": recipe.data.max_length, "label_max_length": recipe.data.label_max_length,
            "padding": recipe.data.padding, "threads": args.threads, "repeat": args.repeat,
            "machine": {"machine": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "loadavg_before": list(load_before),
                        "loadavg_after": list(load_after)},
            "versions": _versions(args.backend), **sides}
        if len(sides) == 2:
            report["ratios"] = {k: rate(sides["dualtune"][k], sides["reference"][k]) for k in METRICS}
            print(f"{report['recipe']} on {args.backend} against the {report['against']}: model {kind}, batch {report['batch_size']} x "
                  f"{report['max_length']} ({report['padding']}), {args.steps} steps, {args.eval_batches} "
                  f"eval batches, {args.threads} threads, load {load_before[0]:.2f} -> {load_after[0]:.2f}")
            print(format_table(report))
            shares = [sides[s].get("other_cpu_share") for s in ("dualtune", "reference")]
            if None not in shares:
                print(f"other processes used {100 * shares[0]:.0f} % / {100 * shares[1]:.0f} % of the cores "
                      f"while dualtune / reference ran" + (" (median of runs)" if args.repeat > 1 else ""))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            say(f"report: {args.out}")
        ok = True
        return 0
    except (BenchError, RecipeError) as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, RecipeError) else 1
    finally:
        if ok or not any(work.glob("*.log")):
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work} (logs of the failed run)")


if __name__ == "__main__":
    sys.exit(main())
