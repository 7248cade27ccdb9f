"""Rule for ``nn.Embedding``.

A sample's gradient touches only the rows of the tokens it contains, so per-sample gradients are kept
as (sample, row, vector) triples: memory grows with batch x tokens x width, never with the vocabulary.
Repeated tokens within a sample are summed *before* squaring, as the true per-sample gradient requires.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import RowGrads, register_rule, upcast


@register_rule(nn.Embedding)
def embedding_rule(layer: nn.Embedding, activation: torch.Tensor, grad_output: torch.Tensor):
    if layer.max_norm is not None or layer.scale_grad_by_freq:
        return None  # these change the gradient in ways the rule does not model: use the exact fallback
    batch = grad_output.shape[0]
    width = layer.weight.shape[1]
    ids = activation.reshape(batch, -1).long()
    grads = upcast(grad_output.reshape(batch, -1, width))
    sample_of_position = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
    keys = (sample_of_position * layer.num_embeddings + ids).reshape(-1)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(unique_keys.numel(), width, dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, inverse, grads.reshape(-1, width))
    sample = unique_keys // layer.num_embeddings
    row = unique_keys % layer.num_embeddings
    if layer.padding_idx is not None:
        keep = row != layer.padding_idx  # torch never updates the padding row
        sample, row, summed = sample[keep], row[keep], summed[keep]
    return {"weight": RowGrads(sample=sample, row=row, values=summed, batch_size=batch)}
