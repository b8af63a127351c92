"""The model-level half of every backend: Hugging Face transformers + peft through the torch API.

Under the torch backend ``import torch`` is PyTorch; under the MindSpore backend mindnlp has
redirected it to mindtorch, its torch-API shim over MindSpore. So this module is imported only
by a backend package, after that backend has activated its framework, and everything here must
use torch calls that exist in both. What differs per framework (seeding, tensors, gradients, the
optimizer update, clipping, device placement) is the ``FrameworkStep`` each backend package writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch  # PyTorch or mindtorch: see the module docstring
import transformers
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from dualtune.backend import Backend, BackendError, Batch, Tensor, no_pad_token
from dualtune.backends.hf.methods import (
    BITFIT_CONFIG,
    BITFIT_WEIGHTS,
    add_zero_biases,
    apply_bitfit,
    bitfit_config,
    peft_config,
    read_bitfit_config,
)
from dualtune.hub import model_not_found, model_source
from dualtune.recipe import PEFT_LIBRARY_METHODS

log = logging.getLogger("dualtune")

# Every trainable tensor by name, written beside an adapter saved as a starting point: peft saves
# p-tuning's (and projected prefixes') virtual tokens after their encoder, which cannot restart training.
TRAINABLE_STATE = "trainable_state.safetensors"


def gguf_tokenizer_settings(path: str) -> dict:
    """The tokenizer facts a GGUF file's metadata states: special tokens by role and whether
    BOS/EOS are added (``tokenizer.ggml.*``); a role the file does not state is absent."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        field = fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else field.contents()

    tokens = value("tokens") or []
    settings: dict = {}
    for role, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("pad", "padding_token_id"),
    ):
        index = value(key)
        if isinstance(index, int) and 0 <= index < len(tokens):
            settings[f"{role}_token"] = tokens[index]
    for key in ("add_bos_token", "add_eos_token"):
        if value(key) is not None:
            settings[key] = bool(value(key))
    return settings


def correct_gguf_tokenizer(tok: Any, path: str) -> None:
    """transformers 4.57's GGUF tokenizer swaps BOS for EOS (SmolLM2: eos ``<|im_start|>``) and
    ignores ``add_bos_token``; the file's metadata says what the model was trained with."""
    settings = gguf_tokenizer_settings(path)
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if role in settings:
            setattr(tok, role, settings[role])
    for key in ("add_bos_token", "add_eos_token"):
        if key in settings and hasattr(tok, key):
            setattr(tok, key, settings[key])  # LlamaTokenizerFast rebuilds its post-processor
    ids = tok("a")["input_ids"]
    if (
        settings.get("add_bos_token") is False
        and tok.bos_token_id is not None
        and ids[:1] == [tok.bos_token_id]
    ):
        raise BackendError(
            f"{path}: the tokenizer adds BOS, which the file says it must not, and cannot be told"
        )


