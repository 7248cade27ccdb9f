"""Rules for affine layers: ``nn.Linear`` and GPT-2's ``Conv1D`` (a Linear with a transposed weight).

For one sample with positions t, the weight gradient is ``sum_t g_t a_t^T``: the rule hands over the
factors ``g`` and ``a`` and lets the accumulator form and reduce the products (see ``FactoredGrads``).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import DenseGrads, FactoredGrads, as_sequence, register_rule, upcast


def _affine_grads(activation, grad_output, has_bias: bool, transposed: bool) -> dict:
    batch = grad_output.shape[0]
    a = upcast(as_sequence(activation, batch))
    g = upcast(as_sequence(grad_output, batch))
    grads = {"weight": FactoredGrads(first=a, second=g) if transposed else FactoredGrads(first=g, second=a)}
    if has_bias:
        grads["bias"] = DenseGrads(g.sum(dim=1))
    return grads


@register_rule(nn.Linear)
def linear_rule(layer: nn.Linear, activation: torch.Tensor, grad_output: torch.Tensor):
    return _affine_grads(activation, grad_output, layer.bias is not None, transposed=False)


@register_rule("Conv1D")
def conv1d_rule(layer: nn.Module, activation: torch.Tensor, grad_output: torch.Tensor):
    """transformers' ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``[in, out]``."""
    if getattr(layer, "weight", None) is None or layer.weight.dim() != 2:
        return None
    return _affine_grads(activation, grad_output, getattr(layer, "bias", None) is not None, transposed=True)
