"""transformers ``Trainer`` integration: a callback that delegates to a training engine.

Add it to an existing script and keep your ``TrainingArguments``::

    trainer = Trainer(model=model, args=args, ..., callbacks=[SparseMaskCallback(mask)])

The mask freezes what it does not train when the Trainer is built (before any optimizer or DDP wrapper
exists), hooks into the optimizer when training begins, and is written into every checkpoint folder so
a resumed run can be checked against it.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..engines.dense_mask import DenseMaskEngine
from ..selection.mask import SparseMask

MASK_FILE = "sparse_mask.safetensors"


class SparseMaskCallback(TrainerCallback):
    """Train only the entries of ``mask`` (dense-mask engine) inside ``transformers.Trainer``."""

    def __init__(self, mask: SparseMask, guard: str = "auto", save_in_checkpoints: bool = True):
        self.mask = mask
        self.guard = guard
        self.save_in_checkpoints = save_in_checkpoints
        self.engine: DenseMaskEngine | None = None

    def _ensure_attached(self, model) -> DenseMaskEngine:
        if self.engine is None:
            if model is None:
                raise RuntimeError("SparseMaskCallback got no model from the Trainer.")
            self.engine = DenseMaskEngine(model, self.mask, guard=self.guard).attach()
        return self.engine

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._ensure_attached(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        engine = self._ensure_attached(model)
        if optimizer is None:
            raise RuntimeError("SparseMaskCallback needs the Trainer's optimizer at train begin.")
        engine.attach_optimizer(optimizer)

    def on_save(self, args, state, control, **kwargs):
        if self.save_in_checkpoints and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                self.mask.save(os.path.join(folder, MASK_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.detach()
            self.engine = None


def mask_from_checkpoint(checkpoint_dir: str | os.PathLike) -> SparseMask | None:
    """The mask saved in a Trainer checkpoint folder by :class:`SparseMaskCallback`, if any."""
    path = os.path.join(checkpoint_dir, MASK_FILE)
    return SparseMask.load(path) if os.path.isfile(path) else None
