"""A Fisher mask measured one group of tensors at a time: the mask phase within a training step's memory.

The Fisher pass holds a float32 accumulator as large as every scored parameter together. When that alone is
more than a training step's activations (a large model trained at a small batch), the mask phase would peak
above training. Scoring the parameters in G groups, one Fisher pass each, holds one group's accumulator at a
time; each group then keeps only its own top-k candidates (values and positions), and one global top-k over
the candidates gives the mask.

Exactly the same entries as the one-pass global top-k: an entry among the k best of all has fewer than k
entries ranked above it in its own group, so it is among its group's k candidates; and the candidates of a
tensor are kept in ascending position, so the final ranking breaks ties by tensor order, then by position,
as the one-pass ranking does. The price is G passes over the samples instead of one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..importance.fisher import estimate_fisher
from ..importance.memory import group_parameters  # noqa: F401  (re-exported with the mask it serves)
from ..utils.io import release_free_memory
from .mask import SparseMask, model_fingerprint, strategy_part
from .topk import DEFAULT_ALWAYS_TRAIN, budget_for, global_topk, matches_module, part_quotas


def _best_per_part(scores: dict, order: list[str], quotas: dict, part_of) -> dict:
    """Each part's best ``quotas[part]`` entries of ``scores`` (flat indices per tensor), ranked with the tensors
    in model ``order`` and positions ascending: the ties of the one-pass global ranking."""
    by_part: dict = {}
    for name in order:
        if name in scores:
            by_part.setdefault(part_of(name), {})[name] = scores[name]
    kept = {}
    for part, members in by_part.items():
        kept.update(global_topk(members, quotas[part]))
    return kept


def _prune(values: dict, positions: dict, order: list[str], quotas: dict, part_of) -> None:
    """Keep each part's best ``quotas[part]`` candidates: one not among them cannot be among the part's best of all."""
    kept = _best_per_part(values, order, quotas, part_of)
    for name in kept:
        values[name], positions[name] = values[name][kept[name]], positions[name][kept[name]]


def _rows(param: torch.Tensor) -> int:
    return param.shape[0] if param.dim() else 1


def _items(group) -> list[tuple[str, tuple[int, int] | None]]:
    """A group's members as (name, rows): a plain name is the whole tensor."""
    return [(item, None) if isinstance(item, str) else (item[0], tuple(item[1]) if item[1] is not None else None)
            for item in group]


def grouped_fisher_mask(
    model: nn.Module,
    data,
    groups: Sequence[Sequence],
    keep_ratio: float = 0.005,
    *,
    strategy: str = "global",
    always_train: Sequence[str] = DEFAULT_ALWAYS_TRAIN,
    lowest: bool = False,
    config: dict[str, Any] | None = None,
    budget: int | None = None,
    **fisher_kwargs,
) -> SparseMask:
    """:func:`select_mask` of :func:`estimate_fisher` over ``groups``, one Fisher pass per group on the same
    samples. A group lists parameter names, or ``(name, (first, stop))`` for rows of a tensor too large for one
    pass (a tensor's row ranges in order, covering it once). ``lowest`` keeps the lowest-Fisher entries instead
    (the baseline). ``budget`` (entries) overrides ``keep_ratio``. ``fisher_kwargs`` go to :func:`estimate_fisher`
    (``num_samples``, ``batch_size``, ``collate_fn``, ``seed``, ``autocast_dtype``, ...)."""
    part_of = strategy_part(strategy)
    params = dict(model.named_parameters())
    members = [_items(group) for group in groups]
    covered: dict[str, int] = {}
    for name, rows in (item for group in members for item in group):
        if name not in params:
            raise ValueError(f"Fisher groups name {name!r}, which is not a parameter of the model.")
        covered[name] = covered.get(name, 0) + (_rows(params[name]) if rows is None else rows[1] - rows[0])
    wrong = [n for n, count in covered.items() if count != _rows(params[n])]
    if wrong:
        raise ValueError(f"Fisher groups must cover each candidate once, whole or by row ranges: {wrong[:3]}.")
    order = [n for n in params if n in covered]
    shapes = {n: tuple(params[n].shape) for n in order}
    num_candidates = sum(params[n].numel() for n in order)
    budget = budget_for(keep_ratio, num_candidates) if budget is None else budget
    forced = [n for n in order if matches_module(n, always_train)]
    ranked_budget = budget - sum(params[n].numel() for n in forced)
    if ranked_budget < 0:
        from .budget import BudgetError

        raise BudgetError(f"The budget of {budget} entries is smaller than the always-trained modules {forced[:4]}.")
    ranked = [n for n in order if n not in forced]
    quotas = part_quotas({n: params[n].numel() for n in ranked}, ranked_budget, part_of)
    values: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}
    for group in members:
        scored = [(n, rows) for n, rows in group if n in ranked]
        if not scored:
            continue
        rows = {n: r for n, r in scored if r is not None}
        fisher = estimate_fisher(model, data, params=[n for n, _ in scored], rows=rows or None, **fisher_kwargs)
        if lowest:
            for piece in fisher.values():
                piece.neg_()
        # the group's own best entries: at most k per part however many tensors the group holds, not k per tensor
        kept = _best_per_part(fisher, ranked, quotas, part_of)
        for name, piece in fisher.items():
            offset = rows[name][0] * (params[name].numel() // params[name].shape[0]) if name in rows else 0
            found = piece.reshape(-1)[kept[name].to(piece.device)].float().cpu()
            values[name] = torch.cat([values[name], found]) if name in values else found
            positions[name] = torch.cat([positions[name], kept[name] + offset]) if name in positions \
                else kept[name] + offset
        del fisher
        _prune(values, positions, ranked, quotas, part_of)
        release_free_memory()
    kept = _best_per_part(values, ranked, quotas, part_of)  # the final ranking over every group's candidates
    indices = {n: positions[n][kept[n]] for n in kept}
    for name in forced:
        indices[name] = torch.arange(params[name].numel())
    indices = {n: indices[n] for n in order if n in indices and indices[n].numel()}
    info = {"keep_ratio": budget / num_candidates, "budget": budget, "strategy": strategy,
            "always_train": list(always_train),
            "fisher_groups": len(groups), **(config or {})}
    return SparseMask(shapes=shapes, indices=indices, fingerprint=model_fingerprint(model), config=info)
