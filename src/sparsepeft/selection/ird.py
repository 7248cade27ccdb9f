"""IRD — iterative sample-parameter range decreasing (Dong, Xue, Zheng, He 2024), as specified in
METHODS.md §3.

FISH Mask measures the Fisher on N random samples, weighed equally. IRD narrows both ranges toward the
informative end, one Fisher pass per round:

    round 0:  samples S0 = N random samples, parameter range P0 = every candidate  -> plain FISH mask
    round r:  Fisher F_r and each sample's Fisher mass on P_r, from one batched pass over S_r;
              mask M_r = top-k of F_r inside P_r;
              S_{r+1} = the top ``sample_shrink`` share of S_r by mass on P_r;
              P_{r+1} = the top ``param_shrink`` share of P_r by F_r (never fewer than k entries)

Every round's (S_r, M_r) is a candidate pair; a criterion picks one. ``probe`` (default): held-out
loss after a few masked training steps from the same starting weights on the same batches — it asks
the question IRD is for ("which mask trains best?") at a few training steps per round. ``mass``: the
share of a held-out Fisher (samples outside S0, or a dev split) that the mask retains, one extra
Fisher pass. ``mass`` is biased toward round 0 by construction: the held-out Fisher is an estimate of
the population Fisher, and round 0's mask is the top-k of the estimate from the most (and unselected)
samples, so later rounds — chosen from high-mass samples inside a narrower range — can only beat it by
noise; it stays as a cheap option. Round 0 is always a candidate, so IRD can only return the plain FISH
mask or one the criterion prefers to it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..importance.fisher import estimate_fisher, estimate_fisher_and_sample_mass, scored_parameters
from .mask import SparseMask, select_mask
from .topk import DEFAULT_ALWAYS_TRAIN, budget_for, global_topk, matches_module

CRITERIA = ("mass", "probe")


@dataclass
class IRDConfig:
    rounds: int = field(default=3, metadata={"help": "Rounds of range decreasing (1 = plain FISH Mask)."})
    sample_shrink: float = field(default=0.5, metadata={"help": "Share of the samples kept from one round to the next."})
    param_shrink: float = field(default=0.1, metadata={
        "help": "Share of the parameter range kept from one round to the next (never below the budget)."})
    criterion: str = field(default="probe", metadata={
        "help": "probe: held-out loss after a short masked training; mass: held-out Fisher mass the mask retains "
                "(cheaper, favours round 0 by construction)."})
    criterion_samples: int = field(default=256, metadata={"help": "Held-out samples the criterion is measured on."})
    probe_steps: int = field(default=20, metadata={"help": "probe: masked AdamW steps per candidate."})
    probe_lr: float = field(default=2e-3, metadata={"help": "probe: learning rate."})
    probe_batch_size: int = field(default=16, metadata={"help": "probe: batch size."})
    num_samples: int = field(default=1024, metadata={"help": "Initial samples (FISH Mask's N)."})
    fisher_mode: str = "empirical"
    fisher_batch_size: int = 16
    strategy: str = "global"
    always_train: tuple[str, ...] = DEFAULT_ALWAYS_TRAIN
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sample_shrink", "param_shrink"):
            value = getattr(self, name)
            if not (0.0 < value < 1.0) and not (value == 1.0 and self.rounds == 1):
                raise ValueError(f"{name} must be in (0, 1) — the share kept from one round to the next — got {value}.")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}.")
        if self.criterion not in CRITERIA:
            raise ValueError(f"Unknown IRD criterion {self.criterion!r}: choose one of {CRITERIA}.")
        if self.strategy != "global":
            raise ValueError("IRD selects with one global ranking inside the parameter range (strategy='global').")

    def samples_in_round(self, num_samples: int) -> list[int]:
        sizes = [num_samples]
        for _ in range(1, self.rounds):
            sizes.append(max(1, math.floor(sizes[-1] * self.sample_shrink)))
        return sizes


@dataclass
class IRDResult:
    """The chosen pair, every round's pair and report, and how long the search took."""

    samples: list[int]
    mask: SparseMask
    rounds: list[dict[str, Any]]
    best_round: int
    seconds: float
    config: dict[str, Any]
    pairs: list[tuple[list[int], SparseMask]] = field(default_factory=list, repr=False)

    def report(self) -> dict[str, Any]:
        return {"best_round": self.best_round, "seconds": self.seconds, "config": self.config, "rounds": self.rounds,
                "chosen_samples": self.samples}

    def save_report(self, path) -> None:
        from ..utils.io import write_json

        write_json(path, self.report())

    def plot(self, path) -> None:
        from .plot import plot_ird_rounds

        plot_ird_rounds(self.report(), path)


