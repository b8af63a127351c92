"""A small SYNTHETIC financial-sentiment dataset, generated from templates.

It stands in for financial_phrasebank where no hub is reachable: same fields (``sentence``,
``label``), same label names, a similar class balance (neutral-heavy). It is not real data; its
sentences are made up, and any accuracy on it says only that training works.
"""

from __future__ import annotations

import random

LABEL_NAMES = ["negative", "neutral", "positive"]

_COMPANIES = [
    "Nordea",
    "Fiskars",
    "Componenta",
    "Aspo",
    "Tieto",
    "Ruukki",
    "Stora Enso",
    "Elisa",
    "Kone",
    "Outotec",
    "Wartsila",
    "Raisio",
    "Sanoma",
    "Talvivaara",
    "Uponor",
    "YIT",
]
_METRICS = [
    "operating profit",
    "net sales",
    "net profit",
    "revenue",
    "order intake",
    "EBIT",
    "earnings per share",
    "pre-tax profit",
    "cash flow",
    "market share",
]
_CITIES = ["Helsinki", "Espoo", "Tampere", "Oulu", "Turku", "Stockholm", "Tallinn", "Vantaa"]
_PRODUCTS = [
    "paper machines",
    "steel products",
    "software services",
    "elevators",
    "packaging",
    "mobile networks",
    "engines",
    "building systems",
]
_PERIODS = [
    "the first quarter",
    "the second quarter",
    "the third quarter",
    "2008",
    "2009",
    "the review period",
    "January-June",
    "the fiscal year",
]

_TEMPLATES = {
    "positive": [
        "{company} said its {metric} rose {pct} % to EUR {amt} mn in {period} .",
        "{company} 's {metric} increased to EUR {amt} mn from EUR {amt2} mn in {period} .",
        "{company} won an order worth EUR {amt} mn to deliver {product} .",
        "In {period} , {metric} grew by {pct} % and {company} raised its outlook .",
        "{company} reported record {metric} of EUR {amt} mn , up from EUR {amt2} mn .",
        "Shares in {company} jumped {pct} % after strong {metric} in {period} .",
    ],
    "negative": [
        "{company} said its {metric} fell {pct} % to EUR {amt} mn in {period} .",
        "{company} 's {metric} decreased to EUR {amt2} mn from EUR {amt} mn in {period} .",
        "{company} will cut {n} jobs at its {product} unit in {city} .",
        "In {period} , {company} swung to a loss as {metric} dropped {pct} % .",
        "{company} lowered its guidance after weak {metric} in {period} .",
        "Shares in {company} slumped {pct} % on disappointing {metric} .",
    ],
    "neutral": [
        "{company} is headquartered in {city} .",
        "{company} makes {product} and employs {n} people .",
        "The annual general meeting of {company} will be held in {city} .",
        "{company} will publish its {metric} for {period} next week .",
        "{company} operates in {city} and sells {product} .",
        "The company 's {product} business is based in {city} .",
        "{company} appointed a new head of its {product} division .",
        "Financial details of the {product} deal were not disclosed .",
    ],
}
# financial_phrasebank (all agree): about 13 % negative, 61 % neutral, 26 % positive.
_WEIGHTS = {"negative": 0.14, "neutral": 0.60, "positive": 0.26}


def generate(rows: int = 1000, seed: int = 0) -> list[dict]:
    """``rows`` synthetic examples ``{"sentence": str, "label": str}``; the same seed, the same rows."""
    rng = random.Random(seed)
    labels = list(_WEIGHTS)
    out = []
    for _ in range(rows):
        label = rng.choices(labels, weights=[_WEIGHTS[k] for k in labels])[0]
        amt = rng.uniform(1, 500)
        sentence = rng.choice(_TEMPLATES[label]).format(
            company=rng.choice(_COMPANIES),
            metric=rng.choice(_METRICS),
            city=rng.choice(_CITIES),
            product=rng.choice(_PRODUCTS),
            period=rng.choice(_PERIODS),
            pct=rng.randint(2, 60),
            amt=f"{amt:.1f}",
            amt2=f"{amt * rng.uniform(0.4, 0.9):.1f}",
            n=rng.randint(20, 2000),
        )
        out.append({"sentence": sentence, "label": label})
    return out
