"""Dense-mask training: the reference FISH engine, made exact.

The reference multiplies ``.grad`` by the mask after backward — which leaves masked weights moving under
decoupled weight decay, and multiplies ``inf * 0 = nan`` under fp16 overflow. Here:

* each partly-trained tensor gets a gradient hook that keeps only the trained entries *as the gradient
  is produced*, before it is accumulated, all-reduced (DDP) or clipped — so clipping sees the masked
  gradient norm and momentum never sees a frozen entry. A tensor with at most 7/8 of its entries frozen
  (FISH-Tuning's LoRA factors) is masked by one multiplication by 0/1: there a non-finite gradient at a
  frozen entry becomes NaN, which a fp16 GradScaler treats as the overflow it is (the step is skipped);
  sparser tensors (FISH Mask's) are masked through their indices, which drops it;
* tensors with no trained entry are frozen outright (``requires_grad=False``): no weight gradient is
  computed for them at all, which is where the speed comes from;
* weight decay is taken out of the optimizer for the step and applied to the trained entries only
  (decoupled for AdamW-style optimizers, as an L2 gradient term for the others);
* for optimizers whose update is zero for a zero gradient with zero state (SGD, Adam(W), ...), that
  makes frozen entries bit-identical. Any other optimizer gets a "restore" guard that writes the frozen
  values back after every step (exact for anything, at the cost of one copy of the partly-trained
  tensors).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..selection.mask import SparseMask
from ..utils.distributed import assert_same_on_all_ranks, is_distributed, refuse_sharded_model

ZERO_UPDATE_SAFE = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
)


ATTACHED_FLAG = "_sparsepeft_engine"  # set on a model while an engine is attached to it


def refuse_second_engine(model: nn.Module) -> None:
    """One engine per model: a second would re-mask (or re-split) weights the first already manages."""
    attached = getattr(model, ATTACHED_FLAG, None)
    if attached is not None:
        raise RuntimeError(f"A {attached} is already attached to this model: call its detach() (or let the "
                           "callback finish training) before attaching another engine.")


def follow_replaced_parameters(model: nn.Module, params: dict, weight_hooks: dict, hook) -> None:
    """Re-hook weights that ``model.to()`` replaced by new Parameter objects (a move to or from the meta device
    does; a device or dtype move keeps them): hooks and ``requires_grad`` live on the object. ``params`` (name ->
    parameter) is updated in place; ``hook(name, parameter)`` registers a weight's hook again and returns it."""
    current = dict(model.named_parameters())
    for name, param in list(params.items()):
        fresh = current.get(name)
        if fresh is None or fresh is param:
            continue
        params[name] = fresh
        fresh.requires_grad_(param.requires_grad)
        if name in weight_hooks:
            weight_hooks.pop(name).remove()
            weight_hooks[name] = hook(name, fresh)


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """accelerate's ``AcceleratedOptimizer`` (and similar wrappers) hold the real one in ``.optimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class FollowingIndex:
    """A mask's selected entries of one tensor that follow the tensor they index: moved to its device when it moves
    (once, then kept there), so an engine attached before ``model.to(device)`` indexes on the right device. The
    CPU copy stays the source, so even a round trip through the meta device loses nothing.

    The entries are flat int64 indices, or a flat boolean mask (``is_mask``) for a tensor with an eighth or more of
    its entries trained (a PEFT module's masked factors), where the mask is no larger than the indices. The hook
    keeps the gradient's trained entries with one multiplication by a 0/1 copy of the mask in the gradient's dtype
    (``multiplier``, one tensor-sized copy on the gradient's device: 4 bytes an entry in float32), where indices
    take a zero fill, a gather and a scatter — per step and per tensor, which is what a model with hundreds of
    small LoRA tensors pays. That copy is the form's memory cost: at most the size of the weight it masks."""

    def __init__(self, source: torch.Tensor, device: torch.device | str = "cpu"):
        self.source = source
        self.is_mask = source.dtype == torch.bool
        # a boolean mask reaches the device only if decay or the restore guard asks (the hook uses ``multiplier``)
        self._on_device = source if self.is_mask else source.to(device)
        self._multiplier: torch.Tensor | None = None

    @classmethod
    def for_entries(cls, indices: torch.Tensor, numel: int, device: torch.device | str = "cpu") -> "FollowingIndex":
        """The cheaper form for ``indices`` of a tensor of ``numel`` entries: a boolean mask (1 byte per entry)
        when it costs no more than the indices (8 bytes per selected entry)."""
        if numel <= 8 * indices.numel():
            dense = torch.zeros(numel, dtype=torch.bool)
            dense[indices] = True
            return cls(dense, device)
        return cls(indices, device)

    def on(self, device: torch.device) -> torch.Tensor:
        if self._on_device.device != device:
            self._on_device = self.source.to(device)
        return self._on_device

    def multiplier(self, like: torch.Tensor) -> torch.Tensor:
        """The boolean mask as 0/1 in ``like``'s dtype and device (kept until either changes)."""
        held = self._multiplier
        if held is None or held.device != like.device or held.dtype != like.dtype:
            held = self._multiplier = self.source.to(device=like.device, dtype=like.dtype)
        return held


def _keep_entries(index: FollowingIndex):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if index.is_mask:  # x * 1 is x and a finite x * 0 is a zero; a non-finite gradient at a frozen entry
            return grad * index.multiplier(grad).view(grad.shape)  # turns NaN (see DenseMaskEngine)
        flat = grad.reshape(-1)
        idx = index.on(flat.device)
        masked = torch.zeros_like(flat)
        masked[idx] = flat[idx]
        return masked.view_as(grad)

    return hook


def _is_decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


class DenseMaskEngine:
    """Train only a mask's entries of ``model``, in any loop.

    Plain PyTorch::

        engine = DenseMaskEngine(model, mask).attach()
        optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-4, weight_decay=0.01)
        engine.attach_optimizer(optimizer)
        ...  # usual loop: backward, clip_grad_norm_, optimizer.step()
        engine.detach()

    Parameters outside the mask's candidates are frozen: the mask defines the whole trainable set.
    """

    def __init__(self, model: nn.Module, mask: SparseMask, guard: str = "auto"):
        if guard not in ("auto", "restore"):
            raise ValueError("guard must be 'auto' (exact through zero updates, restore if unknown) or 'restore'.")
        refuse_second_engine(model)
        mask.check_compatible(model)
        self.model = model
        self.mask = mask
        self.guard = guard
        self._params = dict(model.named_parameters())
        self.partial: dict[str, FollowingIndex] = {}
        self._handles: list = []
        self._weight_hooks: dict = {}
        self._saved_flags: dict[str, bool] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._frozen_copies: dict[str, torch.Tensor] = {}
        self._paused_decay: list[tuple[dict, float]] = []
        self._names_by_id: dict[int, str] = {}

    # ------------------------------------------------------------------ model
    def attach(self) -> "DenseMaskEngine":
        if self._saved_flags is not None:
            raise RuntimeError("This DenseMaskEngine is already attached.")
        refuse_sharded_model(self.model)
        refuse_second_engine(self.model)
        if is_distributed():  # DDP all-reduces the masked gradients as they are; every rank must mask alike
            assert_same_on_all_ranks(self.mask.digest(), "the mask")
        self._saved_flags = {n: p.requires_grad for n, p in self._params.items()}
        setattr(self.model, ATTACHED_FLAG, type(self).__name__)
        for name, param in self._params.items():
            kept = self.mask.kept(name) if name in self.mask.shapes else 0
            if kept == 0:
                param.requires_grad_(False)
            elif not self.mask.is_full(name):
                param.requires_grad_(True)
                index = FollowingIndex.for_entries(self.mask.indices[name], param.numel(), param.device)
                self.partial[name] = index
                self._weight_hooks[name] = param.register_hook(_keep_entries(index))
            else:
                param.requires_grad_(True)
        return self

    def _follow_model(self) -> None:
        follow_replaced_parameters(self.model, self._params, self._weight_hooks,
                                   lambda name, fresh: fresh.register_hook(_keep_entries(self.partial[name])))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        self._follow_model()
        return (p for n, p in self._params.items() if self.mask.kept(n) > 0 and n in self.mask.shapes)

    @property
    def num_trainable(self) -> int:
        return self.mask.num_selected

    def trainable_state_bytes(self) -> int:
        """Bytes of the tensors the optimizer updates: whole tensors, even if one entry is selected."""
        return sum(p.numel() * p.element_size() for p in self._params.values() if p.requires_grad)

    # ------------------------------------------------------------------ optimizer
    def attach_optimizer(self, optimizer) -> "DenseMaskEngine":
        self._follow_model()
        optimizer = unwrap_optimizer(optimizer)
        self._optimizer = optimizer
        self._names_by_id = {id(p): n for n, p in self._params.items()}
        self._clear_frozen_state(optimizer)
        if self.guard == "restore" or not isinstance(optimizer, ZERO_UPDATE_SAFE):
            self._frozen_copies = {n: self._params[n].detach().clone() for n in self.partial}
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        return self

    def _clear_frozen_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Momentum gathered before the mask was attached must not move frozen entries."""
        by_id = {id(p): n for n, p in self._params.items() if n in self.partial}
        for param, state in optimizer.state.items():
            name = by_id.get(id(param))
            if name is None:
                continue
            keep = self.mask.dense(name, device=param.device)
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.mul_(keep)

    def _before_step(self, optimizer, args, kwargs) -> None:
        by_id = self._names_by_id
        for group in optimizer.param_groups:
            decay = group.get("weight_decay", 0.0)
            if not decay:
                continue
            lr = float(group["lr"])
            decoupled = _is_decoupled(optimizer, group)
            for param in group["params"]:
                if param.grad is None:
                    continue
                index = self.partial.get(by_id.get(id(param)))
                _apply_decay(param, None if index is None else index.on(param.device), lr, decay, decoupled)
            self._paused_decay.append((group, decay))
            group["weight_decay"] = 0.0

    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, decay in self._paused_decay:
            group["weight_decay"] = decay
        self._paused_decay.clear()
        for name, frozen in self._frozen_copies.items():
            param = self._params[name]
            entries = self.partial[name]
            index = entries.on(param.device)
            with torch.no_grad():
                if entries.is_mask:
                    param.view(-1).copy_(torch.where(index, param.view(-1), frozen.view(-1)))
                    continue
                trained = param.reshape(-1)[index].clone()
                param.copy_(frozen)
                param.view(-1)[index] = trained

    # ------------------------------------------------------------------ teardown
    def detach(self) -> None:
        for handle in [*self._handles, *self._weight_hooks.values()]:
            handle.remove()
        self._handles.clear()
        self._weight_hooks.clear()
        if self._saved_flags is not None:
            for name, flag in self._saved_flags.items():
                self._params[name].requires_grad_(flag)
        self._saved_flags = None
        self.partial.clear()
        self._frozen_copies.clear()
        if getattr(self.model, ATTACHED_FLAG, None) == type(self).__name__:
            delattr(self.model, ATTACHED_FLAG)

    def __enter__(self) -> "DenseMaskEngine":
        return self.attach() if self._saved_flags is None else self

    def __exit__(self, *exc) -> None:
        self.detach()


@torch.no_grad()
def _apply_decay(param: torch.Tensor, index: torch.Tensor | None, lr: float, decay: float, decoupled: bool) -> None:
    """Weight decay on the trained entries only (``index``: flat indices or a flat boolean mask; None: every
    entry), in the optimizer's own form and the same arithmetic either way."""
    flat = param.view(-1)
    if decoupled:
        if index is None:
            param.mul_(1 - lr * decay)
        elif index.dtype == torch.bool:
            flat.copy_(torch.where(index, flat * (1 - lr * decay), flat))
        else:
            flat[index] = flat[index] * (1 - lr * decay)
    elif index is None:
        param.grad.add_(param, alpha=decay)
    elif index.dtype == torch.bool:
        param.grad.view(-1).add_(decay * torch.where(index, flat, 0))
    else:
        param.grad.view(-1)[index] += decay * flat[index]