def ird_search(
    model: nn.Module,
    data,
    keep_ratio: float | None = 0.005,
    config: IRDConfig | None = None,
    *,
    budget: int | None = None,
    params=None,
    eval_data=None,
    collate_fn: Callable | None = None,
    progress: bool = True,
) -> IRDResult:
    """Search the (samples, mask) pair with IRD; see the module docstring.

    Args:
        keep_ratio / budget: the mask's size, as for :func:`select_mask` (``budget`` is an exact count).
        params: the candidates — default every trainable parameter (FISH Mask); for FISH-Tuning pass
            ``sparsepeft.models.peft.tuned_parameters(model)``'s names.
        eval_data: held-out examples for the criterion; default the training samples outside the initial N.
    """
    config = config or IRDConfig()
    start = time.perf_counter()
    candidates = scored_parameters(model, params)
    names = list(candidates)
    num_candidates = sum(p.numel() for p in candidates.values())
    if budget is None:
        budget = budget_for(keep_ratio, num_candidates)
    sizes = config.samples_in_round(min(config.num_samples, len(data)))
    if sizes[-1] < 1 or len(set(sizes)) < len(sizes):
        raise ValueError(f"{min(config.num_samples, len(data))} samples cannot shrink over {config.rounds} rounds by "
                         f"{config.sample_shrink} (sizes {sizes}): give more samples or fewer rounds.")
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(data), generator=generator).tolist()
    samples = order[: sizes[0]]
    held_out = _held_out(data, order[sizes[0]:], eval_data, config)
    forced = {n for n in names if matches_module(n, config.always_train)}
    param_range: dict[str, torch.Tensor | None] = {n: None for n in names}  # None: the whole tensor
    range_size = num_candidates
    fisher_kwargs = dict(mode=config.fisher_mode, batch_size=config.fisher_batch_size, params=names,
                         collate_fn=collate_fn, progress=progress)
    rounds: list[dict[str, Any]] = []
    pairs: list[tuple[list[int], SparseMask]] = []
    previous: SparseMask | None = None
    for r in range(len(sizes)):
        last = r + 1 == len(sizes)  # no next round to rank samples for: skip the per-sample masses
        fisher, mass = estimate_fisher_and_sample_mass(model, data, samples, {} if last else param_range,
                                                       **fisher_kwargs)
        mask = _mask_in_range(fisher, param_range, budget, model, config, r)
        pairs.append((list(samples), mask))
        rounds.append({
            "round": r, "samples": len(samples), "parameter_range": range_size, "selected": mask.num_selected,
            "overlap_with_previous": None if previous is None else _overlap(mask, previous),
            "overlap_with_fish": _overlap(mask, pairs[0][1]),
            "sample_mass_mean": None if last else float(mass.mean()), "sample_mass_kept_share": None,
        })
        previous = mask
        if not last:
            ranking = torch.argsort(mass, descending=True, stable=True)[: sizes[r + 1]]  # ties: earlier sample
            rounds[-1]["sample_mass_kept_share"] = float(mass[ranking].sum() / mass.sum().clamp_min(1e-300))
            samples = [samples[j] for j in ranking.tolist()]
            range_size = max(budget, math.floor(range_size * config.param_shrink))
            param_range = _shrink_range(fisher, param_range, range_size, forced)
        del fisher
    values = _criterion(model, data, pairs, held_out, config, collate_fn, progress, candidates)
    for report, value in zip(rounds, values):
        report["criterion"] = value
    best = _best(values, config.criterion)
    chosen_samples, chosen_mask = pairs[best]
    chosen_mask.config.update({"selection": "ird", "ird_round": best, "ird": _jsonable(asdict(config))})
    return IRDResult(samples=chosen_samples, mask=chosen_mask, rounds=rounds, best_round=best,
                     seconds=time.perf_counter() - start, config=_jsonable(asdict(config)), pairs=pairs)