class HFBackend(Backend):
    """transformers + peft through the torch API. A subclass supplies the ``FrameworkStep``
    methods (``dualtune.backend``) and ``torch_device``; everything else is here."""

    def __init__(self, device: str):
        self.device = device

    # -- tensors
    def all_reduce_sum(self, tensors: list[Tensor], scalars: list[float]) -> tuple[list[Tensor], list[float]]:
        if self.world()[1] == 1:
            return tensors, scalars
        # One collective for the step: every gradient and the scalars in one flat float32 buffer.
        flat = torch.cat(
            [t.reshape(-1).float() for t in tensors]
            + [torch.tensor(scalars, dtype=torch.float32, device=self.torch_device)]
        )
        summed = self.all_reduce_flat(flat)
        out, start = [], 0
        for t in tensors:
            out.append(summed[start : start + t.numel()].view_as(t).to(t.dtype))
            start += t.numel()
        return out, [float(x) for x in self.to_numpy(summed[start:])]

    def all_reduce_flat(self, flat: Tensor) -> Tensor:
        """The element-wise sum of ``flat`` (one float32 vector) over every process: the stack's
        collective (only called with more than one process)."""
        raise NotImplementedError

    def to_numpy(self, tensor: Tensor) -> np.ndarray:
        return tensor.detach().cpu().numpy()

    @property
    def torch_device(self) -> Any:
        return "cpu"

    # -- model
    def load_tokenizer(self, model_spec: Any) -> Any:
        source = model_source(model_spec.name_or_path)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(source.directory, **source.pretrained_kwargs())
        except OSError as err:
            raise model_not_found(model_spec.name_or_path, err) from None
        if source.gguf_file:
            correct_gguf_tokenizer(tok, source.path)
        if tok.pad_token is None:
            if not model_spec.pad_token_as_eos:
                raise no_pad_token(model_spec.name_or_path)
            tok.pad_token = tok.eos_token
        return tok

    def load_model(self, model_spec: Any, label_names: Sequence[str], tokenizer: Any) -> Any:
        source = model_source(model_spec.name_or_path)
        path, gguf = source.directory, source.pretrained_kwargs()
        try:
            if model_spec.task == "seq2seq":
                model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, **gguf)
            elif model_spec.task == "causal_lm":
                model = transformers.AutoModelForCausalLM.from_pretrained(path, **gguf)
            else:
                model = transformers.AutoModelForSequenceClassification.from_pretrained(
                    path,
                    **gguf,
                    num_labels=len(label_names),
                    id2label=dict(enumerate(label_names)),
                    label2id={n: i for i, n in enumerate(label_names)},
                )
        except OSError as err:
            raise model_not_found(model_spec.name_or_path, err) from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if model_spec.task == "causal_lm":
            # Generation stops at the tokenizer's EOS, which every target ends with (a GGUF file's
            # generation config may name another: see correct_gguf_tokenizer).
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model.to(self.torch_device)

    def apply_peft(self, model: Any, peft_spec: Any, task: str, seed: int) -> Any:
        self.seed(seed)  # adapter initialisation is seeded
        method = peft_spec.method
        if method in PEFT_LIBRARY_METHODS:
            from peft import get_peft_model

            if method in ("prompt", "p_tuning") and task == "classification" and hasattr(model, "score"):
                # Decoder heads (`score`: Llama, Mistral, GPT-2) pool the last non-pad token, found from
                # input_ids; peft passes inputs_embeds, so they pool the last position: padding in short rows.
                log.warning(
                    "%s on a decoder model: the classification head reads the last position, "
                    "which is padding in shorter rows",
                    method,
                )
            try:
                return get_peft_model(model, peft_config(peft_spec, task, model.config.name_or_path))
            except ValueError as err:  # e.g. target_modules that name nothing in this model
                raise BackendError(f"peft.{method}: {str(err).split('. ')[0]}") from None
        if method == "bitfit":
            apply_bitfit(model, peft_spec.bitfit)
            model.to(self.torch_device)
        return model

    def trainable_parameters(self, model: Any) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def parameter_count(self, model: Any) -> int:
        return sum(p.numel() for p in model.parameters())

    def set_training(self, model: Any, training: bool) -> None:
        model.train(training)

    def enable_gradient_checkpointing(self, model: Any) -> None:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise BackendError(
                f"train.gradient_checkpointing: transformers cannot checkpoint {type(model).__name__}"
            )
        # Not reentrant: gradients then reach checkpointed layers whose inputs need none (a frozen
        # embedding under LoRA). peft, applied next, adds its input-requires-grad hook as for any
        # checkpointed model. transformers checkpoints only in train mode.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- the loss
    def set_class_weights(self, model: Any, weights: np.ndarray | None) -> None:
        model._dualtune_class_weights = (
            None
            if weights is None
            else torch.tensor(np.asarray(weights, dtype=np.float32), device=self.torch_device)
        )

    def _forward(self, model: Any, batch: Batch) -> Any:
        weights = getattr(model, "_dualtune_class_weights", None)
        if weights is None or "labels" not in batch:
            return model(**batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # torch's weighted mean: sum_i w[y_i] * nll_i / sum_i w[y_i]
        out.loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"], weight=weights)
        return out

    # -- evaluation

    def eval_batch(self, model: Any, batch: Batch) -> tuple[float | None, np.ndarray]:
        with torch.no_grad():
            out = self._forward(model, batch)
        # No labels (prediction on new text): logits only.
        loss = self.to_float(out.loss) if "labels" in batch else None
        return loss, self.to_numpy(out.logits)

    def generate(self, model: Any, batch: Batch, max_new_tokens: int) -> np.ndarray:
        with torch.no_grad():
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
        if not getattr(model.config, "is_encoder_decoder", False):
            out = out[:, batch["input_ids"].shape[1] :]  # a decoder returns the prompt before the new tokens
        return self.to_numpy(out)

    # -- saving and loading
    def save(self, model: Any, directory: Path | str, peft_spec: Any, exact: bool = False) -> None:
        directory = Path(directory)
        if exact:
            directory.mkdir(parents=True, exist_ok=True)
            save_numpy(self.trainable_state(model), str(directory / TRAINABLE_STATE))
        if peft_spec.method in PEFT_LIBRARY_METHODS:
            model.save_pretrained(directory)
        elif peft_spec.method == "bitfit":
            # peft has no BitFit: the trained tensors go in a safetensors file of the same name,
            # with a config that says which tensors they are and which biases were added.
            directory.mkdir(parents=True, exist_ok=True)
            save_numpy(self.trainable_state(model), str(directory / BITFIT_WEIGHTS))
            (directory / BITFIT_CONFIG).write_text(
                json.dumps(bitfit_config(model, peft_spec.bitfit), indent=2)
            )
        else:
            model.save_pretrained(directory)

    def load_weights(self, model: Any, directory: Path | str, peft_spec: Any) -> None:
        """Overwrite ``model``'s adapter (or, for full fine-tuning, all) weights with those saved by
        ``save`` in ``directory``. The model must already carry the method (``apply_peft``)."""
        directory = Path(directory)
        if (directory / TRAINABLE_STATE).is_file():
            self.assign_trainable(model, load_numpy(str(directory / TRAINABLE_STATE)))
            return
        weights = directory / ("model.safetensors" if peft_spec.method == "none" else BITFIT_WEIGHTS)
        if not weights.is_file():
            raise BackendError(f"{directory}: no {weights.name} (not a saved {peft_spec.method} adapter)")
        saved = load_numpy(str(weights))
        if peft_spec.method in PEFT_LIBRARY_METHODS:
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            # peft itself fails with a KeyError deep inside on an adapter of another model or method
            wanted = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
            odd = sorted(set(saved) ^ set(wanted)) or sorted(
                k for k in saved if tuple(saved[k].shape) != wanted[k]
            )
            if odd:
                raise BackendError(
                    f"{directory}: not a {peft_spec.method} adapter of this model: its tensors and this "
                    f"model's differ (e.g. {odd[0]})"
                )
            # Not PeftModel.from_pretrained(is_trainable=True): peft refuses that for prefix tuning.
            # peft annotates it -> None, yet it returns load_state_dict's result
            result = set_peft_model_state_dict(  # type: ignore[func-returns-value]
                model, {k: torch.tensor(v, device=self.torch_device) for k, v in saved.items()}
            )
            # peft loads prompt_embeddings itself, then still lists the key as unexpected.
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != "prompt_embeddings"]
            if unexpected:
                raise BackendError(f"{directory}: tensors {unexpected[:3]} do not fit this model")
            return
        # Tied weights (T5's shared/lm_head) are saved under either name.
        params = dict(model.named_parameters(remove_duplicate=False))
        unknown = sorted(set(saved) - set(params))
        if unknown:
            raise BackendError(f"{directory}: tensors {unknown[:3]} do not exist in this model")
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(torch.tensor(value, device=params[name].device))

    def load_trained(
        self,
        model_spec: Any,
        label_names: Sequence[str],
        tokenizer: Any,
        peft_spec: Any,
        directory: Path | str,
    ) -> Any:
        directory = str(directory)
        if peft_spec.method == "none":
            spec = model_spec.model_copy(update={"name_or_path": directory})
            return self.load_model(spec, label_names, tokenizer)
        # The base model's fresh head is about to be replaced by the trained one: transformers'
        # "newly initialized ... You should probably TRAIN this model" is not true here.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model = self.load_model(model_spec, label_names, tokenizer)
        finally:
            transformers.logging.set_verbosity(verbosity)
        if peft_spec.method in PEFT_LIBRARY_METHODS:
            from peft import PeftModel

            return PeftModel.from_pretrained(model, directory).to(self.torch_device)
        add_zero_biases(model, read_bitfit_config(Path(directory))["add_bias_to"])
        self.load_weights(model, directory, peft_spec)
        return model.to(self.torch_device)

    def trainable_state(self, model: Any) -> dict[str, np.ndarray]:
        return {n: self.to_numpy(p).copy() for n, p in self.trainable_parameters(model)}

    def assign_trainable(self, model: Any, state: dict[str, np.ndarray]) -> None:
        params = dict(self.trainable_parameters(model))
        if set(state) != set(params):
            odd = sorted(set(state) ^ set(params))
            raise BackendError(f"saved trainable tensors do not match this model's: {odd[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(torch.tensor(value, device=params[name].device))

    def disable_dropout(self, model: Any) -> int:
        """Set every dropout probability to 0: Dropout modules, and the float attributes attention
        layers pass to functional dropout (T5Attention.dropout, BERT's dropout_prob, ...)."""
        count = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
                count += 1
            for key, value in vars(module).items():
                if "dropout" in key and isinstance(value, float) and value > 0:
                    setattr(module, key, 0.0)
                    count += 1
        return count

    def activations(self, model: Any, batch: Batch) -> dict[str, np.ndarray]:
        """Every module's output (the first tensor of it) on ``batch``, in eval mode."""
        outputs: dict[str, np.ndarray] = {}
        handles = []

        def hook(name: str) -> Callable[[Any, Any, Any], None]:
            def record(module: Any, args: Any, out: Any) -> None:
                t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    outputs[name] = self.to_numpy(t).copy()

            return record

        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook(name)))
        try:
            _, logits = self.eval_batch(model, batch)
        finally:
            for h in handles:
                h.remove()
        outputs["logits"] = logits
        return outputs

    # -- tiny models for tests and smoke runs
    def save_tiny_model(self, kind: str, directory: Path, vocab_texts: Sequence[str], seed: int = 0) -> None:
        from dualtune.backends.hf.tiny import write_tiny_model

        self.seed(seed)
        write_tiny_model(kind, directory, vocab_texts)
