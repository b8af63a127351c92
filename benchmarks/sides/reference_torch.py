"""The torch reference: ``transformers.Seq2SeqTrainer`` (``Trainer`` for classification) +
``peft.get_peft_model``, ``max_steps`` = warm-up + N, no evaluation, saving, logging or reporting,
the default optimizer (``adamw_torch_fused`` with torch >= 2.8), the recipe's lr / betas / eps /
weight decay / schedule, clipping only if the recipe clips; then the notebooks' plain generate loop."""

from __future__ import annotations

import tempfile
import time

from common import WARMUP_STEPS, BenchError

from dualtune.rundir import peak_rss_mb
from sides.hf_reference import evaluate_and_report, reference_inputs, reference_model


def training_arguments(recipe, out_dir: str, total: int, device: str = "cpu"):
    import transformers

    sched = recipe.schedule
    args_cls = (
        transformers.Seq2SeqTrainingArguments
        if recipe.model.task == "seq2seq"
        else transformers.TrainingArguments
    )
    return args_cls(
        output_dir=out_dir,
        per_device_train_batch_size=recipe.train.batch_size,
        max_steps=total,
        learning_rate=recipe.optim.lr,
        weight_decay=recipe.optim.weight_decay,
        adam_beta1=recipe.optim.betas[0],
        adam_beta2=recipe.optim.betas[1],
        adam_epsilon=recipe.optim.eps,
        max_grad_norm=recipe.optim.grad_clip or 0.0,  # 0: no clipping, as the recipe
        lr_scheduler_type="linear" if sched.name == "linear" else "constant_with_warmup",
        warmup_steps=sched.warmup_steps or 0,
        warmup_ratio=sched.warmup_ratio or 0.0,
        seed=recipe.train.seed,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        group_by_length=recipe.train.group_by_length,
        gradient_checkpointing=recipe.train.gradient_checkpointing,  # as dualtune: transformers' own
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def run_reference_torch(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    import transformers

    inputs = reference_inputs(cfg)
    model = reference_model(inputs, cfg["model_dir"], cfg.get("device", "cpu"))
    rss = {"setup": peak_rss_mb()}
    total = cfg["steps"] + WARMUP_STEPS
    trainer_cls = transformers.Seq2SeqTrainer if inputs.seq2seq else transformers.Trainer
    step_ends, step_tokens, losses = [], [], []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    class CountingTrainer(trainer_cls):
        def training_step(self, model, batch, num_items_in_batch=None):
            step_tokens.append(inputs.tokens(batch))
            loss = super().training_step(model, batch, num_items_in_batch)
            losses.append(float(loss))
            return loss

    with tempfile.TemporaryDirectory() as out_dir:
        args = training_arguments(inputs.recipe, out_dir, total, cfg.get("device", "cpu"))
        trainer = CountingTrainer(
            model=model,
            args=args,
            train_dataset=inputs.train_feats,
            data_collator=inputs.collator,
            callbacks=[Clock()],
        )
        trainer.train()
    rss["train"] = peak_rss_mb()
    if len(step_ends) != total:
        raise BenchError(f"the Trainer ran {len(step_ends)} steps, expected {total}")
    what = (
        f"transformers.{trainer_cls.__name__} + peft (optim {getattr(args.optim, 'value', args.optim)}), "
        "plain generate loop"
    )
    return evaluate_and_report(cfg, inputs, model, what, step_ends, step_tokens, losses, rss)
