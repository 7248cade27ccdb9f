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

from ..engines import ENGINES, SparseDeltaEngine, optimizer_state_bytes
from ..selection.mask import SparseMask
from ..utils.distributed import refuse_sharded_args

MASK_FILE = "sparse_mask.safetensors"
DELTA_FILE = "sparse_delta.safetensors"


class SparseMaskCallback(TrainerCallback):
    """Train only the entries of ``mask`` inside ``transformers.Trainer``.

    Args:
        engine: ``"dense-mask"`` (masked gradients, dense optimizer state; the reference) or ``"sparse"``
            (value vectors of the selected entries: optimizer state O(k); the delta of the trained
            entries is written to ``output_dir/sparse_delta.safetensors`` and into every checkpoint).
        guard: dense-mask only, see :class:`DenseMaskEngine`.
    """

    def __init__(self, mask: SparseMask, engine: str = "dense-mask", guard: str = "auto",
                 save_in_checkpoints: bool = True):
        if engine not in ENGINES:
            raise ValueError(f"Unknown engine {engine!r}; choose one of {sorted(ENGINES)}.")
        self.mask = mask
        self.engine_name = engine
        self.guard = guard
        self.save_in_checkpoints = save_in_checkpoints
        self.engine = None
        self._attached_at_init = False
        self.stats: dict[str, int] = {}

    def _ensure_attached(self, model):
        if self.engine is None:
            if model is None:
                raise RuntimeError("SparseMaskCallback got no model from the Trainer.")
            if self.engine_name == "sparse":
                self.engine = SparseDeltaEngine(model, self.mask).attach()
            else:
                self.engine = ENGINES[self.engine_name](model, self.mask, guard=self.guard).attach()
        return self.engine

    def on_init_end(self, args, state, control, model=None, **kwargs):
        refuse_sharded_args(args)
        self._ensure_attached(model)
        self._attached_at_init = True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.engine_name == "sparse" and not self._attached_at_init:
            raise RuntimeError("engine='sparse' adds the trainable value vectors before Trainer builds its "
                               "optimizer: pass the callback as Trainer(callbacks=[...]), not add_callback().")
        engine = self._ensure_attached(model)
        if optimizer is None:
            raise RuntimeError("SparseMaskCallback needs the Trainer's optimizer at train begin.")
        engine.attach_optimizer(optimizer)

    def on_save(self, args, state, control, **kwargs):
        if self.save_in_checkpoints and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                self.mask.save(os.path.join(folder, MASK_FILE))
                if isinstance(self.engine, SparseDeltaEngine):
                    self.engine.save_delta(os.path.join(folder, DELTA_FILE))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.engine is None:
            return
        self.stats = {"trainable_state_bytes": self.engine.trainable_state_bytes()}
        if optimizer is not None:
            self.stats["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
        if isinstance(self.engine, SparseDeltaEngine) and state.is_world_process_zero:
            self.engine.save_delta(os.path.join(args.output_dir, DELTA_FILE))
        self.engine.detach()  # the model goes back as a plain model holding the trained weights
        self.engine = None


def mask_from_checkpoint(checkpoint_dir: str | os.PathLike) -> SparseMask | None:
    """The mask saved in a Trainer checkpoint folder by :class:`SparseMaskCallback`, if any."""
    path = os.path.join(checkpoint_dir, MASK_FILE)
    return SparseMask.load(path) if os.path.isfile(path) else None
