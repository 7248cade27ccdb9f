"""Choosing which entries to train from their scores.

The budget is ``round(keep_ratio * candidates)`` entries, the always-trained tensors (the task head)
counted inside it. Global top-k is the FISH Mask reference (one ranking over every candidate, no
per-layer quota); per-tensor top-k gives each tensor a share proportional to its size. Ties are broken
by position (earlier parameter in ``named_parameters`` order, then lower flat index), so a mask never
depends on the sort kernel.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..utils.names import matches_module  # noqa: F401  (re-exported: selection's name matching)

DEFAULT_ALWAYS_TRAIN = ("classifier", "score", "qa_outputs")


def budget_for(keep_ratio: float, num_candidates: int) -> int:
    validate_keep_ratio(keep_ratio)
    return max(1, round(keep_ratio * num_candidates))


def validate_keep_ratio(keep_ratio: float) -> None:
    if not (0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(
            f"keep_ratio must be in (0, 1], got {keep_ratio}. It is a fraction: 0.005 keeps 0.5% of the weights."
        )


def _threshold_select(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``flat``; ties go to the lowest positions."""
    if k >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    threshold = torch.topk(flat, k, sorted=False).values.min()
    chosen = flat > threshold
    needed = k - int(chosen.sum())
    tied_positions = (flat == threshold).nonzero().flatten()  # ascending, usually a handful
    chosen[tied_positions[:needed]] = True
    return chosen


def _nan_as_lowest(scores: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or (torch.float64 if scores.dtype == torch.float64 else torch.float32)
    flat = scores.detach().reshape(-1).to("cpu", dtype)
    return torch.nan_to_num(flat, nan=float("-inf"))


CHUNK = 1 << 20  # entries ranked at a time: CPU top-k copies its input as (value, index) pairs, 16 bytes each


def _chunks(scores: torch.Tensor, dtype: torch.dtype):
    """(offset, chunk) over the flat scores, NaN as -inf, one ``CHUNK`` at a time (no tensor-sized copy)."""
    flat = scores.detach().reshape(-1)
    for offset in range(0, flat.numel(), CHUNK):
        yield offset, torch.nan_to_num(flat[offset : offset + CHUNK].to("cpu", dtype), nan=float("-inf"))


def global_topk(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices kept per tensor under one ranking over all tensors.

    Streamed, one chunk of one tensor at a time: the k-th largest score comes from a pool of at most k
    candidates (each chunk's own top entries merged in turn), then each tensor keeps what lies above it,
    and ties at it go to the earliest positions. The result is exactly that of ranking one concatenation
    of all scores, without that model-sized copy, its boolean mask, or top-k's (value, index) copy of the
    largest tensor."""
    names = list(scores)
    if not names or k <= 0:
        return {n: torch.empty(0, dtype=torch.int64) for n in names}
    dtype = torch.float64 if any(scores[n].dtype == torch.float64 for n in names) else torch.float32
    total = sum(scores[n].numel() for n in names)
    if k >= total:
        return {n: torch.arange(scores[n].numel()) for n in names}
    threshold = _kth_largest(scores, names, k, dtype)
    above = {n: _positions(scores[n], dtype, lambda chunk: chunk > threshold) for n in names}
    needed = k - sum(int(idx.numel()) for idx in above.values())
    out = {}
    for name in names:  # ties at the threshold: earliest tensor, then lowest flat index
        chosen = above[name]
        if needed > 0:
            tied = _positions(scores[name], dtype, lambda chunk: chunk == threshold, limit=needed)
            if tied.numel():
                needed -= int(tied.numel())
                chosen = torch.cat([chosen, tied]).sort().values
        out[name] = chosen
    return out


def _positions(scores: torch.Tensor, dtype: torch.dtype, condition, limit: int | None = None) -> torch.Tensor:
    """Ascending flat positions where ``condition(chunk)`` holds (the first ``limit`` of them)."""
    found, count = [], 0
    for offset, chunk in _chunks(scores, dtype):
        hits = condition(chunk).nonzero().flatten() + offset
        if limit is not None:
            hits = hits[: limit - count]
        found.append(hits)
        count += int(hits.numel())
        if limit is not None and count >= limit:
            break
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def _kth_largest(scores: Mapping[str, torch.Tensor], names: list[str], k: int, dtype: torch.dtype) -> torch.Tensor:
    pool = torch.empty(0, dtype=dtype)
    for name in names:
        for _, chunk in _chunks(scores[name], dtype):
            top = torch.topk(chunk, min(k, chunk.numel()), sorted=False).values
            pool = torch.cat([pool, top])
            if pool.numel() > k:
                pool = torch.topk(pool, k, sorted=False).values
    return pool.min()


def proportional_quotas(sizes: Mapping[str, int], k: int) -> dict[str, int]:
    """Split ``k`` over tensors in proportion to their sizes (largest remainder, ties by order)."""
    total = sum(sizes.values())
    if total == 0:
        return {n: 0 for n in sizes}
    exact = {n: k * s / total for n, s in sizes.items()}
    quotas = {n: min(sizes[n], int(v)) for n, v in exact.items()}
    remaining = k - sum(quotas.values())
    order = sorted(sizes, key=lambda n: -(exact[n] - int(exact[n])))
    for name in order:
        if remaining <= 0:
            break
        if quotas[name] < sizes[name]:
            quotas[name] += 1
            remaining -= 1
    return quotas


def per_tensor_topk(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    quotas = proportional_quotas({n: s.numel() for n, s in scores.items()}, k)
    return {
        name: _threshold_select(_nan_as_lowest(scores[name]).cpu(), quotas[name]).nonzero().flatten()
        for name in scores
    }
