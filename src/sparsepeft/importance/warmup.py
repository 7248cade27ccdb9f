"""A short dense warm-up of the adapter before its Fisher is measured, undone afterwards.

LoRA initialises B = 0 (and bottleneck adapters their up projection), so at initialisation every
gradient of A is exactly zero: a Fisher measured there cannot rank A's entries at all. A few dense
steps make B non-zero; the Fisher is measured there, and the adapter is then put back to its initial
values, so the masked run starts where the vanilla method starts and trains only the budgeted entries.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.collate import collator_for
from .fisher import _forward_logits, _to_device
from .losses import TaskType, empirical_nll, infer_task_type


@contextmanager
def dense_warmup(
    model: nn.Module,
    data,
    params: Mapping[str, nn.Parameter],
    steps: int = 30,
    lr: float = 1e-3,
    batch_size: int = 16,
    collate_fn: Callable | None = None,
    seed: int = 0,
    task_type: str | TaskType | None = None,
) -> Iterator[dict[str, float]]:
    """Inside the block, ``params`` have been trained densely for ``steps`` AdamW steps; on exit they
    (and the model's train/eval mode and ``requires_grad`` flags) are exactly as before. Yields a small
    report (first and last warm-up loss)."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    report: dict[str, float] = {"steps": steps}
    try:
        if steps > 0:
            report.update(_train(model, data, params, steps, lr, batch_size, collate_fn, seed, task_type))
        yield report
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])
                param.grad = None
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


def _train(model, data, params, steps, lr, batch_size, collate_fn, seed, task_type) -> dict[str, float]:
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = list(params.values())
    for param in trainable:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses = train_steps(model, data, optimizer, steps, batch_size, collate_fn, seed, task_type, what="warm-up")
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def train_steps(model: nn.Module, data, optimizer, steps: int, batch_size: int, collate_fn: Callable | None = None,
                seed: int = 0, task_type: str | TaskType | None = None, what: str = "training") -> list[float]:
    """``steps`` optimizer steps on seeded shuffled batches of ``data`` (train mode); returns the losses.

    The short trainings sparsepeft runs for itself (the adapter warm-up, IRD's probe) share this loop,
    so a given seed gives every caller the same batches.
    """
    task = TaskType(task_type) if task_type is not None else infer_task_type(model)
    collate_fn = collate_fn or collator_for(model)
    generator = torch.Generator().manual_seed(seed)
    device = next(p for group in optimizer.param_groups for p in group["params"]).device
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for batch in DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate_fn):
            batch = _to_device(batch, device)
            loss = empirical_nll(task, _forward_logits(model, batch, task), batch).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"The {what} loss became {float(loss)} at step {len(losses)}: lower its "
                                         "learning rate.")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if len(losses) >= steps:
                break
    return losses
