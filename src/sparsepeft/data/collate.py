"""Batching tokenised examples of different lengths, with no tokenizer needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

_PAD_VALUES = {"labels": -100, "attention_mask": 0, "token_type_ids": 0}


@dataclass
class PaddingCollator:
    """Right-pads every sequence field to the longest in the batch.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, sequence ``labels`` with
    -100 (ignored by the loss); scalar fields become one tensor.
    """

    pad_token_id: int | None = 0

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
        return torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad)


def collator_for(model) -> PaddingCollator:
    """Pads with the model's own ``pad_token_id`` (when the caller gives no collator)."""
    return PaddingCollator(pad_token_id=getattr(getattr(model, "config", None), "pad_token_id", None))
