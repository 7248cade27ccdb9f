"""Writes the demo sentiment dataset shipped in ``src/sparsepeft/data/demo/`` (run once; output is committed).

Every sentence is composed here from a small hand-written grammar of product reviews, so the data is
ours to license (Apache-2.0, like the package). To keep the task from being a bag-of-words lookup it
mixes negation ("not bad"), contrast ("X, but Y": the clause after "but" decides), hedges and intensifiers,
and 8% of labels follow the first clause of a contrast instead (realistic noise).

    python tools/make_demo_data.py
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

PRODUCTS = ["the headphones", "this blender", "the laptop", "my new phone", "the hotel room", "this backpack",
            "the coffee maker", "the running shoes", "this novel", "the vacuum cleaner", "the tent", "the desk lamp",
            "the delivery service", "the keyboard", "this jacket", "the tablet", "the camera", "the mattress",
            "the restaurant", "the customer support", "the app", "the kettle", "the monitor", "the bike"]
ASPECTS = ["battery life", "build quality", "price", "sound", "design", "screen", "comfort", "speed", "packaging",
           "instructions", "service", "taste", "fit", "noise level", "setup", "warranty"]
POSITIVE = ["great", "excellent", "wonderful", "solid", "reliable", "impressive", "fantastic", "lovely", "sturdy",
            "pleasant", "superb", "decent", "smooth", "comfortable", "brilliant"]
NEGATIVE = ["terrible", "awful", "flimsy", "disappointing", "poor", "useless", "cheap-feeling", "noisy", "broken",
            "annoying", "unreliable", "mediocre", "clunky", "frustrating", "dreadful"]
INTENSIFIERS = ["", "", "really ", "very ", "quite ", "truly ", "absolutely ", "surprisingly "]
HEDGES = ["", "", "honestly, ", "to be fair, ", "overall, ", "after a month, ", "in my experience, "]
VERDICT_POS = ["I would buy it again", "I recommend it", "worth every penny", "it made my week", "five stars from me",
               "I am very happy with it", "it exceeded my expectations"]
VERDICT_NEG = ["I want a refund", "I would not recommend it", "a waste of money", "it went straight back",
               "one star from me", "I regret buying it", "it let me down"]


def clause(rng: random.Random, positive: bool) -> str:
    """One evaluative clause whose polarity is ``positive``; negation flips the adjective's polarity."""
    negated = rng.random() < 0.3
    pool = NEGATIVE if positive == negated else POSITIVE
    adjective = rng.choice(pool)
    subject = rng.choice([rng.choice(PRODUCTS), f"the {rng.choice(ASPECTS)}"])
    if negated:
        return f"{subject} is not {adjective}" if rng.random() < 0.5 else f"{subject} was never {adjective}"
    return f"{subject} is {rng.choice(INTENSIFIERS)}{adjective}"


def review(rng: random.Random) -> tuple[str, int]:
    label = rng.random() < 0.5
    kind = rng.random()
    if kind < 0.35:
        text = clause(rng, label)
    elif kind < 0.7:
        first = clause(rng, not label)
        second = clause(rng, label)
        text = f"{first}, but {second}"
        if rng.random() < 0.08:
            label = not label
    elif kind < 0.85:
        text = f"{clause(rng, label)} and {clause(rng, label)}"
    else:
        verdict = rng.choice(VERDICT_POS if label else VERDICT_NEG)
        text = f"{clause(rng, label)}; {verdict}"
    text = rng.choice(HEDGES) + text
    return text[0].upper() + text[1:] + ".", int(label)


def write(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)


def main() -> None:
    rng = random.Random(20261123)
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    while len(rows) < 1400:
        text, label = review(rng)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    out = Path(__file__).resolve().parents[1] / "src" / "sparsepeft" / "data" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.tsv", rows[:1000])
    write(out / "dev.tsv", rows[1000:])


if __name__ == "__main__":
    main()
