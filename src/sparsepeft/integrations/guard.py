"""Stop a run at its first non-finite gradient, before the optimizer writes NaN/inf into the weights.

Trainer logs a NaN loss as the running average (``logging_nan_inf_filter``) and steps on: a diverged run then
exits 0 and saves NaN weights, deltas and a results.json with a NaN validation loss beside a plausible
accuracy. This callback checks the gradients the optimizer is about to apply (one device sync per step) and
raises :class:`NonFiniteTrainingError` naming the step, so nothing non-finite is written. Under ``--fp16`` the
loss scaler skips overflowing steps by design; there the weights are checked after each step instead.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..engines.dense_mask import unwrap_optimizer


class NonFiniteTrainingError(FloatingPointError):
    """Training produced NaN/inf gradients or weights."""


def _trained(optimizer) -> list[torch.Tensor]:
    inner = unwrap_optimizer(optimizer)
    return [p for group in inner.param_groups for p in group["params"]]


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One sync for all tensors: each one's largest magnitude (no overflow, unlike a 2-norm) is finite iff every
    entry is; no tensor-sized temporary."""
    if not tensors:
        return True
    peaks = [torch.linalg.vector_norm(t, float("inf")).to(tensors[0].device) for t in tensors]
    return bool(torch.isfinite(torch.stack(peaks)).all())


class NonFiniteGuard(TrainerCallback):
    def _fail(self, step: int, what: str) -> None:
        raise NonFiniteTrainingError(
            f"Training stopped at step {step}: the {what} are NaN/inf, so nothing from this step on is saved. "
            "Usual causes: a learning rate too high for the method (lower --learning-rate), no gradient clipping "
            "(--max-grad-norm 1.0), or fp16 overflow (train with --bf16 or in fp32).")

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None or args.fp16:
            return
        grads = [p.grad for p in _trained(optimizer) if p.grad is not None]
        if not _all_finite(grads):
            self._fail(state.global_step + 1, "gradients")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and args.fp16 and not _all_finite([p.detach() for p in _trained(optimizer)]):
            self._fail(state.global_step + 1, "weights after the optimizer step")
