"""Sizing the Fisher pass so that the mask phase needs no more memory than a training step.

Both phases hold the weights. Beyond them, every training step of a batch holds at least what autograd saves
along the input-gradient path (the activations the backward pass through the blocks needs, before any weight
gradient): that, times the training batch, is the budget. A Fisher pass over a group of tensors holds the same
path at the Fisher batch, the inputs of the group's layers (the per-sample rules need them, as weight gradients
do), the group's float32 accumulator, and one block of per-sample work. So the plan chooses the Fisher batch
and packs the scored tensors into groups, measured one Fisher pass each
(:func:`sparsepeft.selection.grouped.grouped_fisher_mask`: exactly the same mask), splitting a tensor too large
for one group into row ranges; among the batches that fit it takes the fewest passes, then the largest batch.

Each quantity is *measured* on one forward of the longest training example by counting the bytes autograd
saves (exact on any device, no allocator statistics): per sample, at the longest length, so an upper bound
for shorter, padded batches. Gradients and optimizer state, which only training holds, are not counted: the
bound is conservative for every method.
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


# The top-k pass over a group's Fisher holds about 24 bytes per entry of one of selection.topk's CHUNKs
# (2**20 entries); the selection stage sits above this one, so the figure is kept here (a test ties them).
SELECTION_TEMPORARY_BYTES = 24 << 20


@dataclass
class FisherBatchPlan:
    batch_size: int
    train_batch_size: int
    train_activation_bytes_per_sample: int
    fisher_activation_bytes_per_sample: int  # the input-gradient path at the Fisher's precision
    accumulator_bytes: int
    per_layer_work_bytes: int  # the per-sample reduction's temporary (a block of rows of one weight)
    fits: bool  # False: even one row at batch 1 exceeds the budget; whole tensors one per pass, ``excess_bytes`` over
    excess_bytes: int = 0
    groups: list = field(default_factory=list)  # Fisher passes: lists of (name, None or (first, stop) rows)
    largest_group_bytes: int = 0  # a group's accumulator plus its layers' inputs at the Fisher batch
    budget_bytes: int = 0  # the lower bound on a training step's activations the plan stays within
    one_pass_activation_bytes_per_sample: int = 0  # every scored layer's input kept: one pass over all

    def to_dict(self) -> dict:
        out = asdict(self)
        out["groups"] = len(self.groups)  # the count; the names are the scored parameters in order
        return out


def saved_activation_bytes(model: nn.Module, batch: Mapping, autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes autograd saves for backward in one forward pass of ``batch`` (parameters not counted).

    Read off the graph the forward builds (each node's saved tensors), storages counted once however many saved
    tensors view them; parameters are excluded because both phases hold the weights anyway. (A
    ``saved_tensors_hooks`` context would be the obvious tool, but in torch 2.13 each use of it kept about half
    the saved bytes alive afterwards.)"""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()  # dropout off, as in the Fisher pass; its masks would add a little in training
    try:
        with autocast:
            output = model(**inputs)
        roots = [value.grad_fn for value in _tensors_of(output) if value.grad_fn is not None]
        total = _graph_saved_bytes(roots, {p.untyped_storage().data_ptr() for p in model.parameters()})
        del output, roots
    finally:
        model.train(was_training)
    return total


