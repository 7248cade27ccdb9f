"""FISH-Tuning: a Fisher mask over the parameters a PEFT method adds, at a stated budget.

The candidates are the PEFT model's trainable parameters (LoRA A/B, DoRA magnitudes, adapter
projections ... and the task head, always trained inside the budget). Baselines at the same budget:
``random`` and ``lowest`` (the lowest-Fisher entries).

``fisher_at`` settles LoRA's zero-initialised B (all Fisher of A is zero at init): ``"init"`` measures
at initialisation anyway; ``"warmup"`` measures after a short dense warm-up of the adapter and then
restores the adapter to its initial values. ``strategy="per_tensor"`` gives every matrix its
proportional quota (so A gets its share even where its Fisher is tiny). The defaults are the ones the
quality benchmark picked (docs/fish_tuning.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..importance.fisher import estimate_fisher
from ..importance.warmup import dense_warmup
from .budget import Budget
from .ird import IRDConfig, ird_search
from .mask import SparseMask, select_mask
from .topk import DEFAULT_ALWAYS_TRAIN

SELECTIONS = ("fisher", "random", "lowest", "ird")
FISHER_AT = ("init", "warmup")


@dataclass
class FishTuningConfig:
    budget: str = field(default="50%", metadata={
        "help": "Entries kept: a count (74498), a ratio of the PEFT parameters (0.5 or 50%), or a reference "
                "config whose trainable count is the budget ('lora:r=8')."})
    selection: str = field(default="fisher", metadata={
        "help": "fisher (highest), random, lowest (lowest Fisher), or ird (IRD's sample/parameter range search)."})
    fisher_at: str = field(default="warmup", metadata={
        "help": "init: Fisher of the freshly initialised adapter; warmup: after a short dense warm-up, then "
                "the adapter is restored to its initial values."})
    warmup_steps: int = field(default=30, metadata={"help": "Dense warm-up steps (fisher_at=warmup)."})
    warmup_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the warm-up."})
    warmup_batch_size: int = field(default=16, metadata={"help": "Batch size of the warm-up."})
    strategy: str = field(default="global", metadata={
        "help": "global: one ranking over all PEFT parameters; per_tensor: each matrix its proportional quota."})
    num_samples: int = field(default=1024, metadata={"help": "Samples the Fisher is measured on."})
    fisher_mode: str = field(default="empirical", metadata={"help": "empirical, expected, or absolute."})
    fisher_batch_size: int = field(default=16, metadata={"help": "Batch size of the Fisher pass."})
    always_train: tuple[str, ...] = DEFAULT_ALWAYS_TRAIN
    seed: int = 0
    ird: Optional[IRDConfig] = None  # selection="ird": its schedule and criterion (default IRDConfig())

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"Unknown selection {self.selection!r}: choose one of {SELECTIONS}.")
        if self.fisher_at not in FISHER_AT:
            raise ValueError(f"Unknown fisher_at {self.fisher_at!r}: choose one of {FISHER_AT}.")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0.")
        Budget.parse(self.budget)  # fail early on a budget that cannot be read


def fish_tuning_mask(
    model: nn.Module,
    data,
    config: FishTuningConfig | None = None,
    *,
    collate_fn: Callable | None = None,
    reference_count: Callable[[str, dict], int] | None = None,
    progress: bool = True,
) -> SparseMask:
    """The FISH-Tuning mask of a PEFT model (``PeftModel`` or a model with bottleneck adapters).

    ``reference_count(method, options)`` counts a reference config's trainable parameters; needed only
    for budgets like ``"lora:r=8"`` (:func:`sparsepeft.models.peft.reference_count` does it).
    The model's adapter values are the same before and after.
    """
    from ..models.peft import tuned_parameters

    config = config or FishTuningConfig()
    candidates = tuned_parameters(model)
    budget = Budget.parse(config.budget)
    count = budget.resolve(sum(p.numel() for p in candidates.values()), reference_count)
    info = {"scope": "peft", "selection": config.selection, "budget_spec": budget.describe(),
            **{k: v for k, v in asdict(config).items() if k not in ("budget", "selection", "always_train", "ird")}}
    start = time.perf_counter()
    if config.selection == "ird":
        return _ird_mask(model, data, candidates, count, config, collate_fn, progress, info, start)
    if config.selection == "random":
        generator = torch.Generator().manual_seed(config.seed)
        scores = {n: torch.rand(p.shape, generator=generator) for n, p in candidates.items()}
    else:
        scores = _fisher(model, data, candidates, config, collate_fn, progress, info)
        if config.selection == "lowest":
            scores = {n: s.neg_() for n, s in scores.items()}
    mask = select_mask(scores, strategy=config.strategy, always_train=config.always_train, model=model,
                       config=info, budget=count)
    mask.config["mask_seconds"] = time.perf_counter() - start
    return mask


def _measured_state(model, data, candidates, config: FishTuningConfig, collate_fn):
    """Where the Fisher is measured: after the warm-up (undone on exit), or at initialisation."""
    steps = config.warmup_steps if config.fisher_at == "warmup" else 0
    return dense_warmup(model, data, candidates, steps=steps, lr=config.warmup_lr,
                        batch_size=config.warmup_batch_size, collate_fn=collate_fn, seed=config.seed)


def _fisher(model, data, candidates, config: FishTuningConfig, collate_fn, progress, info) -> dict[str, torch.Tensor]:
    with _measured_state(model, data, candidates, config, collate_fn) as warmup:
        fisher = estimate_fisher(model, data, num_samples=config.num_samples, mode=config.fisher_mode,
                                 batch_size=config.fisher_batch_size, params=list(candidates), collate_fn=collate_fn,
                                 seed=config.seed, progress=progress)
    info["warmup"] = warmup
    return fisher


def _ird_mask(model, data, candidates, count: int, config: FishTuningConfig, collate_fn, progress, info, start):
    """IRD inside the PEFT scope: the search runs where the Fisher would be measured (after the warm-up)."""
    ird = config.ird or IRDConfig(num_samples=config.num_samples, fisher_mode=config.fisher_mode,
                                  fisher_batch_size=config.fisher_batch_size, always_train=config.always_train,
                                  seed=config.seed)
    with _measured_state(model, data, candidates, config, collate_fn) as warmup:
        result = ird_search(model, data, config=ird, budget=count, params=list(candidates), collate_fn=collate_fn,
                            progress=progress)
    mask = result.mask
    mask.config.update(info, warmup=warmup, ird_report=result.report(), mask_seconds=time.perf_counter() - start)
    mask.config["selection"] = "ird"
    return mask
