"""The Fisher engine: diagonal Fisher information from batched per-sample gradients.

``F = (1/N) sum_i g_i * g_i`` needs the square of every *per-sample* gradient. A batch gradient squared
is a different (and wrong) quantity, and a batch-size-1 loop is exact but slow. Here one forward and one
backward per batch produce all per-sample gradients through per-layer rules (see ``rules/``); the few
parameters no rule covers are scored exactly by a per-sample loop restricted to them.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from enum import Enum
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data.collate import collator_for
from ..utils.distributed import (
    all_reduce_sum_,
    assert_same_on_all_ranks,
    digest,
    is_distributed,
    rank,
    union_of_names,
    world_size,
)
from .hooks import PerSampleGradCapture
from .losses import PerSampleLoss, TaskType, empirical_nll, expected_terms, infer_task_type
from .rules import DenseGrads, FactoredGrads, PerSampleGrads, RowGrads

logger = logging.getLogger(__name__)

BLOCK_ENTRIES = 1 << 22  # per-sample weight-gradient block computed at a time (16 MB in float32)

ParamSelector = Union[None, Iterable[str], Callable[[str, nn.Parameter], bool]]


class FisherMode(str, Enum):
    EMPIRICAL = "empirical"  # true labels, squared per-sample gradients (the reference "label-square")
    EXPECTED = "expected"  # exact expectation over the model's own predictive distribution
    ABSOLUTE = "absolute"  # true labels, |g_i| instead of g_i^2 (the reference "label-absolute")


class _FisherAccumulator:
    """Sums ``transform(g_i)`` over samples.

    A parameter shared by two layers (tied embeddings) or a layer called twice gets its per-sample
    contributions *added* before the transform, as the true per-sample gradient requires: they are kept
    in the compact form the rules produce and summed one sample at a time when the pass ends.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], mode: FisherMode,
                 mass_range: Mapping[str, torch.Tensor | None] | None = None, num_samples: int = 0,
                 rows: Mapping[str, tuple[int, int]] | None = None):
        self.rows = dict(rows or {})  # name -> (first, stop): only those rows of the parameter are scored
        self.full_shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.totals = {
            n: torch.zeros(_scored_shape(p.shape, self.rows.get(n)), dtype=torch.promote_types(p.dtype, torch.float32),
                           device=p.device)
            for n, p in params.items()
        }
        self.mode = mode
        self.transform = torch.abs_ if mode is FisherMode.ABSOLUTE else torch.square_  # in place: blocks are ours
        self._pending: dict[str, list[PerSampleGrads]] = {}  # shared parameters' contributions, per pass
        self._multi_use: set[str] = set()
        self._batch_size = 0
        # per-sample Fisher mass over a parameter range (IRD ranks samples by it): {name: bool mask or None=all}
        self.mass_range = None if mass_range is None else {
            n: (None if r is None else r.to(device=self.totals[n].device, dtype=self.totals[n].dtype))
            for n, r in mass_range.items()}
        self._num_samples = num_samples
        self.mass_by_name: dict[str, torch.Tensor] = {}  # per tensor, so a tensor re-scored by the fallback is redone
        self._offset = 0

    def begin_pass(self, batch_size: int, multi_use: set[str], offset: int = 0) -> None:
        self._batch_size = batch_size
        self._multi_use = multi_use
        self._offset = offset

    def _tracks(self, name: str) -> bool:
        return self.mass_range is not None and name in self.mass_range

    def _add_mass(self, name: str, per_sample: torch.Tensor, offset: int | None = None) -> None:
        mass = self.mass_by_name.get(name)
        if mass is None:
            mass = self.mass_by_name[name] = torch.zeros(self._num_samples, dtype=torch.float64)
        start = self._offset if offset is None else offset
        mass[start : start + per_sample.numel()] += per_sample.detach().to("cpu", torch.float64).reshape(-1)

    def sample_mass(self) -> torch.Tensor:
        """Each sample's summed Fisher contribution over the range (float64, in pass order)."""
        total = torch.zeros(self._num_samples, dtype=torch.float64)
        for mass in self.mass_by_name.values():
            total += mass
        return total

    def _in_range(self, name: str, transformed: torch.Tensor) -> torch.Tensor:
        """Sum over each sample's entries inside the range: ``transformed`` is ``[batch, *shape]``."""
        rng = self.mass_range[name]
        flat = transformed.reshape(transformed.shape[0], -1)
        return flat.sum(dim=1) if rng is None else flat @ rng.reshape(-1)

    def _in_rows(self, name: str, grads: PerSampleGrads) -> PerSampleGrads:
        """The part of a per-sample gradient that falls in the scored rows (rows index a weight's first axis)."""
        first, stop = self.rows[name]
        if isinstance(grads, RowGrads):
            keep = (grads.row >= first) & (grads.row < stop)
            return RowGrads(sample=grads.sample[keep], row=grads.row[keep] - first, values=grads.values[keep],
                            batch_size=grads.batch_size)
        if isinstance(grads, FactoredGrads):  # gradient = first^T second: its rows are ``first``'s last axis
            return FactoredGrads(first=grads.first[..., first:stop], second=grads.second)
        values = grads.values.reshape(-1, *self.full_shapes[name])
        return DenseGrads(values[:, first:stop])

    def __call__(self, name: str, grads: PerSampleGrads) -> None:
        if name in self.rows:
            grads = self._in_rows(name, grads)
        total = self.totals[name]
        if name in self._multi_use:
            self._add_to_buffer(name, grads)
        elif isinstance(grads, RowGrads):
            values = self.transform(grads.values)
            total.index_add_(0, grads.row, values)
            if self._tracks(name):
                rng = self.mass_range[name]
                per_entry = values.sum(dim=1) if rng is None else (values * rng[grads.row]).sum(dim=1)
                per_sample = per_entry.new_zeros(self._batch_size).index_add_(0, grads.sample, per_entry)
                self._add_mass(name, per_sample)
        elif isinstance(grads, FactoredGrads):
            self._reduce_factored(name, total, grads)
        else:
            values = self.transform(grads.values.reshape(-1, *total.shape))
            total += values.sum(dim=0)
            if self._tracks(name):
                self._add_mass(name, self._in_range(name, values))

    def _reduce_factored(self, name: str, total: torch.Tensor, grads: FactoredGrads) -> None:
        first, second = grads.first, grads.second
        tracks = self._tracks(name)
        rng = self.mass_range[name] if tracks else None
        if first.shape[1] == 1:
            # one position per sample: sum_b (u_b v_b^T)^2 = (u^2)^T (v^2) exactly, one GEMM for the batch
            u, v = self.transform(first[:, 0].clone()), self.transform(second[:, 0].clone())
            total.addmm_(u.t(), v)
            if tracks:  # per sample: (u_b^2)^T R (v_b^2), or |u_b|^2 |v_b|^2 over the whole tensor
                self._add_mass(name, u.sum(1) * v.sum(1) if rng is None else ((u @ rng) * v).sum(1))
            return
        rows = max(1, min(total.shape[0], BLOCK_ENTRIES // max(1, total.shape[1])))
        block = torch.empty((rows, total.shape[1]), dtype=total.dtype, device=total.device)
        masses = torch.zeros(first.shape[0], dtype=total.dtype, device=total.device) if tracks else None
        for b in range(first.shape[0]):  # per sample, in row blocks of at most BLOCK_ENTRIES (a vocabulary-sized
            for start in range(0, total.shape[0], rows):  # head never needs a tensor-sized temporary)
                stop = min(start + rows, total.shape[0])
                part, target = block[: stop - start], total[start:stop]
                torch.mm(first[b, :, start:stop].t(), second[b], out=part)
                if not tracks and self.mode is not FisherMode.ABSOLUTE:
                    target.addcmul_(part, part)  # fused square-and-add: the common case
                    continue
                self.transform(part)  # in place: the block is ours
                target.add_(part)
                if tracks:
                    masses[b] += part.sum() if rng is None else torch.vdot(part.reshape(-1), rng[start:stop].reshape(-1))
        if tracks:
            self._add_mass(name, masses)

    def _add_to_buffer(self, name: str, grads: PerSampleGrads) -> None:
        """Keep a shared parameter's contributions (as the rules gave them: factors, rows) until the pass ends."""
        self._pending.setdefault(name, []).append(grads)

    def end_pass(self) -> None:
        for name, parts in self._pending.items():
            self._reduce_sample_by_sample(name, parts)
        self._pending.clear()

    def _reduce_sample_by_sample(self, name: str, parts: list[PerSampleGrads]) -> None:
        """Sum each sample's contributions into one parameter-sized block, transform it, add it to the total.

        Tied input/output embeddings are the case this is for: a ``batch x vocab x hidden`` buffer of
        per-sample gradients would be ~2.5 GB for GPT-2 small at batch 16, one block is 1/16 of that.
        """
        total = self.totals[name]
        tracks = self._tracks(name)
        rng = self.mass_range[name] if tracks else None
        masses = torch.zeros(self._batch_size, dtype=total.dtype, device=total.device) if tracks else None
        block = torch.empty_like(total)
        rows = [_split_rows_by_sample(p, self._batch_size) if isinstance(p, RowGrads) else None for p in parts]
        for b in range(self._batch_size):
            block.zero_()
            for part, by_sample in zip(parts, rows):
                if by_sample is not None:
                    row, values = by_sample[b]
                    block.index_add_(0, row, values)
                elif isinstance(part, FactoredGrads):
                    block.addmm_(part.first[b].t(), part.second[b])
                else:
                    block += part.values.reshape(-1, *total.shape)[b]
            self.transform(block)
            total.add_(block)
            if tracks:
                masses[b] = block.sum() if rng is None else torch.vdot(block.reshape(-1), rng.reshape(-1))
        if tracks:
            self._add_mass(name, masses)


def _scored_shape(shape, rows: tuple[int, int] | None) -> tuple[int, ...]:
    return tuple(shape) if rows is None else (rows[1] - rows[0], *tuple(shape)[1:])


def _split_rows_by_sample(grads: RowGrads, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.argsort(grads.sample, stable=True)
    counts = torch.bincount(grads.sample, minlength=batch_size).tolist()
    return list(zip(grads.row[order].split(counts), grads.values[order].split(counts)))


def scored_parameters(model: nn.Module, params: ParamSelector = None) -> dict[str, nn.Parameter]:
    """Resolve the caller's choice of parameters to score (default: every trainable parameter)."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    elif callable(params):
        chosen = {n: p for n, p in named.items() if params(n, p)}
    else:
        wanted = list(params)
        missing = [n for n in wanted if n not in named]
        if missing:
            raise KeyError(f"Parameters not found in the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        chosen = {n: named[n] for n in wanted}
    if not chosen:
        raise ValueError(
            "No parameter to score: the model has no trainable parameter in scope. Unfreeze the parameters "
            "to score, or pass params= (names, or a predicate on (name, parameter))."
        )
    return chosen


def _is_batch_iterable(data) -> bool:
    """A DataLoader or any iterable of ready batches (not a map-style dataset we draw samples from)."""
    return isinstance(data, DataLoader) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__")


def _make_loader(data, num_samples: int, batch_size: int, collate_fn, seed: int,
                 shard: bool = False) -> tuple[Iterable, int]:
    if _is_batch_iterable(data):
        return data, num_samples  # an iterable of ready batches: consume until num_samples are seen
    available = len(data)
    if available == 0:
        raise ValueError("The data to estimate the Fisher on is empty.")
    if num_samples > available:
        warnings.warn(f"num_samples={num_samples} is larger than the data ({available} samples); using all of them.")
        num_samples = available
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(available, generator=generator)[:num_samples].tolist()
    if shard:  # the same draw on every rank (same seed), a disjoint share of it each
        indices = indices[rank()::world_size()]
        if not indices:
            raise ValueError(f"{num_samples} Fisher samples cannot be shared by {world_size()} processes: rank {rank()} "
                             "gets none. Use more samples or fewer processes.")
    indices = _longest_first(data, indices)
    loader = DataLoader(Subset(data, indices), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    return loader, len(indices)


def _longest_first(data, indices: list[int]) -> list[int]:
    """The drawn samples ordered longest first (ties in draw order). A batch pads every sample to its longest,
    and a random batch of a corpus with a few long prompts (a suite with timedial's) nearly always holds one:
    in order of length, each batch holds samples of like length and pads little. The Fisher is a sum over
    the samples, so the order changes nothing but float summation order; the largest batch comes first, so a
    batch too large for the memory fails at once. Samples without ``input_ids`` keep their draw order."""
    lengths = []
    for i in indices:
        item = data[i]
        ids = item.get("input_ids") if isinstance(item, Mapping) else None
        if ids is None:
            return indices
        lengths.append(len(ids))
    return [i for _, i in sorted(zip(lengths, indices), key=lambda pair: -pair[0])]


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _truncate(batch: dict, n: int) -> dict:
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def _batch_size(batch: Mapping) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _forward_logits(model: nn.Module, batch: dict, task: TaskType | None,
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The model's logits, in float32. Under ``autocast_dtype`` the forward runs in that precision (as
    training under ``--bf16``/``--fp16`` does) and so does the backward through it; the losses, the
    per-sample gradients and their squares are float32 (or float64 for a float64 model) either way."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task is TaskType.CAUSAL_LM and "labels" not in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    if autocast_dtype is None:  # the caller's own autocast context, if any, applies
        outputs = model(**inputs)
    else:
        with torch.autocast(device_type=next(model.parameters()).device.type, dtype=autocast_dtype):
            outputs = model(**inputs)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    return logits.float() if torch.finfo(logits.dtype).bits < 32 else logits


def _loss_terms(mode: FisherMode, task, loss_fn: PerSampleLoss | None, logits, batch) -> list[torch.Tensor]:
    if loss_fn is not None:
        if mode is FisherMode.EXPECTED:
            raise ValueError("mode='expected' needs a known head; with a custom loss_fn use 'empirical' or 'absolute'.")
        return [loss_fn(logits, batch)]
    if mode is FisherMode.EXPECTED:
        return list(expected_terms(task, logits))
    return [empirical_nll(task, logits, batch)]


class _FrozenForMeasurement:
    """Eval mode (dropout off) and frozen parameters while measuring; the caller's state comes back."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.was_training)
        return False


def estimate_fisher(
    model: nn.Module,
    data,
    num_samples: int = 1024,
    mode: str | FisherMode = FisherMode.EMPIRICAL,
    batch_size: int = 16,
    *,
    params: ParamSelector = None,
    collate_fn: Callable | None = None,
    task_type: str | TaskType | None = None,
    loss_fn: PerSampleLoss | None = None,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
    autocast_dtype: torch.dtype | None = None,
    rows: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of ``model`` on ``num_samples`` samples of ``data``.

    Args:
        data: a map-style dataset of tokenised examples (``num_samples`` are drawn at random with
            ``seed``, as the FISH Mask reference does), or an iterable of ready batches (used in order).
        mode: ``"empirical"`` (true labels, default), ``"expected"`` (exact expectation over the model's
            predictive distribution; classification and regression heads), ``"absolute"`` (``|g_i|``).
        params: which parameters to score — default every parameter with ``requires_grad``; a list of
            names or a predicate ``(name, parameter) -> bool`` (e.g. only PEFT parameters).
        collate_fn: batches the examples; default pads with the model's ``pad_token_id``.
        task_type / loss_fn: override the head's loss; ``loss_fn(logits, batch)`` returns per-sample NLL.
        distributed: under ``torch.distributed`` (default: whenever a group of more than one process is
            running), every rank draws the same ``num_samples`` samples, scores a disjoint shard of them,
            and the sums are all-reduced: every rank returns the same Fisher (checked across ranks), equal
            to the one-process result up to float summation order. An iterable of ready batches is used
            as each rank's own shard.
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` runs the forward and backward under
            autocast, as training in that precision does (several times faster on a GPU, half the
            activation memory); the per-sample gradients are upcast to float32 before they are squared
            and summed. ``None`` (default): the caller's autocast context if there is one (the same
            float32 accumulation), else the model's own dtype.
        rows: ``{name: (first, stop)}`` scores only those rows (first axis) of a parameter and returns a tensor of
            that many rows — how a tensor too large for the memory at hand is measured in parts (the same
            values as the whole tensor's rows). Not for a parameter shared by several layers.

    Returns:
        ``{name: tensor}`` with each parameter's shape, float32, averaged over the samples. The model's
        train/eval mode and ``requires_grad`` flags are restored afterwards.
    """
    if distributed is None:
        distributed = is_distributed()
    fisher, _ = _estimate(model, data, num_samples, mode, batch_size, params, collate_fn, task_type, loss_fn, seed,
                          progress, distributed=distributed, autocast_dtype=autocast_dtype, rows=rows)
    return fisher


def estimate_fisher_and_sample_mass(
    model: nn.Module,
    data,
    sample_indices: Sequence[int],
    mass_range: Mapping[str, torch.Tensor | None] | None = None,
    mode: str | FisherMode = FisherMode.EMPIRICAL,
    batch_size: int = 16,
    *,
    params: ParamSelector = None,
    collate_fn: Callable | None = None,
    task_type: str | TaskType | None = None,
    loss_fn: PerSampleLoss | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The Fisher over exactly ``data[sample_indices]`` and each of those samples' Fisher *mass* — its
    summed contribution ``sum_theta g_i(theta)^2`` over ``mass_range`` (``{name: bool mask}``; a tensor
    missing from it counts nothing, ``None`` as a value counts the whole tensor; default everything).

    The masses come out of the same single batched pass as the Fisher (IRD ranks samples by them).
    Returns ``(fisher, mass)`` with ``mass[j]`` belonging to ``sample_indices[j]``.
    """
    indices = [int(i) for i in sample_indices]
    if not indices:
        raise ValueError("sample_indices is empty: give the samples to measure.")
    fisher, accumulator = _estimate(model, Subset(data, indices), len(indices), mode, batch_size, params, collate_fn,
                                    task_type, loss_fn, 0, progress, in_order=True,
                                    mass_range="all" if mass_range is None else mass_range,
                                    autocast_dtype=autocast_dtype)
    return fisher, accumulator.sample_mass()


def _estimate(model, data, num_samples, mode, batch_size, params, collate_fn, task_type, loss_fn, seed, progress,
              mass_range=None, in_order: bool = False, distributed: bool = False, autocast_dtype=None, rows=None):
    mode = FisherMode(mode)
    scored = scored_parameters(model, params)
    task = TaskType(task_type) if task_type is not None else (None if loss_fn else infer_task_type(model))
    collate_fn = collate_fn or collator_for(model)
    if in_order:
        loader, target = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn), len(data)
    else:
        loader, target = _make_loader(data, num_samples, batch_size, collate_fn, seed, shard=distributed)
    if mass_range == "all":
        mass_range = {name: None for name in scored}
    if distributed:  # sharding is only meaningful if every rank scores the same model
        assert_same_on_all_ranks(digest(scored.values()), "the weights of the parameters being scored")
    device = next(iter(scored.values())).device
    if rows and mass_range is not None:
        raise ValueError("Row ranges and sample mass cannot be combined: measure whole tensors for IRD.")
    accumulator = _FisherAccumulator(scored, mode, mass_range, num_samples=target if mass_range is not None else 0,
                                     rows=rows)
    capture = PerSampleGradCapture(model, scored)  # its rules upcast bf16/fp16 activations to float32
    seen = 0
    first_batch = None
    # The caller's own batches may not come back the same (a generator is spent, a shuffling DataLoader
    # reorders): keep the ones scored, so an exact fallback scores exactly these samples. Token ids only.
    scored_batches: list[dict] | None = [] if not in_order and _is_batch_iterable(data) else None
    with _FrozenForMeasurement(model):
        capture.attach(accumulator)
        try:
            total = math.ceil(target / batch_size) if target else None
            bar = progress and sys.stderr.isatty()  # in a log file, a bar is hundreds of lines: say it in two
            if progress and not bar:
                logger.info("Fisher: %s samples in batches of %d ...", target or "all", batch_size)
            started = time.perf_counter()
            for batch in tqdm(loader, total=total, desc="Fisher", disable=not bar, unit="batch"):
                if target and seen >= target:
                    break
                batch = _to_device(batch, device)
                if target and seen + _batch_size(batch) > target:
                    batch = _truncate(batch, target - seen)
                if first_batch is None:
                    first_batch = batch
                if scored_batches is not None:
                    scored_batches.append(batch)
                _batched_pass(model, batch, capture, accumulator, mode, task, loss_fn, seen, autocast_dtype)
                seen += _batch_size(batch)
        finally:
            capture.detach()
        if seen == 0:
            raise ValueError("The data produced no batch to estimate the Fisher on.")
        if progress and not bar:
            logger.info("Fisher: %d samples in %.1f s", seen, time.perf_counter() - started)
        fallback = list(capture.uncovered) + sorted(capture.not_covered_at_runtime)
        fallback += _used_outside_their_layer(model, first_batch, scored, capture, task, loss_fn, fallback,
                                              autocast_dtype)
        if distributed:  # a parameter one rank must re-score exactly, every rank must
            fallback = union_of_names(fallback, list(scored))
        if fallback:
            replay = scored_batches if scored_batches is not None else loader
            _exact_fallback(model, replay, target, scored, fallback, accumulator, mode, task, loss_fn, device, progress,
                            autocast_dtype)
    if distributed:
        seen = _reduce_across_ranks(accumulator, seen)
    fisher = {name: total.div_(seen) for name, total in accumulator.totals.items()}  # in place: no second copy
    _raise_on_non_finite(fisher)
    if distributed:
        assert_same_on_all_ranks(digest(fisher.values()), "the Fisher (after all-reduce)")
    return fisher, accumulator


def _reduce_across_ranks(accumulator: _FisherAccumulator, seen: int) -> int:
    """Sum every rank's totals and sample count; each rank then holds the Fisher of all shards."""
    count = torch.tensor([float(seen)], dtype=torch.float64)
    all_reduce_sum_([*accumulator.totals.values(), count])
    return int(count.item())


def _batched_pass(model, batch, capture, accumulator, mode, task, loss_fn, seen: int, autocast_dtype=None) -> None:
    capture.start_batch(_batch_size(batch))
    logits = _forward_logits(model, batch, task, autocast_dtype)
    terms = _loss_terms(mode, task, loss_fn, logits, batch)
    _raise_on_non_finite_loss(terms, seen)
    if not capture.covered:
        return
    multi_use = {name for name, count in capture.use_counts.items() if count > 1}
    for i, term in enumerate(terms):
        accumulator.begin_pass(_batch_size(batch), multi_use, offset=seen)
        if term.requires_grad:
            torch.autograd.backward(term.sum(), inputs=capture.leaves or None, retain_graph=i < len(terms) - 1)
        accumulator.end_pass()


def _used_outside_their_layer(model, batch, scored, capture, task, loss_fn, already: list[str],
                              autocast_dtype=None) -> list[str]:
    """Covered parameters whose layer never ran but that still receive gradient (used functionally).

    Their per-sample gradients never reached a rule, so they must be scored by the exact fallback.
    """
    never_called = [n for n in capture.covered if n not in capture.ever_used and n not in already]
    if not never_called or batch is None:
        return []
    params = [scored[n] for n in never_called]
    for p in params:
        p.requires_grad_(True)
    try:
        logits = _forward_logits(model, dict(batch), task, autocast_dtype)
        loss = _loss_terms(FisherMode.EMPIRICAL, task, loss_fn, logits, batch)[0].sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
    finally:
        for p in params:
            p.requires_grad_(False)
    return [n for n, g in zip(never_called, grads) if g is not None and bool(g.ne(0).any())]


def _exact_fallback(model, loader, target, scored, names, accumulator, mode, task, loss_fn, device, progress,
                    autocast_dtype=None) -> None:
    """Per-sample loop over the parameters no rule covers: exact for any layer, slow, so we say so."""
    warnings.warn(
        f"{len(names)} parameter(s) have no per-sample-gradient rule and are scored by an exact but slow "
        f"per-sample loop: {names[:5]}{' ...' if len(names) > 5 else ''}. Register a rule with "
        "sparsepeft.importance.register_rule to make them fast."
    )
    params = [scored[n] for n in names]
    transform = accumulator.transform
    for p in params:
        p.requires_grad_(True)
    for name in names:  # the loop re-scores every sample: drop what the batched pass may have added
        accumulator.totals[name].zero_()
        accumulator.mass_by_name.pop(name, None)
    seen = 0
    try:
        for batch in tqdm(loader, desc="Fisher (exact fallback)", disable=not progress, unit="batch"):
            batch = _to_device(batch, device)
            for i in range(_batch_size(batch)):
                if target and seen >= target:
                    return
                sample = {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
                logits = _forward_logits(model, sample, task, autocast_dtype)
                terms = _loss_terms(mode, task, loss_fn, logits, sample)
                for j, term in enumerate(terms):
                    grads = torch.autograd.grad(term.sum(), params, allow_unused=True, retain_graph=j < len(terms) - 1)
                    for name, grad in zip(names, grads):
                        if grad is not None:
                            if name in accumulator.rows:
                                grad = grad[accumulator.rows[name][0] : accumulator.rows[name][1]]
                            value = transform(grad.to(accumulator.totals[name].dtype, copy=True))
                            accumulator.totals[name] += value
                            if accumulator._tracks(name):
                                accumulator._add_mass(name, accumulator._in_range(name, value[None]), offset=seen)
                seen += 1
    finally:
        for p in params:
            p.requires_grad_(False)


def _raise_on_non_finite_loss(terms: Sequence[torch.Tensor], seen: int) -> None:
    for term in terms:
        bad = ~torch.isfinite(term.detach())
        if bad.any():
            rows = (bad.nonzero().flatten() + seen).tolist()[:5]
            raise FloatingPointError(
                f"Non-finite loss for sample(s) {rows} of the Fisher samples: check the labels and inputs of "
                "those samples, or load the model in float32."
            )


def _raise_on_non_finite(fisher: Mapping[str, torch.Tensor]) -> None:
    bad = [name for name, value in fisher.items() if not bool(torch.isfinite(value).all())]
    if bad:
        raise FloatingPointError(
            f"NaN/inf in the per-sample gradients of {bad[:5]}{' ...' if len(bad) > 5 else ''}. The Fisher "
            "overflowed or the gradients are not finite: estimate in float32, or lower the learning rate if "
            "the model was already trained to a diverged state."
        )
