"""``dualtune predict``: a finished run's adapter on new text. Framework-free: the backend loads the
model and runs it; tokenization, batching and the softmax happen here, in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dualtune import data as datamap
from dualtune.backend import Backend
from dualtune.errors import DataError
from dualtune.evaluation import eval_mode, generate_text


def read_texts(texts: list[str], file: str | Path | None = None) -> list[str]:
    """``texts``, then ``file``'s lines (UTF-8, blank lines skipped); at least one text."""
    texts = list(texts)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
        texts += [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError("no text to predict: give TEXT arguments or --file PATH")
    return texts


def label_names(recipe) -> list[str]:
    """The classes, as the run had them: its recipe.yaml names them (``run_recipe`` writes the names
    the data gave); a hand-written recipe without them gets them from the data, as training did."""
    if recipe.data.label_names:
        return list(recipe.data.label_names)
    return datamap.load_rows(recipe.data).label_names


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def predict(
    run_dir: str | Path, texts: list[str], backend: Backend, batch_size: int | None = None
) -> list[dict]:
    """One dict per text, in order: ``{"text", "label", "scores"}`` (classification, softmax over the
    classes) or ``{"text", "label"}`` (seq2seq, causal_lm: the generated text, which need not be a
    label name).
    ``batch_size`` defaults to the run's evaluation batch size."""
    from dualtune.recipe import load_recipe
    from dualtune.runner import check_finished

    run_dir = check_finished(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    task = recipe.model.task
    names = label_names(recipe) if task == "classification" else list(recipe.data.label_names or [])
    tok = backend.load_tokenizer(recipe.model)
    model = backend.load_trained(recipe.model, names, tok, recipe.peft, run_dir / "adapter")
    bs = batch_size or recipe.train.eval_batch_size or recipe.train.batch_size
    # as evaluation tokenizes and pads
    if task == "causal_lm":
        ids = datamap.encode_prompts(texts, tok, recipe.data)
    else:
        ids = datamap.encode_texts(texts, tok, recipe.data)
    out: list[dict] = []
    with eval_mode(backend, model):
        for start in range(0, len(ids), bs):
            chunk = texts[start : start + bs]
            batch = backend.to_tensors(
                datamap.collate_inputs(ids[start : start + bs], tok.pad_token_id, recipe.data)
            )
            if task == "classification":
                _, logits = backend.eval_batch(model, batch)
                for text, row, p in zip(chunk, logits, softmax(logits)):
                    out.append(
                        {
                            "text": text,
                            "label": names[int(row.argmax())],
                            "scores": {n: float(x) for n, x in zip(names, p)},
                        }
                    )
            else:
                decoded = generate_text(
                    backend, model, tok, ids[start : start + bs], batch, recipe.data, task, recipe.peft.method
                )
                out += [{"text": text, "label": label} for text, label in zip(chunk, decoded)]
    return out
