"""Which transformer blocks train at each step: IST's learned scores, LISA, uniform random, or all.

One machinery, four strategies (``LayerwiseConfig.strategy``):
- ``ist`` — Yao et al. 2024 as released: scores start at 0; each step int(fraction·L) blocks are drawn
  without replacement with weight sigmoid(−s); every ``probe_interval`` steps the scores are updated from
  ``num_probes`` response-suppression probes (:func:`ist_score_update`). High score = cheap to suppress.
- ``lisa`` — Pan et al. 2024: every ``interval`` steps, ``num_layers`` (default 2) blocks drawn uniformly.
- ``random`` — int(fraction·L) blocks drawn uniformly each step: IST without its scores (the baseline
  the published release lacks).
- ``full`` — every block every step: the vanilla PEFT method through the same code path.

All draws come from the sampler's own seeded ``torch.Generator``, so every DDP rank makes the same
choices and a checkpoint can carry the generator state.
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

STRATEGIES = ("ist", "lisa", "random", "full")
OPTIMIZER_STATE_POLICIES = ("keep", "offload", "drop")


class LayerSelectionError(ValueError):
    """A layer-wise configuration that cannot work on this model (says which value to change)."""


@dataclass
class LayerwiseConfig:
    """Layer-wise sparse tuning. Every IST constant is a field whose default is the published value.

    Args:
        strategy: ist, lisa, random or full.
        fraction: share of the blocks updated per step (ist, random); the count is int(fraction·L).
            Default 0.25.
        num_layers: an absolute count instead of ``fraction``; LISA's γ (default 2).
        interval: LISA: steps between re-draws (K, default 20).
        suppress_fraction: IST: share of blocks suppressed per probe, int(0.5·L).
        suppression_factor: IST: the suppressed blocks' PEFT output is multiplied by this (0.25).
        probe_interval: IST: steps between probes (10; at steps 10, 20, ... before that step's draw).
        num_probes: IST: probes per update, on distinct block subsets (3).
        score_lr: IST: step size of the score update (10).
        probe_batch_size: IST: training samples in the probe batch (16).
        probe_chunk_size: IST: the probe batch is evaluated in chunks of at most this many samples, their
            losses weighted by label-token count (the same loss as one pass), so a probe never needs more
            activation memory than a training batch. None: one pass (``LayerwiseCallback`` fills in the
            training batch size).
        train_outside_blocks: keep trainable what the setup trains outside the blocks (PEFT's
            ``modules_to_save``: a new task head; embeddings in LISA's full-parameter form). A causal LM
            under PEFT has none, which is the published IST setting.
        optimizer_state: what happens to optimizer state of blocks not selected this step — keep
            (the reference), offload (to CPU, back when selected) or drop (Adam restarts for them).
        blocks_path: dotted path of the block list, for models where it is not found by structure.
        seed: seed of the sampler's generator.
    """

    strategy: str = "ist"
    fraction: float | None = None
    num_layers: int | None = None
    interval: int = 20
    suppress_fraction: float = 0.5
    suppression_factor: float = 0.25
    probe_interval: int = 10
    num_probes: int = 3
    score_lr: float = 10.0
    probe_batch_size: int = 16
    probe_chunk_size: int | None = None
    train_outside_blocks: bool = True
    optimizer_state: str = "keep"
    blocks_path: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise LayerSelectionError(f"Unknown layer strategy {self.strategy!r}; choose one of {STRATEGIES}.")
        if self.optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise LayerSelectionError(f"Unknown optimizer_state policy {self.optimizer_state!r}; choose one of "
                                      f"{OPTIMIZER_STATE_POLICIES}.")
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise LayerSelectionError(f"fraction must be in (0, 1] (a share of the blocks), got {self.fraction}.")
        if self.num_layers is not None and self.num_layers < 1:
            raise LayerSelectionError(f"num_layers must be at least 1, got {self.num_layers}.")
        if not (0 < self.suppress_fraction <= 1):
            raise LayerSelectionError(f"suppress_fraction must be in (0, 1], got {self.suppress_fraction}.")
        for name in ("interval", "probe_interval", "num_probes", "probe_batch_size", "probe_chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LayerSelectionError(f"{name} must be at least 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict:
        return asdict(self)

    def count(self, num_blocks: int) -> int:
        """Blocks updated per step out of ``num_blocks``; checked to be between 1 and all of them."""
        if self.strategy == "full":
            return num_blocks
        if self.num_layers is not None:
            count, asked = self.num_layers, f"num_layers={self.num_layers}"
        elif self.strategy == "lisa" and self.fraction is None:
            count, asked = 2, "LISA's default γ=2"
        else:
            fraction = 0.25 if self.fraction is None else self.fraction
            count, asked = int(fraction * num_blocks), f"fraction={fraction} → int({fraction}·{num_blocks})"
        if count < 1:
            raise LayerSelectionError(
                f"{asked} selects no block of {num_blocks}: raise the fraction to at least {1 / num_blocks:.3g} "
                "or give num_layers.")
        if count > num_blocks:
            raise LayerSelectionError(f"{asked} asks for {count} blocks but the model has {num_blocks}: lower it.")
        return count


def ist_score_update(scores: torch.Tensor, subsets: Sequence[Sequence[int]], losses: Sequence[float],
                     step_size: float) -> torch.Tensor:
    """IST's score update from probes: subset k (block positions) gave loss_k when suppressed.

    R_k = exp(−loss_k), A_k = R_k − mean(R); with p = σ(s) taken once before the updates, every block l
    suppressed in probe k gets s_l += step_size · A_k · p_l (1 − p_l). Returns the new scores.
    """
    rewards = torch.exp(-torch.tensor(losses, dtype=torch.float64))
    advantages = rewards - rewards.mean()
    p = torch.sigmoid(scores.double())
    slope = p * (1 - p)
    updated = scores.double().clone()
    for advantage, subset in zip(advantages, subsets):
        index = torch.as_tensor(list(subset), dtype=torch.long)
        updated[index] += step_size * advantage * slope[index]
    return updated.to(scores.dtype)


class LayerSampler:
    """Draws the blocks of each step for one strategy; holds the IST scores and the generator.

    ``positions`` index the candidate blocks (0..L−1); the engine maps them to block indices.
    """

    def __init__(self, config: LayerwiseConfig, num_blocks: int):
        self.config = config
        self.num_blocks = num_blocks
        self.count = config.count(num_blocks)
        self.scores = torch.zeros(num_blocks, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.current: list[int] = []
        if config.strategy == "ist":
            self.num_suppressed = int(config.suppress_fraction * num_blocks)
            if self.num_suppressed < 1:
                raise LayerSelectionError(
                    f"suppress_fraction={config.suppress_fraction} suppresses no block of {num_blocks}: raise it.")
            if math.comb(num_blocks, self.num_suppressed) < config.num_probes:
                raise LayerSelectionError(
                    f"{config.num_probes} probes need distinct subsets of {self.num_suppressed} of {num_blocks} blocks "
                    f"but only {math.comb(num_blocks, self.num_suppressed)} exist: lower num_probes.")

    def probe_due(self, step: int) -> bool:
        """IST probes at steps probe_interval, 2·probe_interval, ... (``step`` = optimizer steps done)."""
        return self.config.strategy == "ist" and step > 0 and step % self.config.probe_interval == 0

    def select(self, step: int) -> list[int]:
        """The block positions trained at ``step`` (sorted)."""
        strategy = self.config.strategy
        if strategy == "full":
            self.current = list(range(self.num_blocks))
        elif strategy == "lisa":
            if step % self.config.interval == 0 or not self.current:
                self.current = self._draw(torch.ones(self.num_blocks), self.count)
        elif strategy == "random":
            self.current = self._draw(torch.ones(self.num_blocks), self.count)
        else:
            self.current = self._draw(torch.sigmoid(-self.scores), self.count)
        return self.current

    def probe(self, loss_with_suppressed: Callable[[list[int]], float]) -> dict:
        """One IST score update: ``num_probes`` distinct subsets drawn ∝ σ(s), each scored by the callable."""
        subsets: list[list[int]] = []
        weights = torch.sigmoid(self.scores)
        for _ in range(100 * self.config.num_probes):
            subset = self._draw(weights, self.num_suppressed)
            if subset not in subsets:
                subsets.append(subset)
            if len(subsets) == self.config.num_probes:
                break
        else:
            raise LayerSelectionError("Could not draw distinct probe subsets in 100 tries per probe: the scores are "
                                      "too peaked for this few blocks; lower num_probes.")
        losses = [loss_with_suppressed(subset) for subset in subsets]
        before = self.scores.clone()
        self.scores = ist_score_update(self.scores, subsets, losses, self.config.score_lr)
        return {"subsets": subsets, "losses": losses, "scores_before": before.tolist(), "scores": self.scores.tolist()}

    def sample_indices(self, population: int, size: int) -> list[int]:
        """Probe samples, drawn from the sampler's generator (so they are the same on every rank)."""
        return torch.randperm(population, generator=self.generator)[:size].tolist()

    def _draw(self, weights: torch.Tensor, count: int) -> list[int]:
        return sorted(torch.multinomial(weights.float(), count, replacement=False, generator=self.generator).tolist())

    def state_dict(self) -> dict:
        return {"scores": self.scores.tolist(), "current": list(self.current),
                "generator": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        if len(state["scores"]) != self.num_blocks:
            raise LayerSelectionError(f"The saved layer state has {len(state['scores'])} block scores but this model has "
                                      f"{self.num_blocks} candidate blocks: it belongs to another model.")
        self.scores = torch.tensor(state["scores"], dtype=torch.float64)
        self.current = list(state["current"])
        raw = base64.b64decode(state["generator"])
        self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
