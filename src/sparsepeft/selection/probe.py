"""IRD's ``probe`` criterion: held-out loss after a few masked training steps, then everything undone."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..data.collate import collator_for
from ..importance.fisher import _forward_logits, _to_device
from ..importance.losses import empirical_nll, infer_task_type
from ..importance.warmup import train_steps
from .mask import SparseMask


def probe_loss(model, data, mask: SparseMask, held_out, config, collate_fn=None) -> float:
    """Mean held-out loss after ``config.probe_steps`` AdamW steps on ``mask``'s entries.

    Every candidate sees the same batches and the same dropout draws (both seeded; the caller's random
    state is left as it was) from the same starting weights, which are restored exactly afterwards, so
    the masks are compared on equal terms and the search is repeatable.
    """
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        return _probe_loss(model, data, mask, held_out, config, collate_fn)


def _probe_loss(model, data, mask: SparseMask, held_out, config, collate_fn) -> float:
    from ..engines import DenseMaskEngine

    task = infer_task_type(model)
    collate_fn = collate_fn or collator_for(model)
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in mask.shapes}
    was_training = model.training
    engine = DenseMaskEngine(model, mask).attach()
    try:
        optimizer = torch.optim.AdamW(list(engine.trainable_parameters()), lr=config.probe_lr, weight_decay=0.0)
        engine.attach_optimizer(optimizer)
        train_steps(model, data, optimizer, config.probe_steps, config.probe_batch_size, collate_fn, config.seed, task,
                    what="IRD probe")
        device = next(iter(saved.values())).device
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in DataLoader(held_out, batch_size=config.probe_batch_size, collate_fn=collate_fn):
                batch = _to_device(batch, device)
                losses = empirical_nll(task, _forward_logits(model, batch, task), batch)
                total += float(losses.sum())
                count += losses.numel()
        return total / max(count, 1)
    finally:
        engine.detach()
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
                params[name].grad = None
        model.train(was_training)
