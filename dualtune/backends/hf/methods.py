"""Per-method knowledge, in one place: the peft config for each method peft implements, and BitFit
(dualtune's own: which tensors train, the zero biases it adds to bias-free models, its file format).

Imported only after a backend has activated its framework (``import torch`` may be mindtorch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch  # PyTorch or mindtorch: see dualtune.backends.hf

from dualtune.recipe import is_head_parameter

# BitFit's adapter directory: the same file names as a peft adapter, a config of dualtune's format.
BITFIT_CONFIG = "adapter_config.json"
BITFIT_WEIGHTS = "adapter_model.safetensors"


def _task_type(task: str) -> Any:
    from peft import TaskType

    return {"seq2seq": TaskType.SEQ_2_SEQ_LM, "causal_lm": TaskType.CAUSAL_LM}.get(task, TaskType.SEQ_CLS)


def peft_config(peft_spec: Any, task: str, model_path: str | None = None) -> Any:
    """The peft config object for a method peft implements (PEFT_LIBRARY_METHODS)."""
    import peft

    method, task_type = peft_spec.method, _task_type(task)
    if method == "prefix":
        p = peft_spec.prefix
        kwargs = {} if p.encoder_hidden_size is None else {"encoder_hidden_size": p.encoder_hidden_size}
        return peft.PrefixTuningConfig(
            task_type=task_type,
            num_virtual_tokens=p.num_virtual_tokens,
            prefix_projection=p.prefix_projection,
            **kwargs,
        )
    if method == "prompt":
        p = peft_spec.prompt
        init = (
            {}
            if p.init_text is None
            else {
                "prompt_tuning_init": peft.PromptTuningInit.TEXT,
                "prompt_tuning_init_text": p.init_text,
                "tokenizer_name_or_path": model_path,
            }
        )
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens, **init)
    if method == "p_tuning":
        p = peft_spec.p_tuning
        kwargs = {} if p.encoder_hidden_size is None else {"encoder_hidden_size": p.encoder_hidden_size}
        return peft.PromptEncoderConfig(
            task_type=task_type,
            num_virtual_tokens=p.num_virtual_tokens,
            encoder_reparameterization_type=p.encoder,
            encoder_num_layers=p.encoder_num_layers,
            encoder_dropout=p.encoder_dropout,
            **kwargs,
        )
    if method == "lora":
        lo = peft_spec.lora
        return peft.LoraConfig(
            task_type=task_type,
            r=lo.r,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            target_modules=lo.target_modules,
        )
    if method == "ia3":
        ia = peft_spec.ia3
        return peft.IA3Config(
            task_type=task_type, target_modules=ia.target_modules, feedforward_modules=ia.feedforward_modules
        )
    raise ValueError(f"{method} is not a peft method")


def add_zero_biases(model: Any, suffixes: Sequence[str]) -> list[str]:
    """Give bias-free Linear layers whose name ends with one of ``suffixes`` a zero bias (BitFit on T5)."""
    added: list[str] = []
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and module.bias is None
            and any(name == s or name.endswith("." + s) for s in suffixes)
        ):
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
            added.append(name)
    return added


def apply_bitfit(model: Any, bitfit_spec: Any) -> None:
    """Add the zero biases BitFit asks for, then train only tensors that match its patterns (and a
    classification head)."""
    model._dualtune_added_biases = add_zero_biases(model, bitfit_spec.add_bias_to)
    for name, p in model.named_parameters():
        p.requires_grad = is_head_parameter(name) or any(s in name for s in bitfit_spec.patterns)


def bitfit_config(model: Any, bitfit_spec: Any) -> dict:
    """adapter_config.json for BitFit: which tensors the weights file holds and which biases were added."""
    return {
        "peft_type": "BITFIT",
        "format": "dualtune",
        "base_model_name_or_path": model.config.name_or_path,
        "patterns": list(bitfit_spec.patterns),
        "add_bias_to": list(bitfit_spec.add_bias_to),
        "added_biases": getattr(model, "_dualtune_added_biases", []),
    }


def read_bitfit_config(directory: Path) -> dict:
    config: dict = json.loads((Path(directory) / BITFIT_CONFIG).read_text())
    return config
