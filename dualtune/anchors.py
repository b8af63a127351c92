"""Published numbers to stand a run beside (``dualtune report --anchors``): the same data and
protocol, another model or method. A run is matched to its data set by its recipe's ``data.source``
(and ``data.config``), or by the name given to ``--anchors``. Framework-free."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dualtune.errors import RecipeError


@dataclass(frozen=True)
class Anchor:
    dataset: str  # a DATASETS key
    source: str  # who published it
    model: str
    method: str  # dualtune's name for it (peft.method); "none" = full fine-tuning
    split: str  # the evaluation protocol: eval rows, or cross-validation
    metric: str  # the name of the same number in a run's final_metrics.json
    value: float


# dataset key -> what it is and its protocol, said once in the report's heading
DATASETS = {
    "financial_phrasebank/sentences_allagree": "financial_phrasebank, all annotators agree (2,264 rows)",
    "financial_phrasebank/sentences_50agree": "financial_phrasebank, 50 % agree (4,846 rows)",
    "disaster_tweets": "disaster tweets (Kaggle nlp-getting-started train.csv, 7,613 rows)",
}

PEFT_NOTEBOOKS = "HF peft example notebooks"
BLOG = "HF blog: LoRA for sequence classification with RoBERTa, Llama and Mistral"
FINBERT = "FinBERT (Araci 2019)"
ANCHORS = (
    Anchor("financial_phrasebank/sentences_allagree", PEFT_NOTEBOOKS, "t5-large", "prefix", "227 eval rows (10 %)", "accuracy", 0.969),
    Anchor("financial_phrasebank/sentences_allagree", PEFT_NOTEBOOKS, "mt0-large", "lora", "227 eval rows (10 %)", "accuracy", 0.974),
    Anchor("financial_phrasebank/sentences_allagree", PEFT_NOTEBOOKS, "mt0-large", "ia3", "227 eval rows (10 %)", "accuracy", 0.969),
    Anchor("financial_phrasebank/sentences_allagree", PEFT_NOTEBOOKS, "t5-large", "prompt", "227 eval rows (10 %)", "accuracy", 0.855),
    Anchor("financial_phrasebank/sentences_allagree", "mindnlp's port of the prefix notebook", "t5-large", "prefix", "226 eval rows (10 %)", "accuracy", 0.973),
    Anchor("financial_phrasebank/sentences_allagree", FINBERT, "FinBERT", "none", "10-fold cross-validation", "accuracy", 0.97),
    Anchor("financial_phrasebank/sentences_allagree", FINBERT, "FinBERT", "none", "10-fold cross-validation", "f1_macro", 0.95),
    Anchor("financial_phrasebank/sentences_50agree", FINBERT, "FinBERT", "none", "10-fold cross-validation", "accuracy", 0.86),
    Anchor("financial_phrasebank/sentences_50agree", FINBERT, "FinBERT", "none", "10-fold cross-validation", "f1_macro", 0.84),
    Anchor("disaster_tweets", BLOG, "roberta-large", "lora", "1,523 eval rows (80/20, seed 42)", "f1", 0.8077),
    Anchor("disaster_tweets", BLOG, "meta-llama/Llama-2-7b-hf", "lora", "1,523 eval rows (80/20, seed 42)", "f1", 0.7638),
    Anchor("disaster_tweets", BLOG, "mistralai/Mistral-7B-v0.1", "lora", "1,523 eval rows (80/20, seed 42)", "f1", 0.7364),
)  # fmt: skip

AGREEMENT = re.compile(r"(all|50|66|75)agree", re.IGNORECASE)


def dataset_of(data: dict) -> str | None:
    """The DATASETS key a recipe's ``data`` section reads, or None when it is none of them."""
    source = str(data.get("source") or "")
    name = Path(source).name.lower()
    fpb = "financial_phrasebank" in source.lower() or "financialphrasebank" in source.lower()
    agreement = AGREEMENT.search(name) or AGREEMENT.search(str(data.get("config") or ""))
    if (fpb or name.startswith("sentences_")) and agreement:
        return f"financial_phrasebank/sentences_{agreement.group(1).lower()}agree"
    if "twitter_disaster" in source.lower() or "disaster" in source.lower():
        return "disaster_tweets"
    return None


def anchors_for(dataset: str) -> list[Anchor]:
    if dataset not in DATASETS:
        raise RecipeError(f"--anchors {dataset}: no published numbers for it; known: {', '.join(DATASETS)}")
    return [a for a in ANCHORS if a.dataset == dataset]
