"""Rules for normalisation layers: ``nn.LayerNorm`` and the RMSNorm family.

The normalised input is recomputed from the saved activation (in float32), so nothing beyond the
layer's input has to be kept from the forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import DenseGrads, register_rule, upcast


def _sum_over_positions(per_position: torch.Tensor, param_dims: int) -> torch.Tensor:
    batch = per_position.shape[0]
    return per_position.reshape(batch, -1, *per_position.shape[per_position.dim() - param_dims :]).sum(dim=1)


@register_rule(nn.LayerNorm)
def layer_norm_rule(layer: nn.LayerNorm, activation: torch.Tensor, grad_output: torch.Tensor):
    if not layer.elementwise_affine:
        return {}
    dims = tuple(range(-len(layer.normalized_shape), 0))
    x = upcast(activation)
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    x_hat = (x - mean) * torch.rsqrt(var + layer.eps)
    g = upcast(grad_output)
    grads = {"weight": DenseGrads(_sum_over_positions(g * x_hat, len(dims)))}
    if layer.bias is not None:
        grads["bias"] = DenseGrads(_sum_over_positions(g, len(dims)))
    return grads


def _rms_eps(layer: nn.Module, dtype: torch.dtype) -> float:
    for attribute in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(layer, attribute, None)
        if value is not None:
            return float(value)
    return torch.finfo(dtype).eps  # nn.RMSNorm with eps=None


@register_rule(
    nn.RMSNorm,
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "MixtralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "Phi3RMSNorm",
    "GemmaRMSNorm",
    "T5LayerNorm",
)
def rms_norm_rule(layer: nn.Module, activation: torch.Tensor, grad_output: torch.Tensor):
    """``y = w * x / rms(x)`` (Gemma's ``(1 + w)`` has the same gradient in ``w``)."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return {}
    dims = weight.dim()
    reduce_dims = tuple(range(-dims, 0))
    x = upcast(activation)
    x_hat = x * torch.rsqrt(x.pow(2).mean(dim=reduce_dims, keepdim=True) + _rms_eps(layer, activation.dtype))
    x_hat = upcast(x_hat.to(activation.dtype))  # HF casts back to the input dtype before scaling
    return {"weight": DenseGrads(_sum_over_positions(upcast(grad_output) * x_hat, dims))}
