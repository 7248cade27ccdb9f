"""Response suppression: how much the loss grows when some blocks' PEFT outputs are scaled down.

IST's layer importance probe multiplies the output of the PEFT modules of chosen blocks by a factor
(0.25) and reads the loss. "The PEFT output" is what the method adds to the frozen layer, whatever the
method, so it is scaled by the rule of each kind of module:
- bottleneck adapters: their ``scaling`` attribute multiplies exactly their output;
- plain LoRA (and rsLoRA, PiSSA): PEFT's ``scaling[adapter]`` multiplies exactly ``B A x``;
- every other PEFT tuner layer (DoRA, whose magnitude term is not under ``scaling``; IA3, LoHa, ...):
  a forward hook returns ``base(x) + factor * (layer(x) - base(x))``, one extra base-layer forward in the
  probe only.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from ..adapters.layer import BottleneckAdapter


def suppressible_modules(block: nn.Module) -> list[nn.Module]:
    """The modules inside ``block`` whose output is the PEFT method's contribution."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in block.modules() if isinstance(m, (BottleneckAdapter, BaseTunerLayer))]


def _is_plain_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return False
    active = module.active_adapters
    return all(not module.use_dora.get(name, False) for name in active) and all(name in module.scaling for name in active)


class _ScaleDelta:
    """Forward hook: keep the base layer's output, scale what the tuner adds to it."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, module, args, kwargs, output):
        base = module.get_base_layer()(*args, **kwargs)
        return base + self.factor * (output - base)


@contextlib.contextmanager
def suppress(modules: Iterable[nn.Module], factor: float) -> Iterator[None]:
    """Scale the PEFT output of ``modules`` by ``factor`` inside the block; everything is restored on exit."""
    restore = []
    try:
        for module in modules:
            if isinstance(module, BottleneckAdapter):
                restore.append((module, "scaling", module.scaling))
                module.scaling = module.scaling * factor
            elif _is_plain_lora(module):
                for name in module.active_adapters:
                    restore.append((module.scaling, name, module.scaling[name]))
                    module.scaling[name] = module.scaling[name] * factor
            else:
                restore.append((module.register_forward_hook(_ScaleDelta(factor), with_kwargs=True), None, None))
        yield
    finally:
        for owner, key, value in reversed(restore):
            if key is None:
                owner.remove()
            elif isinstance(owner, dict):
                owner[key] = value
            else:
                setattr(owner, key, value)


def label_weight(batch: dict) -> float:
    """What the model's mean loss averages over: label tokens after the causal shift for sequence labels
    (``labels[:, 1:] != -100``), samples for one label per sample."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("The probe batch gave no loss: IST's probe needs labels in its batches "
                         "(pass probe data whose examples have 'labels').")
    if labels.dim() >= 2:
        return float((labels[:, 1:] != -100).sum())
    return float(labels.shape[0])


def _chunks(batch: dict, size: int | None) -> list[dict]:
    rows = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    if size is None or size >= rows:
        return [batch]
    return [{k: v[start:start + size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            for start in range(0, rows, size)]


@torch.no_grad()
def suppressed_loss(model: nn.Module, batch: dict, modules: Iterable[nn.Module], factor: float,
                    chunk_size: int | None = None) -> float:
    """The model's loss on ``batch`` (eval mode, no gradient) with ``modules`` suppressed.

    With ``chunk_size`` the batch is evaluated a chunk at a time and the chunks' mean losses are combined
    with their label-token counts as weights: the loss of one pass over the whole batch (up to float
    summation order), with the activation memory of a chunk."""
    modes = [(module, module.training) for module in model.modules()]  # per module: wrappers may disagree
    model.eval()
    total = weight = 0.0
    try:
        with suppress(modules, factor):
            for chunk in _chunks(batch, chunk_size):
                share = label_weight(chunk) if chunk_size is not None else 1.0
                if share == 0:
                    continue  # a chunk with no label token adds nothing (its mean loss is undefined)
                output = model(**chunk)
                loss = output["loss"] if isinstance(output, dict) else getattr(output, "loss", None)
                if loss is None:
                    raise ValueError("The probe batch gave no loss: IST's probe needs labels in its batches "
                                     "(pass probe data whose examples have 'labels').")
                total += share * float(loss)
                weight += share
    finally:
        for module, training in modes:
            module.training = training
    value = total / weight if weight else float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise FloatingPointError(f"The suppression probe's loss is {value}: the model diverged; lower the learning "
                                 "rate (the scores were left unchanged).")
    return value
