"""Instruction-style data for causal LMs: JSON-lines prompt/response pairs, response-only loss, exact match.

Each row of a ``.jsonl`` (or ``.json``/``.csv``/``.tsv``) file has a prompt and a response column. A
training example is ``prompt tokens + response tokens + EOS`` with labels −100 on the prompt, so the loss
is the response's alone. Evaluation reports the loss and **exact match**: the share of examples whose
whole response (EOS included) is the model's greedy choice at every position given the reference prefix.
That is exactly "greedy decoding from the prompt reproduces the reference response": greedy decoding
emits the reference token at a position iff it is the argmax there, and then continues from the same
prefix. It takes one forward pass per batch instead of a generation loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .loading import DataError, _read_rows

CAUSAL_LM = "causal-lm"
METRICS = ("exact_match", "token_accuracy")


@dataclass
class PromptResponseTask:
    """Prompt/response pairs of a training file and its evaluation file(s)."""

    name: str
    train: list[tuple[str, str]]
    evaluation: dict[str, list[tuple[str, str]]]
    source: str = ""
    metrics: tuple[str, ...] = METRICS
    is_regression: bool = False
    extra: dict = field(default_factory=dict)


def load_prompt_response(train_file: str, validation_file: str, prompt_column: str = "prompt",
                         response_column: str = "response") -> PromptResponseTask:
    def pairs(path: str) -> list[tuple[str, str]]:
        rows = _read_rows(Path(path))
        for where, row in rows:  # every row, not only the first: a raw KeyError names nothing
            missing = [c for c in (prompt_column, response_column) if row.get(c) is None]
            if missing:
                raise DataError(f"{path}, {where}: no {missing} (the row has {sorted(k for k in row if k)}); name the "
                                "columns with --prompt-column / --response-column, or fix the row.")
        return [(str(row[prompt_column]), str(row[response_column])) for _, row in rows]

    return PromptResponseTask(Path(train_file).stem, pairs(train_file), {"validation": pairs(validation_file)},
                              source=str(train_file))


def subset(pairs: list[tuple[str, str]], n: int | None, seed: int) -> list[tuple[str, str]]:
    if n is None or n >= len(pairs):
        return pairs
    return [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), n))]


def tokenize_prompt_response(pairs: list[tuple[str, str]], tokenizer, max_length: int) -> list[dict]:
    """``prompt + response + EOS`` with the prompt masked out of the labels; long prompts lose their start."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    features = []
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        response_ids = response_ids[:max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(response_ids)):]
        ids = prompt_ids + response_ids
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [-100] * len(prompt_ids) + response_ids})
    return features


def greedy_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Trainer's ``preprocess_logits_for_metrics``: keep the argmax token, not the vocabulary-wide logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def exact_match_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Exact match and token accuracy over response tokens (position t predicts label t+1)."""
    predicted, target = predictions[:, :-1], labels[:, 1:]
    scored = target != -100
    hits = (predicted == target) | ~scored
    has_response = scored.any(axis=1)
    if not has_response.any():
        raise DataError("No evaluation example has a response token left after truncation: raise --max-seq-length.")
    exact = hits.all(axis=1)[has_response]
    return {"exact_match": float(exact.mean()),
            "token_accuracy": float(((predicted == target) & scored).sum() / scored.sum())}
