"""From text to model inputs."""

from __future__ import annotations

from .loading import Split


def tokenize_split(split: Split, tokenizer, max_length: int = 128, regression: bool = False) -> list[dict]:
    """Tokenise each row (one or two texts) without padding; the collator pads per batch."""
    columns = list(zip(*split.texts))
    encoded = tokenizer(*columns[:2], truncation=True, max_length=max_length)
    features = []
    for i, label in enumerate(split.labels):
        example = {key: encoded[key][i] for key in encoded.keys()}
        example["labels"] = float(label) if regression else int(label)
        features.append(example)
    return features
