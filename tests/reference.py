"""Slow, obviously-correct references the fast paths are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(model, example: dict, task: str) -> list[torch.Tensor]:
    """The loss terms of one unpadded sample, computed as a user would with a batch of one."""
    inputs = {k: torch.tensor([v]) for k, v in example.items() if k != "labels"}
    logits = model(**inputs).logits
    if task == "lm":
        labels = torch.tensor([example["labels"]])
        return [F.cross_entropy(logits[0, :-1], labels[0, 1:])]
    if task == "regression":
        return [0.5 * (logits.reshape(-1)[0] - example["labels"]) ** 2]
    return [F.cross_entropy(logits, torch.tensor([example["labels"]]))]


def loop_fisher(model, examples, task: str = "classification", mode: str = "empirical") -> dict[str, torch.Tensor]:
    """Batch-size-1 Fisher: one forward and backward per sample (and per class for 'expected')."""
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    totals = {n: torch.zeros_like(p) for n, p in params}
    for example in examples:
        if mode == "expected" and task == "classification":
            inputs = {k: torch.tensor([v]) for k, v in example.items() if k != "labels"}
            log_probs = F.log_softmax(model(**inputs).logits, -1)[0]
            terms = [(float(log_probs[c].detach().exp()), -log_probs[c]) for c in range(log_probs.numel())]
        else:
            terms = [(1.0, t) for t in per_sample_loss(model, example, task)]
        for j, (weight, term) in enumerate(terms):
            grads = torch.autograd.grad(term, [p for _, p in params], allow_unused=True, retain_graph=j < len(terms) - 1)
            for (n, _), g in zip(params, grads):
                if g is not None:
                    totals[n] += weight * (g.abs() if mode == "absolute" else g**2)
    return {n: t / len(examples) for n, t in totals.items()}


def relative_error(fast: dict, slow: dict) -> float:
    """Worst per-tensor error, relative to the tensor's norm (floored at 1e-9 of the largest norm,
    since e.g. attention key biases have a true gradient of zero up to rounding)."""
    scale = max(float(t.norm()) for t in slow.values())
    return max(float((fast[n] - slow[n]).norm()) / max(float(slow[n].norm()), 1e-9 * scale) for n in slow)