def _held_out(data, rest: list[int], eval_data, config: IRDConfig):
    if config.rounds == 1:
        return None
    if eval_data is not None:
        if len(eval_data) == 0:
            raise ValueError("eval_data is empty: the IRD criterion needs held-out examples.")
        return [eval_data[i] for i in range(min(len(eval_data), config.criterion_samples))]
    if not rest:
        raise ValueError(f"The IRD criterion ({config.criterion}) needs held-out samples, but all {len(rest)} training "
                         "samples are used to estimate the Fisher. Pass eval_data (a dev split) or lower num_samples.")
    return [data[i] for i in rest[: config.criterion_samples]]


def _mask_in_range(fisher, param_range, budget: int, model, config: IRDConfig, r: int) -> SparseMask:
    scores = {}
    for name, value in fisher.items():
        rng = param_range[name]
        scores[name] = value if rng is None else value.masked_fill(~rng, float("-inf"))
    return select_mask(scores, strategy="global", always_train=config.always_train, model=model, budget=budget,
                       config={"selection": "ird", "ird_round_candidate": r, "fisher_mode": config.fisher_mode})


def _shrink_range(fisher, param_range, size: int, forced: set[str]) -> dict[str, torch.Tensor | None]:
    """The ``size`` highest-Fisher entries of the current range (the always-trained head stays in full)."""
    scores = {n: (f if param_range[n] is None else f.masked_fill(~param_range[n], float("-inf")))
              for n, f in fisher.items() if n not in forced}
    kept = global_topk(scores, size - sum(fisher[n].numel() for n in forced))
    out: dict[str, torch.Tensor | None] = {n: None for n in forced}
    for name, index in kept.items():
        rng = torch.zeros(fisher[name].numel(), dtype=torch.bool)
        rng[index] = True
        out[name] = rng.reshape(fisher[name].shape).to(fisher[name].device)
    return out


def _overlap(a: SparseMask, b: SparseMask) -> float:
    shared = 0
    for name, idx in a.indices.items():
        other = b.indices.get(name)
        if other is not None and idx.numel() and other.numel():
            shared += int(torch.isin(idx, other).sum())
    return shared / max(1, a.num_selected)


def _criterion(model, data, pairs, held_out, config: IRDConfig, collate_fn, progress, candidates) -> list[float | None]:
    if len(pairs) == 1:
        return [None]
    if config.criterion == "mass":
        reference = estimate_fisher(model, held_out, num_samples=len(held_out), mode=config.fisher_mode,
                                    batch_size=config.fisher_batch_size, params=list(candidates),
                                    collate_fn=collate_fn, progress=progress)
        total = sum(float(v.sum()) for v in reference.values())
        return [_retained(reference, mask) / max(total, 1e-300) for _, mask in pairs]
    from .probe import probe_loss

    return [probe_loss(model, data, mask, held_out, config, collate_fn) for _, mask in pairs]


def _retained(reference: Mapping[str, torch.Tensor], mask: SparseMask) -> float:
    return sum(float(reference[n].reshape(-1)[idx.to(reference[n].device)].sum()) for n, idx in mask.indices.items())


def _best(values: list[float | None], criterion: str) -> int:
    if values[0] is None:
        return 0
    if criterion == "mass":
        return max(range(len(values)), key=lambda i: (values[i], -i))
    return min(range(len(values)), key=lambda i: (values[i], i))


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
