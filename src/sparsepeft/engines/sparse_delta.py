"""Sparse-delta training: trainable state and optimizer state proportional to the mask, not the model.

Per partly-trained tensor ``W`` the trainable state is a value vector of its selected entries
(registered on ``W``'s own module as ``<name>_sparse_values``, so Trainer's weight-decay grouping treats
it exactly like ``W``) and their flat indices (a buffer, ``<name>_sparse_index``). ``W``'s storage
always holds the current weights, so the forward pass is the model's own — no extra copy, no sparse
kernels. In backward, ``W``'s dense gradient exists only until its layer's gradient is accumulated: a
hook gathers the selected entries into the value vector's ``.grad`` and frees it. The optimizer sees
only the value vectors (and whole-trained tensors such as the head), so AdamW's two moments cost
``2k`` numbers instead of two copies of the model; after each step the values are written into ``W``.

AdamW on the value vector is the same arithmetic as the dense-mask engine on those entries, so both
engines end at the same weights (see the tests).

Under DDP the partly-trained dense weights and their value vectors are kept out of DDP's buckets (a
dense all-reduce would cost what the engine saves, and the value vectors are not used in the forward
pass, which DDP would report as unused). Instead, at the end of every backward the engine all-reduces
the value vectors' new gradient contributions — k numbers per tensor — and averages them, so clipping
and the optimizer see the same gradients on every rank. Attach before the model is wrapped (Trainer
does this for you through the callback).
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import nn

from ..selection.mask import SparseMask, model_fingerprint
from ..utils.distributed import (
    all_reduce_sum_,
    assert_same_on_all_ranks,
    is_distributed,
    refuse_sharded_model,
    world_size,
)
from .delta import (
    _DENSE,
    DeltaMismatchError,
    _check_entries,
    dense_tensor_names,
    fully_trained,
    mask_frozen_hash,
    read_delta,
    save_delta,
    sparse_entries,
)
from .dense_mask import ATTACHED_FLAG, follow_replaced_parameters, refuse_second_engine, unwrap_optimizer

VALUES_SUFFIX = "_sparse_values"
INDEX_SUFFIX = "_sparse_index"


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attr


class _PartlyTrained:
    """A partly-trained weight, its value vector and its index, looked up on their module at each use:
    ``model.to()`` replaces buffers (and may replace parameters), so no tensor is held here."""

    def __init__(self, module: nn.Module, attr: str):
        self.module, self.attr = module, attr

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def values(self) -> nn.Parameter:
        return getattr(self.module, self.attr + VALUES_SUFFIX)

    @property
    def index(self) -> torch.Tensor:
        return getattr(self.module, self.attr + INDEX_SUFFIX)


class SparseDeltaEngine:
    """Train a mask's entries with O(k) trainable and optimizer state.

    Plain PyTorch::

        engine = SparseDeltaEngine(model, mask).attach()          # on the *base* model
        optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-3, weight_decay=0.01)
        engine.attach_optimizer(optimizer)
        ...                                                        # usual loop
        engine.save_delta("delta.safetensors")                     # k indices + k values
        engine.detach()                                            # model is now the plain fine-tuned model
    """

    def __init__(self, model: nn.Module, mask: SparseMask):
        refuse_second_engine(model)
        mask.check_compatible(model)
        self.model = model
        self.mask = mask
        self._params = dict(model.named_parameters())
        self.partial: dict[str, _PartlyTrained] = {}
        self._handles: list = []
        self._weight_hooks: dict = {}
        self._saved_flags: dict[str, bool] | None = None
        self.base_hash: str | None = None
        self.base_fingerprint: str | None = None
        self._distributed = False
        self._reduced: dict[int, torch.Tensor] = {}  # id(values) -> gradient already averaged over ranks
        self._reduction_queued = False
        self.grad_observer = None  # called as observer(name, dense_grad) before a partly-trained weight's gradient
        # is dropped (re-selection scores candidates from it); None: nothing looks at it

    # ------------------------------------------------------------------ model
    def attach(self) -> "SparseDeltaEngine":
        if self._saved_flags is not None:
            raise RuntimeError("This SparseDeltaEngine is already attached.")
        refuse_sharded_model(self.model)
        refuse_second_engine(self.model)
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            raise RuntimeError("Attach the sparse engine to the model before wrapping it in DistributedDataParallel "
                               "(pass the unwrapped model; with Trainer, use SparseMaskCallback).")
        self._distributed = is_distributed()
        if self._distributed:
            assert_same_on_all_ranks(self.mask.digest(), "the mask")
        self.base_fingerprint = model_fingerprint(self.model)
        self._saved_flags = {n: p.requires_grad for n, p in self._params.items()}
        setattr(self.model, ATTACHED_FLAG, type(self).__name__)
        for name, param in self._params.items():
            kept = self.mask.kept(name) if name in self.mask.shapes else 0
            if kept == 0:
                param.requires_grad_(False)
            elif self.mask.is_full(name):
                param.requires_grad_(True)
            else:
                self._split(name, param)
        if self._distributed:
            self._keep_out_of_ddp()
        return self

    def _keep_out_of_ddp(self) -> None:
        names = []
        for name in self.partial:
            module_path, _, attr = name.rpartition(".")
            prefix = f"{module_path}." if module_path else ""
            names += [name, f"{prefix}{attr}{VALUES_SUFFIX}", f"{prefix}{attr}{INDEX_SUFFIX}"]
        previous = list(getattr(self.model, "_ddp_params_and_buffers_to_ignore", []))
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, previous + names)

    def _split(self, name: str, param: nn.Parameter) -> None:
        module, attr = _owner(self.model, name)
        index = self.mask.indices[name].to(param.device)
        values = nn.Parameter(param.detach().reshape(-1)[index].clone())
        module.register_parameter(attr + VALUES_SUFFIX, values)
        module.register_buffer(attr + INDEX_SUFFIX, index)
        param.requires_grad_(True)  # its dense gradient is still computed, and dropped right away
        self._weight_hooks[name] = param.register_post_accumulate_grad_hook(self._gather_into(name, module, attr))
        self.partial[name] = _PartlyTrained(module, attr)

    def _follow_model(self) -> None:
        def rehook(name: str, fresh: nn.Parameter):
            part = self.partial[name]
            return fresh.register_post_accumulate_grad_hook(self._gather_into(name, part.module, part.attr))

        follow_replaced_parameters(self.model, self._params, self._weight_hooks, rehook)

    def _gather_into(self, name: str, module: nn.Module, attr: str):
        """The hook reads the value vector and its index from the module at every call, so the engine
        follows ``model.to(device or dtype)`` (which replaces buffers) and ``load_state_dict``."""
        def hook(param: torch.Tensor) -> None:
            values, index = getattr(module, attr + VALUES_SUFFIX), getattr(module, attr + INDEX_SUFFIX)
            selected = param.grad.reshape(-1)[index].to(values.dtype)
            if self.grad_observer is not None:
                self.grad_observer(name, param.grad)
            if values.grad is None:
                values.grad = selected
                self._reduced.pop(id(values), None)  # a fresh accumulation: nothing averaged yet
            else:
                values.grad.add_(selected)  # gradient accumulation
            param.grad = None
            if self._distributed and not self._reduction_queued:
                self._reduction_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._average_over_ranks)

        return hook

    @torch.no_grad()
    def _average_over_ranks(self) -> None:
        """End of backward: average this backward's contributions to the value gradients over the ranks."""
        self._reduction_queued = False
        vectors = [part.values for part in self.partial.values()]
        for values in vectors:
            if values.grad is None:
                values.grad = torch.zeros_like(values)  # every rank must send the same message
        done = [self._reduced.get(id(values)) for values in vectors]
        fresh = [v.grad if d is None else v.grad - d for v, d in zip(vectors, done)]
        all_reduce_sum_(fresh)  # in place; ``fresh`` may be the gradient itself
        for values, increment, averaged in zip(vectors, fresh, done):
            increment.div_(world_size())
            if averaged is not None:
                values.grad.copy_(averaged.add_(increment))
            self._reduced[id(values)] = values.grad.clone()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        self._follow_model()
        for name, param in self._params.items():
            if name in self.partial:
                yield self.partial[name].values
            elif name in self.mask.shapes and self.mask.kept(name) and self.mask.is_full(name):
                yield param

    # ------------------------------------------------------------------ optimizer
    def attach_optimizer(self, optimizer) -> "SparseDeltaEngine":
        self._follow_model()
        inner = unwrap_optimizer(optimizer)
        in_optimizer = {id(p) for group in inner.param_groups for p in group["params"]}
        missing = [n for n, part in self.partial.items() if id(part.values) not in in_optimizer]
        if missing:
            raise RuntimeError(
                f"The optimizer does not hold the sparse value vectors (e.g. of {missing[0]}): build it after "
                "attaching the engine (with Trainer: pass the callback to Trainer(callbacks=[...]))."
            )
        self._handles.append(inner.register_step_post_hook(self._write_back))
        return self

    @torch.no_grad()
    def _write_back(self, optimizer=None, args=None, kwargs=None) -> None:
        for part in self.partial.values():
            self._write_part(part)

    @staticmethod
    def _write_part(part: _PartlyTrained) -> None:
        part.weight.view(-1)[part.index] = part.values.to(part.weight.dtype)

    def _index_changed(self, name: str) -> None:
        """After a re-selection moved ``name``'s entries: the mask follows the index, and the frozen entries' hash
        (of other entries now) is taken again at the next save."""
        self.mask.indices[name] = self.partial[name].index.detach().to("cpu", copy=True)
        self.base_hash = None

    @torch.no_grad()
    def move_entries(self, name: str, slots: torch.Tensor, new_index: torch.Tensor,
                     restore: torch.Tensor) -> torch.Tensor:
        """Re-selection: the entries at ``slots`` of ``name``'s value vector leave the mask and ``new_index`` (flat
        indices outside it) join. A leaving entry's weight is set to ``restore`` (its value before training, so
        every entry outside the mask holds the base model's weight again); a joining entry starts from its
        current, untrained weight. The index is kept sorted (masks and deltas are stored that way), the mask
        follows it, and the permutation that sorted the slots is returned so that whoever holds per-entry state
        (the optimizer's moments, the base values) can apply it."""
        part = self.partial[name]
        weight, index, values = part.weight.view(-1), part.index, part.values
        self._write_part(part)
        weight[index[slots]] = restore.to(weight.dtype)
        index[slots] = new_index.to(index)
        values.data[slots] = weight[index[slots]].to(values.dtype)
        order = torch.argsort(index)
        index.copy_(index[order])
        values.data.copy_(values.data[order])
        self._index_changed(name)
        return order

    @torch.no_grad()
    def replace_index(self, name: str, new_index: torch.Tensor, restore: torch.Tensor) -> None:
        """Swap all of ``name``'s entries for ``new_index`` (as many, sorted): the current ones go back to
        ``restore`` (their values before training), the new ones start from their current weights. A re-selecting
        run uses it to load a checkpoint saved under an earlier mask (the best model at the end)."""
        part = self.partial[name]
        weight, index, values = part.weight.view(-1), part.index, part.values
        if new_index.numel() != index.numel():
            raise DeltaMismatchError(f"{name}: {new_index.numel()} entries do not fit a value vector of {index.numel()}.")
        self._write_part(part)
        weight[index] = restore.to(weight.dtype)
        index.copy_(new_index.to(index))
        values.data.copy_(weight[index].to(values.dtype))
        self._index_changed(name)

    # ------------------------------------------------------------------ accounting and saving
    def trainable_state_bytes(self) -> int:
        """Bytes of what is trained: value vectors, their indices, and whole-trained tensors."""
        total = sum(part.values.numel() * part.values.element_size() + part.index.numel() * part.index.element_size()
                    for part in self.partial.values())
        return total + sum(p.numel() * p.element_size() for n, p in self._params.items()
                           if n not in self.partial and p.requires_grad)

    def save_delta(self, path: str | os.PathLike) -> int:
        """Write the trained entries (atomic). The frozen entries' hash is taken at the first save, not at
        attach: they never change while the engine is attached, and a run that saves nothing never reads
        every weight."""
        self._write_back()
        if self.base_hash is None:
            self.base_hash = mask_frozen_hash(self._params.items(), self.mask)  # the plain model's
        return save_delta(self.model, self.mask, path, self.base_hash, self.base_fingerprint)

    @torch.no_grad()
    def load_delta(self, path: str | os.PathLike) -> None:
        """Put a delta this engine saved (a checkpoint's) back into the attached model: the weights' entries and
        the value vectors. Refused, before anything is written, if it was made from another base model, with
        another mask, or is damaged."""
        self._follow_model()
        header, tensors = read_delta(path)
        if header.get("fingerprint") != self.base_fingerprint:
            raise DeltaMismatchError(f"{path} was saved from a model with other parameter names or shapes.")
        whole, entries = dense_tensor_names(tensors), sparse_entries(tensors)
        _check_entries(tensors, whole, entries, self._params, path)
        same_mask = set(whole) == set(fully_trained(self.mask)) and set(entries) == set(self.partial) and all(
            torch.equal(index, self.mask.indices[name]) for name, (index, _) in entries.items())
        if not same_mask:
            raise DeltaMismatchError(f"{path} holds the entries of another mask than this run's: resume with the mask "
                                     "saved beside it (sparse_mask.safetensors).")
        if self.base_hash is None:
            self.base_hash = mask_frozen_hash(self._params.items(), self.mask)
        if header.get("base_hash") != self.base_hash:
            raise DeltaMismatchError(f"{path} was trained from another base checkpoint than this model (same "
                                     "architecture, other weights): load the base model the run started from.")
        for name in whole:
            self._params[name].copy_(tensors[name + _DENSE])
        for name, (_, values) in entries.items():
            part = self.partial[name]
            part.values.copy_(values.to(part.values.dtype))
        self._write_back()

    # ------------------------------------------------------------------ teardown
    def detach(self) -> nn.Module:
        """Remove the value vectors and hooks; the model is left as a plain model with trained weights."""
        self._write_back()
        for handle in [*self._handles, *self._weight_hooks.values()]:
            handle.remove()
        self._handles.clear()
        self._weight_hooks.clear()
        for name in self.partial:
            module, attr = _owner(self.model, name)
            delattr(module, attr + VALUES_SUFFIX)
            delattr(module, attr + INDEX_SUFFIX)
        self.partial.clear()
        if self._saved_flags is not None:
            for name, flag in self._saved_flags.items():
                self._params[name].requires_grad_(flag)
        self._saved_flags = None
        if getattr(self.model, ATTACHED_FLAG, None) == type(self).__name__:
            delattr(self.model, ATTACHED_FLAG)
        return self.model

    def __enter__(self) -> "SparseDeltaEngine":
        return self.attach() if self._saved_flags is None else self

    def __exit__(self, *exc) -> None:
        self.detach()


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held in an optimizer's state tensors (AdamW: both moments and the step counters); 0 for none."""
    if optimizer is None:  # nothing was trained (evaluation only)
        return 0
    inner = unwrap_optimizer(optimizer)
    return sum(v.numel() * v.element_size() for state in inner.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))