def _tensors_of(output) -> list[torch.Tensor]:
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else [output]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _graph_saved_bytes(roots: list, parameter_storages: set[int]) -> int:
    seen_nodes: set[int] = set()
    storages: dict[int, int] = {}
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for name in dir(node):
            if not (name.startswith("_saved_") or name == "saved_tensors"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed, or not a tensor slot
                continue
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in parameter_storages:
                        storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def _longest(examples: Sequence[Mapping], count: int) -> list[Mapping]:
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    return [examples[i] for i in order[:count]]


@contextlib.contextmanager
def _requires_grad(params: Mapping[str, nn.Parameter]):
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
    """The Fisher batch and the groups of (rows of) tensors, one Fisher pass each, that keep the mask phase
    within what any training step of this batch holds.

    The budget is a lower bound on every training step's activations: the training batch times what autograd
    saves per sample along the input-gradient path alone (no weight trains), which any method that trains
    something below the head needs. A group's Fisher pass holds the same path at the Fisher batch, the inputs
    of the group's layers (the per-sample rules need them) and the group's float32 accumulator; a tensor too
    large for one group is measured in row ranges. Among the Fisher batches that fit, the one with the fewest
    passes is chosen (then the largest). One forward of the longest example measures each quantity."""
    sample = collate_fn(_longest(examples, 1))  # one sample: the measurement costs 1/batch of a step
    owners = _owning_modules(model, scored)
    with torch.enable_grad():
        train_bytes = saved_activation_bytes(model, sample, train_autocast)
        with _requires_grad(scored):  # one pass over everything: each scored layer's input is kept
            fisher_bytes = saved_activation_bytes(model, sample, fisher_autocast)
        path_fisher, inputs = _path_bytes(model, sample, fisher_autocast, owners)
        path_train = path_fisher if train_autocast == fisher_autocast else \
            _path_bytes(model, sample, train_autocast, owners)[0]
    release_free_memory()  # the measuring forwards' freed pages: not the Fisher pass's to carry
    if path_train is None:  # no input embeddings to start the path from: the whole-step measure
        path_train, path_fisher, inputs = train_bytes, fisher_bytes, {n: 0 for n in scored}
    sizes = {n: p.numel() for n, p in scored.items()}
    shared = _shared(model, scored)
    per_layer = _per_layer_work_bytes(scored, shared)
    budget = train_batch_size * path_train
    best = None
    for batch in range(train_batch_size, 0, -1):
        groups = _pack(scored, sizes, inputs, shared, batch, budget - per_layer - batch * path_fisher)
        if groups is not None and (best is None or len(groups[0]) < len(best[1][0])):
            best = (batch, groups)
    fits = best is not None
    if not fits:  # even single rows at batch 1 do not fit: the smallest parts there are, and say by how much
        best = (1, _pack(scored, sizes, inputs, shared, 1, None))
    batch, (groups, costs) = best
    excess = 0 if fits else round(batch * path_fisher + max(costs) + per_layer - budget)
    accumulator = sum(sizes.values()) * 4
    plan = FisherBatchPlan(batch_size=batch, train_batch_size=train_batch_size,
                           train_activation_bytes_per_sample=round(train_bytes),
                           fisher_activation_bytes_per_sample=round(path_fisher), accumulator_bytes=accumulator,
                           per_layer_work_bytes=per_layer, fits=fits, excess_bytes=excess, groups=groups,
                           largest_group_bytes=round(max(costs)), budget_bytes=round(budget),
                           one_pass_activation_bytes_per_sample=round(fisher_bytes))
    if len(groups) > 1:
        logger.info("The Fisher is measured in %d passes over groups of tensors at batch %d (the same mask): its "
                    "%.0f MB accumulator does not fit beside the %.0f MB any training step of batch %d holds.",
                    len(groups), batch, accumulator / 2**20, budget / 2**20, train_batch_size)
    if not fits:
        logger.warning("Even a single row of a tensor does not fit beside one sample within the %.0f MB a training "
                       "step of batch %d holds: the mask phase will need about %.0f MB more. A larger "
                       "--per-device-train-batch-size closes the gap.", budget / 2**20, train_batch_size,
                       excess / 2**20)
    return plan


def _owning_modules(model: nn.Module, scored: Mapping[str, nn.Parameter]) -> dict[str, nn.Module]:
    by_id = {id(p): n for n, p in scored.items()}
    owners = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in by_id:
                owners.setdefault(by_id[id(param)], module)
    return owners


def _path_bytes(model, sample, autocast_dtype, owners: Mapping[str, nn.Module]):
    """Bytes saved per sample along the input-gradient path (every weight frozen, the gradient starting at the
    input embeddings), and each scored parameter's layer-input bytes; (None, {}) without input embeddings."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return None, {}
    seen_inputs: dict[int, int] = {}

    def record(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor):
            seen_inputs[id(module)] = seen_inputs.get(id(module), 0) + inputs[0].numel() * inputs[0].element_size()

    def start_path(module, inputs, output):
        return output.requires_grad_(True) if isinstance(output, torch.Tensor) and output.is_floating_point() else output

    modules = {id(m): m for m in owners.values()}
    handles = [m.register_forward_hook(record) for m in modules.values()]
    handles.append(embeddings.register_forward_hook(start_path))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        path = saved_activation_bytes(model, sample, autocast_dtype)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return path, {name: seen_inputs.get(id(module), 0) for name, module in owners.items()}


def _shared(model: nn.Module, scored: Mapping[str, nn.Parameter]) -> set[str]:
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {n for n, p in scored.items() if owners.get(id(p), 0) > 1}


def _pack(scored, sizes, inputs, shared, batch: int, capacity: float | None):
    """Consecutive (rows of) tensors packed into groups costing at most ``capacity`` bytes each (accumulator plus
    the layer inputs at ``batch``); a tensor too large alone is split into row ranges. ``None`` if some row does not
    fit; ``capacity=None`` packs the smallest parts there are (one row each) one per group."""
    items = []
    for name, param in scored.items():
        need_input = batch * inputs.get(name, 0)
        whole = 4 * sizes[name] + need_input
        if capacity is not None and whole <= capacity:
            items.append(((name, None), whole))
            continue
        rows = param.shape[0] if param.dim() >= 1 else 1
        if capacity is None:  # nothing fits: whole tensors, one per pass, and the plan says by how much
            items.append(((name, None), whole))
            continue
        if rows < 2 or name in shared:  # a vector, or a parameter several layers share: whole or nothing
            return None
        row_bytes = 4 * sizes[name] / rows
        step = int((capacity - need_input) // row_bytes)
        if step < 1:
            return None
        for first in range(0, rows, step):
            stop = min(first + step, rows)
            items.append(((name, (first, stop)), (stop - first) * row_bytes + need_input))
    if capacity is None:
        return [[item] for item, _ in items], [cost for _, cost in items]
    return _consecutive_bins(items, capacity)


def _consecutive_bins(items: list[tuple], capacity: float) -> tuple[list[list], list[float]]:
    """(item, cost) pairs packed in order into bins of at most ``capacity`` (an item larger than that alone)."""
    groups, costs, current, used = [], [], [], 0.0
    for item, cost in items:
        if current and used + cost > capacity:
            groups.append(current)
            costs.append(used)
            current, used = [], 0.0
        current.append(item)
        used += cost
    if current:
        groups.append(current)
        costs.append(used)
    return groups, costs


def _per_layer_work_bytes(scored: Mapping[str, nn.Parameter], shared: set[str]) -> int:
    """The largest temporary of the per-sample reduction: a block of rows of a weight (``BLOCK_ENTRIES``), a
    whole parameter-sized block for a parameter shared by several layers (tied embeddings), or the selection's
    chunk over the group's Fisher."""
    from .fisher import BLOCK_ENTRIES

    blocks = [p.numel() if n in shared else min(p.numel(), BLOCK_ENTRIES) for n, p in scored.items()]
    largest = max((p.numel() for p in scored.values()), default=0)
    return max(4 * max(blocks, default=0), min(SELECTION_TEMPORARY_BYTES, 24 * largest))


def group_parameters(sizes: dict[str, int], capacity_bytes: int) -> list[list[str]]:
    """Consecutive tensors (in ``sizes``' order) packed into groups whose float32 accumulators stay within
    ``capacity_bytes``; a tensor larger than that is a group of its own."""
    return _consecutive_bins([(name, 4 * numel) for name, numel in sizes.items()], capacity_bytes)[0]
