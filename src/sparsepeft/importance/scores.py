"""Importance scores other than the Fisher, for the selection variants the sparse fine-tuning papers compare.

* ``gradient``: ``|mean_i g_i|``, the magnitude of the plain gradient over the samples (SPEFT's best fixed
  score; SMT ranks blocks by it). One ordinary backward per batch: no per-sample gradients are needed,
  so it costs a training step's memory and less time than the Fisher.
* ``taylor``: ``|w * mean_i g_i|``, the first-order change of the loss when the entry is zeroed (the
  "weight x gradient" / SNIP score), from the same pass.
* ``magnitude``: ``|w|``, no data at all (the classic pruning score; a baseline).

The samples are the Fisher's own draw (same ``seed``, same ``num_samples``), so scores of one run compare
entry by entry with its Fisher.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ..data.collate import collator_for
from .fisher import (
    ParamSelector,
    _batch_size,
    _forward_logits,
    _FrozenForMeasurement,
    _make_loader,
    _raise_on_non_finite,
    _to_device,
    _truncate,
    estimate_fisher,
    scored_parameters,
)
from .losses import TaskType, empirical_nll, infer_task_type

logger = logging.getLogger(__name__)

IMPORTANCES = ("fisher", "gradient", "taylor", "magnitude")
NEEDS_DATA = {"fisher": True, "gradient": True, "taylor": True, "magnitude": False}


def mean_gradient(
    model: nn.Module,
    data,
    num_samples: int = 1024,
    batch_size: int = 16,
    *,
    params: ParamSelector = None,
    collate_fn: Callable | None = None,
    task_type: str | TaskType | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The gradient of the mean per-sample loss (true labels) over ``num_samples`` samples of ``data``, per scored
    parameter, float32. Dropout is off and the model's mode and ``requires_grad`` flags come back as they were;
    the model's own ``.grad`` buffers are left untouched."""
    scored = scored_parameters(model, params)
    task = TaskType(task_type) if task_type is not None else infer_task_type(model)
    loader, target = _make_loader(data, num_samples, batch_size, collate_fn or collator_for(model), seed)
    device = next(iter(scored.values())).device
    totals = {n: torch.zeros(p.shape, dtype=torch.float32 if p.element_size() < 8 else p.dtype, device=p.device)
              for n, p in scored.items()}
    names, tensors = list(scored), list(scored.values())
    seen = 0
    with _FrozenForMeasurement(model):
        for param in tensors:
            param.requires_grad_(True)
        for batch in loader:
            if target and seen >= target:
                break
            batch = _to_device(batch, device)
            if target and seen + _batch_size(batch) > target:
                batch = _truncate(batch, target - seen)
            losses = empirical_nll(task, _forward_logits(model, batch, task, autocast_dtype), batch)
            if not torch.isfinite(losses).all():
                raise FloatingPointError(f"A non-finite loss in the samples {seen}..{seen + len(losses) - 1}: the "
                                         "model or the data holds inf/NaN; the gradient scores cannot be measured.")
            grads = torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    totals[name].add_(grad.to(totals[name].dtype))
            seen += _batch_size(batch)
    if seen == 0:
        raise ValueError("The data produced no batch to measure the gradient on.")
    gradient = {n: t.div_(seen) for n, t in totals.items()}
    _raise_on_non_finite(gradient)
    return gradient


def importance_scores(
    model: nn.Module,
    data,
    kind: str = "fisher",
    num_samples: int = 1024,
    batch_size: int = 16,
    *,
    params: ParamSelector = None,
    collate_fn: Callable | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    fisher_mode: str = "empirical",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-entry importance of the scored parameters by ``kind`` (see :data:`IMPORTANCES`); higher is more
    important. ``fisher`` is :func:`estimate_fisher` (``fisher_mode``), the FISH Mask reference."""
    if kind not in IMPORTANCES:
        raise ValueError(f"Unknown importance {kind!r}: use one of {', '.join(IMPORTANCES)}.")
    if kind == "fisher":
        return estimate_fisher(model, data, num_samples=num_samples, mode=fisher_mode, batch_size=batch_size,
                               params=params, collate_fn=collate_fn, seed=seed, autocast_dtype=autocast_dtype,
                               progress=progress)
    scored = scored_parameters(model, params)
    if kind == "magnitude":
        return {n: p.detach().abs().float() for n, p in scored.items()}
    gradient = mean_gradient(model, data, num_samples, batch_size, params=list(scored), collate_fn=collate_fn,
                             seed=seed, autocast_dtype=autocast_dtype)
    if kind == "taylor":
        return {n: g.mul_(scored[n].detach().to(g.dtype)).abs_() for n, g in gradient.items()}
    return {n: g.abs_() for n, g in gradient.items()}

