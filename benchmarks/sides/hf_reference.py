"""What both plain references share, written as the HF peft and mindnlp notebooks write it: the data
(the same rows and split as dualtune, tokenized by the HF tokenizer), the collator, the HF model + peft,
the plain eval loop, and the result a reference reports. No dualtune code runs here except the
framework-free data loader. ``import torch`` happens inside the functions: under mindnlp it is mindtorch."""

from __future__ import annotations

import time
from dataclasses import dataclass

from common import WARMUP_EVAL_BATCHES, count_tokens, data_settings, load_bench_recipe, timed_steps


@dataclass
class ReferenceInputs:
    """The recipe (with --reference), the tokenizer, the encoded train and eval rows, the collator."""

    recipe: object
    tok: object
    train_feats: list
    eval_feats: list
    label_names: list
    collator: object

    @property
    def seq2seq(self) -> bool:
        return self.recipe.model.task == "seq2seq"

    def tokens(self, batch) -> int:
        """A batch's tokens, counted as dualtune counts them."""
        if self.seq2seq:
            return count_tokens(batch["attention_mask"].numpy(), batch["labels"].numpy())
        return int(batch["attention_mask"].sum())


def reference_inputs(cfg: dict) -> ReferenceInputs:
    import transformers

    recipe = load_bench_recipe(cfg, side="reference")
    tok = transformers.AutoTokenizer.from_pretrained(cfg["model_dir"])
    train_feats, eval_feats, label_names = reference_data(recipe, tok)
    return ReferenceInputs(recipe, tok, train_feats, eval_feats, label_names, reference_collator(recipe, tok))


def reference_data(recipe, tok):
    """The notebooks' preprocessing: the same rows and split as dualtune (framework-free loader),
    tokenized by the HF tokenizer with truncation and the recipe's padding; label pads -> -100."""
    from dualtune import data as datamap

    rows = datamap.load_rows(recipe.data)
    train_rows, eval_rows = datamap.split_rows(rows, recipe.data.train_split, recipe.data.seed)
    pad_fixed = recipe.data.padding == "max_length"

    def encode(part):
        enc = tok(
            part.texts,
            max_length=recipe.data.max_length,
            truncation=True,
            padding="max_length" if pad_fixed else False,
        )
        feats = [
            {"input_ids": i, "attention_mask": m} for i, m in zip(enc["input_ids"], enc["attention_mask"])
        ]
        if recipe.model.task == "seq2seq":
            words = [part.label_names[item] for item in part.labels]
            lab = tok(
                words,
                max_length=recipe.data.label_max_length,
                truncation=True,
                padding="max_length" if pad_fixed else False,
            )["input_ids"]
            for f, ids in zip(feats, lab):
                f["labels"] = [t if t != tok.pad_token_id else -100 for t in ids]
        else:
            for f, label in zip(feats, part.labels):
                f["labels"] = int(label)
        return feats

    return encode(train_rows), encode(eval_rows), rows.label_names


def reference_collator(recipe, tok):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, default_data_collator

    if recipe.data.padding == "max_length":
        return default_data_collator
    if recipe.model.task == "seq2seq":
        return DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    return DataCollatorWithPadding(tok)


def reference_model(inputs: ReferenceInputs, path: str, torch_device: str = "cpu"):
    """HF model + peft, as a notebook builds it (seeded as dualtune seeds the adapter init)."""
    import torch
    import transformers
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    recipe, label_names = inputs.recipe, inputs.label_names
    if inputs.seq2seq:
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = inputs.tok.pad_token_id
    model.to(torch_device)
    torch.manual_seed(recipe.train.seed)
    spec = recipe.peft
    task_type = TaskType.SEQ_2_SEQ_LM if inputs.seq2seq else TaskType.SEQ_CLS
    if spec.method == "prefix":
        kw = (
            {"encoder_hidden_size": spec.prefix.encoder_hidden_size}
            if spec.prefix.encoder_hidden_size
            else {}
        )
        model = get_peft_model(
            model,
            PrefixTuningConfig(
                task_type=task_type,
                num_virtual_tokens=spec.prefix.num_virtual_tokens,
                prefix_projection=spec.prefix.prefix_projection,
                **kw,
            ),
        )
    elif spec.method == "lora":
        lo = spec.lora
        model = get_peft_model(
            model,
            LoraConfig(
                task_type=task_type,
                r=lo.r,
                lora_alpha=lo.alpha,
                lora_dropout=lo.dropout,
                target_modules=lo.target_modules,
            ),
        )
    elif spec.method == "bitfit":
        for name, module in model.named_modules():
            if (
                isinstance(module, torch.nn.Linear)
                and module.bias is None
                and any(name == s or name.endswith("." + s) for s in spec.bitfit.add_bias_to)
            ):
                module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
        for name, p in model.named_parameters():
            p.requires_grad = any(s in name for s in spec.bitfit.patterns) or any(
                h in name.split(".") for h in ("classifier", "score")
            )
        model.to(torch_device)
    if not recipe.train.dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def reference_eval(inputs: ReferenceInputs, model, n_batches: int) -> tuple[int, float]:
    """The notebooks' eval loop: greedy generate (seq2seq) or forward + argmax, batch by batch;
    (samples, seconds) of ``n_batches`` after the warm-up batch(es)."""
    import torch
    from torch.utils.data import DataLoader

    recipe, tok = inputs.recipe, inputs.tok
    bs = recipe.train.eval_batch_size or recipe.train.batch_size
    loader = DataLoader(inputs.eval_feats, batch_size=bs, shuffle=False, collate_fn=inputs.collator)
    model.eval()
    samples, started = 0, None
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == WARMUP_EVAL_BATCHES + n_batches:
                break
            if i == WARMUP_EVAL_BATCHES:
                started = time.perf_counter()
            if str(model.device) != "cpu":  # --device cuda (torch): the loader's batches are on the host
                batch = {k: v.to(model.device) for k, v in batch.items()}
            if inputs.seq2seq:
                out = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=recipe.data.label_max_length,
                    do_sample=False,
                    num_beams=1,
                )
                tok.batch_decode(out.detach().cpu().numpy(), skip_special_tokens=True)
            else:
                model(**batch).logits.argmax(-1).cpu().numpy()
            if i >= WARMUP_EVAL_BATCHES:
                samples += len(batch["input_ids"])
    return samples, (time.perf_counter() - started if started is not None else 0.0)


def evaluate_and_report(
    cfg: dict,
    inputs: ReferenceInputs,
    model,
    what: str,
    step_ends: list[float],
    step_tokens: list[int],
    losses: list[float],
    rss: dict,
) -> dict:
    """After training: the plain eval loop, then the side's result."""
    samples, eval_seconds = reference_eval(inputs, model, cfg["eval_batches"])
    return {
        "data": data_settings(inputs.recipe),
        "what": what,
        **timed_steps(cfg["steps"], step_ends, step_tokens),
        "peak_rss_mb_by_phase": rss,
        "eval_samples": samples,
        "eval_seconds": eval_seconds,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_parameters": sum(int(p.numel()) for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(int(p.numel()) for p in model.parameters()),
    }
