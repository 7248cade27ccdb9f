"""Re-selection during training (SpIEL-style drop and grow) for the sparse engine.

A fixed mask keeps the entries chosen at the start for the whole run. SpIEL (Ansell et al., 2024) instead
re-selects every ``every`` steps: inside each partly-trained tensor it drops the trained entries that moved least
from their pretrained value and grows the same number where recent gradients are largest, so the budget per
tensor stays fixed. Its "accumulated gradient" criterion scores candidates in O(k) memory: at the first backward of
a window of ``accumulation`` optimizer steps before the re-selection, each tensor's top-k entries by |gradient|
become its candidates, and the window's step gradients are summed on those candidates only. The share swapped
starts at ``rate`` and decays linearly to zero at the last step (SpIEL's ``initial_reselection_rate``).

What differs from SpIEL's code, and why:

- The starting mask is the run's own (FISH, random, ...); SpIEL replaces its random start wholesale at its first
  re-selection. Here every re-selection swaps at most ``rate`` of the entries, so ``--method fish`` with
  re-selection starts from the Fisher mask and drifts from it.
- A grown entry's AdamW moments start at the mean and mean square of its step gradients over the window (as
  SpIEL does), but torch's AdamW keeps one step count per tensor, so its bias correction is the tensor's, not the
  entry's (SpIEL's optimizer counts each entry's age). Late in training the correction is ~1 either way.
- Gradients are the ones the backward produced, before clipping. Under fp16 loss scaling they would be scaled, so
  the CLI refuses ``--fp16`` with re-selection (bf16 and float32 need no scaling).

The engine holds the current weight of every trained entry, not its change, so the pretrained values of the
trained entries are kept here (k numbers, in the weight's dtype) to measure |change| and to put a dropped entry
back. Not supported under DDP: each rank would choose candidates from its own gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .dense_mask import unwrap_optimizer
from .sparse_delta import SparseDeltaEngine
from ..utils.distributed import is_distributed


class ReselectionError(ValueError):
    """Re-selection asked for where it cannot run (another engine, DDP) or with settings that cannot work."""


@dataclass
class ReselectionConfig:
    """SpIEL's schedule (its defaults: every 20 steps, 5 steps of gradients, 20% swapped at first)."""

    every: int = 20
    accumulation: int = 5
    rate: float = 0.2

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ReselectionError(f"--reselect-every must be at least 1 (optimizer steps), got {self.every}.")
        if not 1 <= self.accumulation <= self.every:
            raise ReselectionError(f"--reselect-accumulation must be between 1 and --reselect-every ({self.every}), "
                                   f"got {self.accumulation}: the candidates are scored on the steps before each "
                                   "re-selection.")
        if not 0 < self.rate <= 1:
            raise ReselectionError(f"--reselect-rate must be in (0, 1], got {self.rate}.")

    def to_dict(self) -> dict:
        return asdict(self)


CHUNK = 1 << 24  # entries of a gradient ranked at a time: 64 MB of |gradient| in float32, whatever the tensor's size


def largest_entries(grad: torch.Tensor, k: int, chunk: int = CHUNK) -> torch.Tensor:
    """Flat indices of the ``k`` entries of largest |grad|, ranked a chunk at a time: the copy |grad| needs is one
    chunk, not the tensor (a 1B model's embedding gradient is ~1 GB in float32). The same set as one ``topk`` over
    the whole tensor wherever there is no tie at the k-th value."""
    flat = grad.detach().reshape(-1)
    k = min(k, flat.numel())
    best_values = best_index = None
    for start in range(0, flat.numel(), chunk):
        values, index = torch.topk(flat[start:start + chunk].abs(), min(k, flat[start:start + chunk].numel()),
                                   sorted=False)
        index += start
        if best_values is not None:
            values, index = torch.cat([best_values, values]), torch.cat([best_index, index])
            keep = torch.topk(values, k, sorted=False).indices
            values, index = values[keep], index[keep]
        best_values, best_index = values, index
    return best_index


