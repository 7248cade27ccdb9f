"""Choosing which entries to train from their scores.

The budget is ``round(keep_ratio * candidates)`` entries, the always-trained tensors (the task head)
counted inside it. Global top-k is the FISH Mask reference (one ranking over every candidate, no
per-layer quota); per-tensor top-k gives each tensor a share proportional to its size. Ties are broken
by position (earlier parameter in ``named_parameters`` order, then lower flat index), so a mask never
depends on the sort kernel.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..utils.names import matches_module  # noqa: F401  (re-exported: selection's name matching)

DEFAULT_ALWAYS_TRAIN = ("classifier", "score", "qa_outputs")


def budget_for(keep_ratio: float, num_candidates: int) -> int:
    validate_keep_ratio(keep_ratio)
    return max(1, round(keep_ratio * num_candidates))


def validate_keep_ratio(keep_ratio: float) -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise TypeError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r} ({type(keep_ratio).__name__}): "
                        "write keep_ratio=0.005 for 0.5% of the weights.")
    if not (0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(
            f"keep_ratio must be in (0, 1], got {keep_ratio}. It is a fraction: 0.005 keeps 0.5% of the weights."
        )


def _comparable(chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scores as ``dtype`` on their own device, NaN as -inf (ranked lowest) and -0.0 as +0.0 (so that equal
    values have equal order keys)."""
    return torch.nan_to_num(chunk.to(dtype), nan=float("-inf")).add_(0.0)


CHUNK = 1 << 20  # entries processed at a time: every temporary is a few chunk-sized tensors (~24 MB in all)


def _chunks(scores: torch.Tensor, dtype: torch.dtype):
    """(offset, comparable chunk) over the flat scores, one ``CHUNK`` at a time (no tensor-sized copy)."""
    flat = scores.detach().reshape(-1)
    for offset in range(0, flat.numel(), CHUNK):
        yield offset, _comparable(flat[offset : offset + CHUNK], dtype)


_DIGIT_BITS = 16
_KEY_DTYPE = {torch.float32: torch.int32, torch.float64: torch.int64}


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """Signed integers in the same order as the floats ``values`` (an involution on the bit patterns), computed
    in place over ``values``' storage.

    Non-negative floats already order like their bits; negative ones order in reverse, so their magnitude
    bits are flipped. No NaN may be present (see :func:`_comparable`)."""
    bits = values.view(_KEY_DTYPE[values.dtype])  # in place: ``values`` is a private copy (_comparable's)
    width = bits.element_size() * 8
    flip = (bits >> (width - 1)).bitwise_and_((1 << (width - 1)) - 1)
    return bits.bitwise_xor_(flip)


def _kth_largest(scores: list[torch.Tensor], k: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The k-th largest score over all tensors, and how many scores are strictly larger.

    A most-significant-digit radix select on the order keys: each pass histograms one 16-bit digit of the
    keys that share the digits fixed so far, and fixes the digit holding the k-th largest. Two passes for
    float32 scores, four for float64, each linear in the number of scores and run on the scores' device;
    the histograms are the only extra memory."""
    width = torch.finfo(dtype).bits
    bins = 1 << _DIGIT_BITS
    device = scores[0].device
    prefix, larger, remaining = 0, 0, k
    for shift in range(width - _DIGIT_BITS, -1, -_DIGIT_BITS):
        histogram = torch.zeros(bins, dtype=torch.int64, device=device)
        for tensor in scores:
            for _, chunk in _chunks(tensor, dtype):
                keys = _order_keys(chunk)
                if shift == width - _DIGIT_BITS:  # top digit: signed, shifted into 0..bins-1
                    digits = (keys >> shift) + bins // 2
                else:
                    digits = (keys[(keys >> (shift + _DIGIT_BITS)) == prefix] >> shift) & (bins - 1)
                histogram += torch.bincount(digits.to(torch.int64), minlength=bins).to(device)
        from_top = histogram.flip(0).cumsum(0).cpu()
        position = int(torch.searchsorted(from_top, remaining))  # first digit (from the top) reaching k
        digit = bins - 1 - position
        above = int(from_top[position - 1]) if position else 0
        larger += above
        remaining -= above
        prefix = (digit - bins // 2) if shift == width - _DIGIT_BITS else (prefix << _DIGIT_BITS) | digit
    key = torch.tensor([prefix], dtype=_KEY_DTYPE[dtype])
    threshold = (key ^ ((key >> (width - 1)) & ((1 << (width - 1)) - 1))).view(dtype)[0]
    return threshold, larger


def global_topk(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices (CPU, ascending) kept per tensor under one ranking over all tensors.

    Exactly the entries of one stable descending sort of the concatenated scores — ties to the earliest
    tensor, then the lowest flat index; NaN lowest — in a few linear passes on the scores' own device
    (:func:`_kth_largest`, then one pass that collects what lies above the threshold and the first ties
    at it), with no model-sized copy. Scores of several dtypes are compared in float64 if any is float64,
    else in float32."""
    names = list(scores)
    if not names or k <= 0:
        return {n: torch.empty(0, dtype=torch.int64) for n in names}
    dtype = torch.float64 if any(scores[n].dtype == torch.float64 for n in names) else torch.float32
    total = sum(scores[n].numel() for n in names)
    if k >= total:
        return {n: torch.arange(scores[n].numel()) for n in names}
    threshold, larger = _kth_largest([scores[n] for n in names], k, dtype)
    ties_left = k - larger
    out = {}
    for name in names:
        found = []
        value = threshold.to(scores[name].device)  # once per tensor, not once per chunk
        for offset, chunk in _chunks(scores[name], dtype):
            hits = (chunk > value).nonzero().flatten()
            if ties_left > 0:
                tied = (chunk == value).nonzero().flatten()[:ties_left]
                ties_left -= int(tied.numel())
                hits = torch.cat([hits, tied]).sort().values
            found.append(hits.add_(offset).cpu())
        out[name] = torch.cat(found) if found else torch.empty(0, dtype=torch.int64)
    return out


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


def per_tensor_topk(scores: Mapping[str, torch.Tensor], k: int,
                    quotas: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Each tensor its own top entries: ``quotas`` per tensor (default: ``k`` split in proportion to size)."""
    quotas = quotas if quotas is not None else proportional_quotas({n: s.numel() for n, s in scores.items()}, k)
    return {name: global_topk({name: scores[name]}, quotas[name])[name] for name in scores}


def partitioned_topk(scores: Mapping[str, torch.Tensor], k: int,
                     part_of: Callable[[str], object]) -> dict[str, torch.Tensor]:
    """One ranking inside each part (``part_of(name)``: a block, a module type), ``k`` split over the parts in
    proportion to their sizes. One part is :func:`global_topk`; one part per tensor is :func:`per_tensor_topk`."""
    parts: dict[object, list[str]] = {}
    for name in scores:
        parts.setdefault(part_of(name), []).append(name)
    quotas = part_quotas(scores, k, part_of)
    out: dict[str, torch.Tensor] = {}
    for part, names in parts.items():
        out.update(global_topk({n: scores[n] for n in names}, quotas[part]))
    return out


def part_quotas(sizes: Mapping[str, torch.Tensor | int], k: int, part_of: Callable[[str], object]) -> dict[object, int]:
    """``k`` split over the parts of ``sizes``' tensors (``part_of(name)``) in proportion to their sizes."""
    totals: dict[object, int] = {}
    for name, size in sizes.items():
        totals[part_of(name)] = totals.get(part_of(name), 0) + (size if isinstance(size, int) else size.numel())
    return proportional_quotas(totals, k)
