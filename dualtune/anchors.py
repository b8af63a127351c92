"""Published numbers to stand a run beside (``dualtune report --anchors``): the same data and
protocol, another model or method. A run is matched to its data set by its recipe's ``data.source``
(and ``data.config``), or by the name given to ``--anchors``. Framework-free."""

from __future__ import annotations

import csv
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

# The published numbers themselves are data: dualtune/anchors.csv (one row per number, with its source).
ANCHORS_FILE = Path(__file__).with_name("anchors.csv")


def _read_anchors() -> tuple[Anchor, ...]:
    with ANCHORS_FILE.open(newline="", encoding="utf-8") as f:
        return tuple(
            Anchor(
                r["dataset"], r["source"], r["model"], r["method"], r["split"], r["metric"], float(r["value"])
            )
            for r in csv.DictReader(f)
        )


ANCHORS = _read_anchors()

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