class _Candidates:
    """One tensor's candidates during a window: flat indices, and the sums of their step gradients and squares."""

    def __init__(self, grad: torch.Tensor, k: int):
        self.dtype = torch.promote_types(grad.dtype, torch.float32)  # bf16 gradients are summed in float32
        self.index = largest_entries(grad, k)
        self.step = torch.zeros(self.index.numel(), device=grad.device, dtype=self.dtype)  # this step's micro-batches
        self.total = torch.zeros_like(self.step)
        self.squares = torch.zeros_like(self.step)
        self.steps = 0

    def add(self, grad: torch.Tensor) -> None:
        self.step += grad.detach().reshape(-1)[self.index].to(self.dtype)

    def end_step(self) -> None:
        self.total += self.step
        self.squares += self.step * self.step
        self.step.zero_()
        self.steps += 1


class Reselector:
    """Drop-and-grow re-selection of a :class:`SparseDeltaEngine`'s entries (see the module docstring).

    Plain PyTorch::

        engine = SparseDeltaEngine(model, mask).attach()
        optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-3)
        engine.attach_optimizer(optimizer)
        Reselector(engine, ReselectionConfig(every=20)).attach(optimizer, total_steps=1000)

    With Trainer: ``SparseMaskCallback(mask, engine="sparse", reselection=ReselectionConfig(...))``.
    """

    def __init__(self, engine: SparseDeltaEngine, config: ReselectionConfig):
        if not isinstance(engine, SparseDeltaEngine):
            raise ReselectionError("Re-selection moves the value vectors of the sparse engine: train with "
                                   "--engine sparse (SparseDeltaEngine).")
        if is_distributed():
            raise ReselectionError("Re-selection is not supported under DDP yet: each process would choose "
                                   "candidates from its own gradients. Train on one process, or drop "
                                   "--reselect-every.")
        if not engine.partial:
            raise ReselectionError("Re-selection swaps entries inside partly-trained tensors, and this mask trains "
                                   "every tensor it touches in full: there is nothing to re-select.")
        self.engine, self.config = engine, config
        self.base = {name: part.weight.detach().reshape(-1)[part.index].clone() for name, part in engine.partial.items()}
        self.step, self.total_steps = 0, 1
        self.candidates: dict[str, _Candidates] = {}
        self.optimizer = None
        self.history: list[dict] = []
        self._handle = None

    # ------------------------------------------------------------------ wiring
    def attach(self, optimizer, total_steps: int, start_step: int = 0) -> "Reselector":
        """Start observing gradients and re-select after the optimizer's steps. ``start_step``: the steps a resumed
        run has already taken (the schedule continues from there)."""
        self.optimizer = unwrap_optimizer(optimizer)
        self.total_steps, self.step = max(1, int(total_steps)), int(start_step)
        self.engine.grad_observer = self._observe
        self._handle = self.optimizer.register_step_post_hook(self._after_step)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.engine.grad_observer = None
        self.candidates.clear()

    def _in_window(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is one of the ``accumulation`` steps ending at a re-selection."""
        every = self.config.every
        return step < self.total_steps and (step - 1) % every >= every - self.config.accumulation

    def _observe(self, name: str, grad: torch.Tensor) -> None:
        if not self._in_window(self.step + 1):
            return
        if name not in self.candidates:
            self.candidates[name] = _Candidates(grad, self.engine.partial[name].index.numel())
        self.candidates[name].add(grad)

    def _after_step(self, optimizer=None, args=None, kwargs=None) -> None:
        self.step += 1
        if not self._in_window(self.step):
            return
        for candidates in self.candidates.values():
            candidates.end_step()
        if self.step % self.config.every == 0:
            self.reselect()

    # ------------------------------------------------------------------ the swap
    def share(self) -> float:
        """The share of each tensor's entries swapped at this step: ``rate``, decaying linearly to 0 at the end."""
        return self.config.rate * (1 - self.step / self.total_steps)

    @torch.no_grad()
    def reselect(self) -> int:
        """Swap entries in every tensor with candidates; returns how many entries moved in all."""
        share, moved = self.share(), 0
        for name, candidates in self.candidates.items():
            moved += self._reselect_tensor(name, candidates, share)
        self.history.append({"step": self.step, "share": share, "moved": moved})
        self.candidates.clear()
        return moved

    def _reselect_tensor(self, name: str, candidates: _Candidates, share: float) -> int:
        part = self.engine.partial[name]
        index, values, base = part.index, part.values, self.base[name]
        n = int(share * index.numel())
        if n == 0:
            return 0
        change = (values.detach().to(base.dtype) - base).abs()
        leaving = torch.topk(change, n, largest=False, sorted=True).indices  # moved least first
        staying = torch.ones_like(index, dtype=torch.bool)
        staying[leaving] = False
        free = ~torch.isin(candidates.index, index[staying])
        pool, total, squares = candidates.index[free], candidates.total[free], candidates.squares[free]
        best = torch.topk(total.abs(), min(n, pool.numel()), sorted=True).indices
        joining, total, squares = pool[best], total[best], squares[best]
        # an entry both leaving and joining stays where it is: out of both lists
        rejoins, stays = torch.isin(joining, index[leaving]), torch.isin(index[leaving], joining)
        joining, total, squares = joining[~rejoins], total[~rejoins], squares[~rejoins]
        leaving = leaving[~stays][: joining.numel()]
        if joining.numel() == 0:
            return 0
        restore = base[leaving].clone()
        base[leaving] = part.weight.detach().reshape(-1)[joining].to(base.dtype)  # untrained: their base value
        steps = max(1, candidates.steps)  # fewer than the window in a run resumed inside one
        self._reset_state(values, leaving, total / steps, squares / steps)
        order = self.engine.move_entries(name, leaving, joining, restore)
        base.copy_(base[order])
        self._permute_state(values, order)
        return joining.numel()

    def _reset_state(self, values: torch.nn.Parameter, slots: torch.Tensor, mean: torch.Tensor,
                     mean_square: torch.Tensor) -> None:
        """The joining entries' optimizer state: AdamW's moments from the window's gradients, anything else of the
        vector's shape zero."""
        for key, tensor in self._entry_state(values):
            start = mean if key == "exp_avg" else mean_square if key in ("exp_avg_sq", "max_exp_avg_sq") else None
            tensor[slots] = 0 if start is None else start.to(tensor)

    def _permute_state(self, values: torch.nn.Parameter, order: torch.Tensor) -> None:
        for _, tensor in self._entry_state(values):
            tensor.copy_(tensor[order])

    def _entry_state(self, values: torch.nn.Parameter):
        """The optimizer's per-entry state of a value vector (AdamW's moments), as (key, tensor)."""
        return [(key, tensor) for key, tensor in self.optimizer.state.get(values, {}).items()
                if isinstance(tensor, torch.Tensor) and tensor.shape == values.shape]

    @torch.no_grad()
    def adopt(self, indices: dict[str, torch.Tensor]) -> None:
        """Make ``indices`` (a checkpoint's mask, saved at an earlier re-selection) the engine's entries, each tensor's
        current entries back at their base values, so that the checkpoint's delta can be loaded."""
        for name, part in self.engine.partial.items():
            new = indices[name].to(part.index.device)
            if torch.equal(new, part.index):
                continue
            self.engine.replace_index(name, new, self.base[name])
            self.base[name] = part.weight.detach().reshape(-1)[part.index].clone()

    def stats(self) -> dict:
        """What results.json records: the schedule, and how many entries each re-selection moved."""
        return {**self.config.to_dict(), "reselections": len(self.history),
                "entries_moved": sum(h["moved"] for h in self.history), "history": self.history}
