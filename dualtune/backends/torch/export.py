"""``dualtune export`` on PyTorch: a trained model merged into the plain model class and saved as a
Hugging Face folder, or written as ONNX (the legacy TorchScript exporter, which needs no onnxscript)
and run back with ONNX Runtime. ``dualtune.export`` decides what to export and checks the result."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from dualtune.backend import BackendError
from dualtune.recipe import PEFT_LIBRARY_METHODS

ONNX_FILE = "model.onnx"
# 17: the first opset with LayerNormalization as one operator; ONNX Runtime 1.17+ runs it everywhere.
ONNX_OPSET = 17
WEIGHT_METHODS = ("lora", "ia3")  # peft methods whose weights merge_and_unload folds into the model


def merge_trained(model: Any, peft_spec: Any) -> Any:
    """The plain model class with the method's weights in its own tensors. BitFit's trained biases
    and full fine-tuning's weights already are; LoRA and IA3 are folded in by peft."""
    method = peft_spec.method
    if method in WEIGHT_METHODS:
        return model.merge_and_unload()
    if method in PEFT_LIBRARY_METHODS:  # prompt learning: dualtune.export refuses it before this
        raise BackendError(f"peft.method {method}: its virtual tokens cannot be merged into the weights")
    return model


def _model_class(task: str) -> Any:
    if task == "seq2seq":
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForSequenceClassification


class _Logits(torch.nn.Module):
    """The classifier with one output, its logits (ONNX's output ``logits``)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _sample_inputs(model: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows for the tracer, the second padded: a trace of an all-ones mask may let transformers
    drop the mask from the graph (its SDPA path skips a mask that masks nothing)."""
    length = 8
    ids = torch.arange(2 * length, device=device).reshape(2, length) % model.config.vocab_size
    mask = torch.ones(2, length, dtype=torch.long, device=device)
    mask[1, length - 3 :] = 0
    return ids, mask


def export_onnx(model: Any, path: Path) -> None:
    """The classifier as ONNX: inputs input_ids and attention_mask, output logits; batch and sequence
    lengths free."""
    device = next(model.parameters()).device
    free = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice and the tracer's constant notices: not the user's.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _Logits(model).eval(),
            _sample_inputs(model, device),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": free,
                "attention_mask": free,
                "logits": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


def export(model: Any, tokenizer: Any, task: str, fmt: str, directory: Path, name_or_path: str) -> list[str]:
    """Write ``model`` (``merge_trained``'s) as ``fmt`` into ``directory`` with its config and tokenizer;
    the names written. ``name_or_path``: the base model as the recipe names it (config.json's
    ``_name_or_path``, not this machine's path to it)."""
    directory.mkdir(parents=True)
    model.config.name_or_path = name_or_path
    model.eval()
    if fmt == "merged":
        model.save_pretrained(directory, safe_serialization=True)
    elif fmt == "onnx":
        if task != "classification":  # dualtune.export refuses it before this
            raise BackendError("--format onnx: classification models only")
        export_onnx(model, directory / ONNX_FILE)
        model.config.save_pretrained(directory)  # id2label: what the logits' columns are
    else:
        raise BackendError(f"--format {fmt}: expected merged or onnx")
    tokenizer.save_pretrained(directory)
    return sorted(p.name for p in directory.iterdir())


def load_exported(
    directory: Path, fmt: str, task: str, device: Any
) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """What ``export`` wrote, loaded as a user without dualtune or peft loads it; a function from a
    numpy batch to its logits."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch here
        session = onnxruntime.InferenceSession(
            str(directory / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )

        def run_onnx(batch: dict[str, np.ndarray]) -> np.ndarray:
            feed = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
            logits: np.ndarray = session.run(["logits"], feed)[0]
            return logits

        return run_onnx
    model = _model_class(task).from_pretrained(directory).to(device).eval()

    def run_merged(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()})
        logits: np.ndarray = out.logits.float().cpu().numpy()
        return logits

    return run_merged
