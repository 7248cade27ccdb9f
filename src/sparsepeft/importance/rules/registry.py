"""Registry of per-sample-gradient rules, keyed by layer type.

A rule turns what one call of a layer saw in the forward pass (its input activation) and in the backward
pass (the gradient of the loss with respect to its output) into the *per-sample* gradients of the layer's
own parameters, without ever running the batch one sample at a time.

Lookup is by exact type first. A subclass inherits its parent's rule only when it does not override
``forward`` — a subclass that computes something else (``NonDynamicallyQuantizableLinear`` inside
``nn.MultiheadAttention`` never even runs its forward) must not silently reuse a rule that would be wrong.
Layers of libraries we do not import (e.g. ``LlamaRMSNorm``) register by class name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn


@dataclass
class DenseGrads:
    """Per-sample gradients as a dense tensor of shape ``[batch, *param.shape]``."""

    values: torch.Tensor


@dataclass
class RowGrads:
    """Per-sample gradients that are non-zero in a few rows only (embedding tables).

    Entry ``j`` says: sample ``sample[j]`` has gradient ``values[j]`` in row ``row[j]``; each
    (sample, row) pair appears at most once, so squaring ``values`` squares true per-sample entries.
    """

    sample: torch.Tensor
    row: torch.Tensor
    values: torch.Tensor
    batch_size: int


@dataclass
class FactoredGrads:
    """Per-sample gradients of an affine weight, kept as the factors they are made of.

    Sample ``b``'s gradient is ``first[b]^T @ second[b]`` (``first``: ``[batch, positions, m]``,
    ``second``: ``[batch, positions, n]``, gradient ``[m, n]``). The accumulator chooses how to reduce it
    — one cache-sized product per sample, a single GEMM when there is one position per sample — instead
    of materialising ``batch x m x n`` values.
    """

    first: torch.Tensor
    second: torch.Tensor

    def materialize(self) -> torch.Tensor:
        return torch.bmm(self.first.transpose(1, 2), self.second)


PerSampleGrads = Union[DenseGrads, RowGrads, FactoredGrads]


@dataclass
class ForwardContext:
    """What a call saw besides its first input, for rules registered with ``context=True``.

    PEFT's DoRA magnitude layer, for instance, receives the LoRA factors and the base layer as keyword
    arguments: its per-sample gradient cannot be formed from the activation alone.
    """

    inputs: tuple
    kwargs: dict


Rule = Callable[..., "dict[str, PerSampleGrads] | None"]
"""(layer, input activation, output gradient[, context]) -> {local parameter name: per-sample grads}.

The returned tensors must be new (not views of the activation or output gradient): the Fisher
accumulator squares them in place. Returning ``None`` means "this instance is not covered" (e.g. an embedding with ``max_norm``); its
parameters then go to the exact fallback."""

_RULES_BY_TYPE: dict[type, Rule] = {}
_RULES_BY_NAME: dict[str, Rule] = {}


def register_rule(*layer_types: Union[type, str], context: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: register ``rule`` for layer classes, given as types or as class names.

    With ``context=True`` the rule also receives a :class:`ForwardContext` (all positional and keyword
    arguments of the call) as a fourth argument.
    """

    def decorator(rule: Rule) -> Rule:
        rule.needs_context = context
        for layer_type in layer_types:
            if isinstance(layer_type, str):
                _RULES_BY_NAME[layer_type] = rule
            else:
                _RULES_BY_TYPE[layer_type] = rule
        return rule

    return decorator


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s class, or ``None`` when only the exact fallback can score it."""
    module_type = type(module)
    if module_type in _RULES_BY_TYPE:
        return _RULES_BY_TYPE[module_type]
    if module_type.__name__ in _RULES_BY_NAME:
        return _RULES_BY_NAME[module_type.__name__]
    for base in module_type.__mro__[1:]:
        rule = _RULES_BY_TYPE.get(base)
        if rule is not None and module_type.forward is base.forward:
            return rule
    return None


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """At least float32 for the per-sample products (half precision would lose small gradients)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(compute_dtype(tensor))


def as_sequence(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """View ``[batch, ..., features]`` as ``[batch, positions, features]`` (positions may be 1)."""
    return tensor.reshape(batch_size, -1, tensor.shape[-1])
