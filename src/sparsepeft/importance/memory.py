"""Sizing the Fisher pass so that the mask phase needs no more memory than a training step.

Both phases hold the weights. Beyond them a training step holds its batch's activations (what autograd
saves for backward), and the Fisher pass holds its own batch's activations (the per-sample rules need each
layer's input, as a weight gradient does), a float32 accumulator the size of the scored parameters, and
one layer's per-sample work at a time. So the Fisher batch that keeps the mask phase within the training
step is::

    fisher_batch = (train_batch * a_train - accumulator - per_layer_work) / a_fisher

where ``a`` is the activation memory of one sample of the longest training examples, *measured* by counting
what autograd saves in one forward pass (exact on any device, no allocator statistics needed). Gradients and
optimizer state, which only training holds, are left out: the bound is conservative for every method.

When the accumulator alone is larger than a training batch's activations (a large model trained at a small
batch), the plan splits the scored parameters into groups measured one Fisher pass each
(:func:`sparsepeft.selection.grouped.grouped_fisher_mask`: the same mask, G passes): the groups are as large
as the room leaves at half the training batch, else at batch 1. Only when a single tensor's accumulator does
not fit (one group per tensor is the floor) does the plan say by how much the mask phase will exceed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..utils.io import release_free_memory

logger = logging.getLogger(__name__)


@dataclass
class FisherBatchPlan:
    batch_size: int
    train_batch_size: int
    train_activation_bytes_per_sample: int
    fisher_activation_bytes_per_sample: int
    accumulator_bytes: int
    per_layer_work_bytes: int  # the per-sample reduction's temporary (a block of rows of one weight)
    fits: bool  # False: even batch 1 exceeds the training step's activations by ``excess_bytes``
    excess_bytes: int = 0
    groups: list[list[str]] = field(default_factory=list)  # Fisher passes, one per group of scored tensors
    largest_group_bytes: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["groups"] = len(self.groups)  # the count; the names are the scored parameters in order
        return out


def saved_activation_bytes(model: nn.Module, batch: Mapping, autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes autograd saves for backward in one forward pass of ``batch`` (parameters not counted).

    Storages are counted once however many saved tensors view them; parameters are excluded because both
    phases hold the weights anyway."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameter_storages and tensor.device.type != "meta":
            seen[pointer] = storage.nbytes()
        return tensor

    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()  # dropout off, as in the Fisher pass; its masks would add a little in training
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            output = model(**inputs)
        del output
    finally:
        model.train(was_training)
    return sum(seen.values())


def _longest(examples: Sequence[Mapping], count: int) -> list[Mapping]:
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    return [examples[i] for i in order[:count]]


@contextlib.contextmanager
def _requires_grad(params: Mapping[str, nn.Parameter] | None):
    if params is None:
        yield
        return
    flags = {id(p): p.requires_grad for p in params.values()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params.values():
            p.requires_grad_(flags[id(p)])


def plan_fisher_batch(model: nn.Module, examples: Sequence[Mapping], collate_fn: Callable, train_batch_size: int,
                      scored: Mapping[str, nn.Parameter], *, train_autocast: torch.dtype | None = None,
                      fisher_autocast: torch.dtype | None = None) -> FisherBatchPlan:
    """The largest Fisher batch (at most the training batch) whose pass fits in a training step's memory.

    ``scored`` are the parameters the Fisher will score; ``model``'s current ``requires_grad`` flags are the
    training step's. One forward pass each is measured on the longest example; activations scale with the
    batch (per sample, at the longest length: an upper bound for shorter, padded batches)."""
    sample = collate_fn(_longest(examples, 1))  # one sample: the measurement costs 1/batch of a step
    count = 1
    with torch.enable_grad():
        train_bytes = saved_activation_bytes(model, sample, train_autocast) / count
        with _requires_grad(scored):  # the Fisher keeps each scored layer's input, as a weight gradient does
            fisher_bytes = saved_activation_bytes(model, sample, fisher_autocast) / count
    release_free_memory()  # the measuring forwards' freed pages: not the Fisher pass's to carry
    sizes = {n: p.numel() for n, p in scored.items()}
    accumulator = sum(sizes.values()) * 4
    largest = 4 * max(sizes.values(), default=0)
    per_layer = _per_layer_work_bytes(model, scored)
    room = train_batch_size * train_bytes - per_layer  # for the Fisher batch's activations and accumulator
    fisher_bytes = max(fisher_bytes, 1.0)
    groups = [list(sizes)]
    if accumulator + fisher_bytes > room:  # one pass does not fit even at batch 1: measure in groups
        for target_batch in (max(1, train_batch_size // 2), 1):
            capacity = room - target_batch * fisher_bytes
            if capacity >= largest:
                break
        groups = _group(sizes, max(capacity, largest))
    group_bytes = max(4 * sum(sizes[n] for n in group) for group in groups) if sizes else 0
    size = int((room - group_bytes) // fisher_bytes)
    fits = size >= 1
    plan = FisherBatchPlan(batch_size=max(1, min(train_batch_size, size)), train_batch_size=train_batch_size,
                           train_activation_bytes_per_sample=round(train_bytes),
                           fisher_activation_bytes_per_sample=round(fisher_bytes), accumulator_bytes=accumulator,
                           per_layer_work_bytes=per_layer, fits=fits,
                           excess_bytes=0 if fits else round(fisher_bytes + group_bytes - room), groups=groups,
                           largest_group_bytes=group_bytes)
    if len(groups) > 1:
        logger.info("The Fisher accumulator (%.0f MB) does not fit beside a training batch's activations "
                    "(%.0f MB): the Fisher is measured in %d passes over groups of tensors (the same mask).",
                    accumulator / 2**20, train_batch_size * train_bytes / 2**20, len(groups))
    if not fits:
        logger.warning("Even one tensor's Fisher accumulator (%.0f MB) does not fit beside one sample within a "
                       "training batch's activations (%.0f MB): the mask phase will need about %.0f MB more than a "
                       "training step. A larger --per-device-train-batch-size closes the gap.",
                       group_bytes / 2**20, train_batch_size * train_bytes / 2**20, plan.excess_bytes / 2**20)
    return plan


def _per_layer_work_bytes(model: nn.Module, scored: Mapping[str, nn.Parameter]) -> int:
    """The largest temporary of the per-sample reduction: a block of rows of a weight (``BLOCK_ENTRIES``), or a
    whole parameter-sized block for a parameter shared by several layers (tied embeddings)."""
    from .fisher import BLOCK_ENTRIES

    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    shared = [p.numel() for p in scored.values() if owners.get(id(p), 0) > 1]
    blocks = [min(p.numel(), BLOCK_ENTRIES) for p in scored.values()]
    return 4 * max(shared + blocks, default=0)


def group_parameters(sizes: dict[str, int], capacity_bytes: int) -> list[list[str]]:
    """Consecutive tensors (in ``sizes``' order) packed into groups whose float32 accumulators stay within
    ``capacity_bytes``; a tensor larger than that is a group of its own."""
    groups: list[list[str]] = []
    current, used = [], 0
    for name, numel in sizes.items():
        need = 4 * numel
        if current and used + need > capacity_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += need
    if current:
        groups.append(current)
    return groups


def _group(sizes: dict[str, int], capacity_bytes: float) -> list[list[str]]:
    return group_parameters(sizes, int(capacity_bytes))
