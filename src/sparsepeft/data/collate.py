"""Batching tokenised examples of different lengths, with no tokenizer needed."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

_PAD_VALUES = {"labels": -100, "attention_mask": 0, "token_type_ids": 0}


@dataclass
class PaddingCollator:
    """Pads every sequence field to the longest in the batch (on the right unless ``padding_side``).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, sequence ``labels`` with
    -100 (ignored by the loss); scalar fields become one tensor.
    """

    pad_token_id: int | None = 0
    padding_side: str = "right"

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            values = [example[key] for example in examples]
            if isinstance(values[0], (list, tuple)) or (isinstance(values[0], torch.Tensor) and values[0].dim() > 0):
                batch[key] = self._pad(key, [torch.as_tensor(v) for v in values])
            elif isinstance(values[0], (int, float, bool, torch.Tensor)):
                batch[key] = torch.as_tensor(values)
        return batch

    def _pad(self, key: str, sequences: list[torch.Tensor]) -> torch.Tensor:
        pad = _PAD_VALUES.get(key, self.pad_token_id if key == "input_ids" and self.pad_token_id is not None else 0)
        return torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad,
                                               padding_side=self.padding_side)


@dataclass
class AnswerLogitsCollator(PaddingCollator):
    """Causal-LM batches whose logits are computed only where the loss reads them.

    The loss of a prompt -> answer example reads the answer tokens only (about 10 of 70 positions on
    social_iqa), yet a causal LM projects every position onto its vocabulary: for SmolLM2 a 49k x 576
    matmul, a 49k-way softmax and their backward at every position. Left padding puts every answer at the
    end of its row, so the model can keep the logits of the last N positions alone (``logits_to_keep``;
    N = from the position before the first labelled column to the end) and the labels are cut to the same
    columns. Position ids count real tokens only, so every token keeps the position it has under right
    padding: loss and gradients are those of the right-padded, full-logit batch, up to float summation
    order. Use it only with models whose forward takes ``logits_to_keep`` and ``position_ids``
    (:func:`keeps_logits`).
    """

    padding_side: str = "left"

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = super().__call__(examples)
        labels, attention = batch.get("labels"), batch.get("attention_mask")
        if labels is None or labels.dim() != 2 or attention is None:
            return batch
        batch["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
        labelled = (labels != -100).any(dim=0).nonzero()
        width = labels.shape[1]
        first = int(labelled[0]) if len(labelled) else width - 1
        keep = min(width, width - first + 1)  # the column before the first label predicts it
        batch["labels"] = labels[:, width - keep:]
        batch["logits_to_keep"] = keep
        return batch


def _forward_parameters(model) -> Mapping[str, inspect.Parameter]:
    """The parameters of the forward of the model inside its PEFT / DDP wrappers (theirs pass keywords on)."""
    for _ in range(4):
        inner = getattr(model, "module", None)  # DDP
        if inner is None and hasattr(model, "get_base_model"):  # PEFT
            inner = model.get_base_model()
        if inner is None or inner is model:
            break
        model = inner
    return inspect.signature(model.forward).parameters


def keeps_logits(model) -> bool:
    """Whether ``model`` (or the model inside its PEFT / DDP wrappers) can compute logits for the last
    positions only and take explicit position ids, as transformers' causal LMs do."""
    parameters = _forward_parameters(model)
    return "logits_to_keep" in parameters and "position_ids" in parameters


def cache_keyword(model) -> str | None:
    """The keyword under which ``model`` takes (and returns) cached keys and values and continues from them at
    explicit positions, as transformers' decoder-only LMs do (``cache``; ``past_key_values`` before
    transformers 5.24), so that a prompt shared by several continuations is computed once. None if it cannot."""
    parameters = _forward_parameters(model)
    if "position_ids" not in parameters or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def causal_lm_collator(model, pad_token_id: int | None) -> PaddingCollator:
    """Answer-only logits where the model supports them (:func:`keeps_logits`), right padding otherwise."""
    return (AnswerLogitsCollator if keeps_logits(model) else PaddingCollator)(pad_token_id=pad_token_id)


def collator_for(model) -> PaddingCollator:
    """Pads with the model's own ``pad_token_id`` (when the caller gives no collator)."""
    return PaddingCollator(pad_token_id=getattr(getattr(model, "config", None), "pad_token_id", None))
