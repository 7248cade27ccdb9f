"""transformers ``Trainer`` integration: a callback that delegates to a training engine.

Add it to an existing script and keep your ``TrainingArguments``::

    trainer = Trainer(model=model, args=args, ..., callbacks=[SparseMaskCallback(mask)])

The mask freezes what it does not train when the Trainer is built (before any optimizer or DDP wrapper
exists), hooks into the optimizer when training begins, and is written into every checkpoint folder so
a resumed run can be checked against it.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.sampling import EpochSeededLengthGroupedSampler, ShuffledLengthGroupedSampler, check_shuffle_length_groups
from ..engines import ENGINES, SparseDeltaEngine, optimizer_state_bytes
from ..engines.reselection import ReselectionConfig, ReselectionError, Reselector
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
        reselection: sparse engine only: drop and grow entries inside each tensor during training
            (:mod:`sparsepeft.engines.reselection`); the mask in checkpoints and at the end is the current one.
    """

    def __init__(self, mask: SparseMask, engine: str = "dense-mask", guard: str = "auto",
                 save_in_checkpoints: bool = True, reselection: ReselectionConfig | None = None):
        if engine not in ENGINES:
            raise ValueError(f"Unknown engine {engine!r}; choose one of {sorted(ENGINES)}.")
        if reselection is not None and engine != "sparse":
            raise ReselectionError("Re-selection moves the value vectors of the sparse engine: use engine='sparse' "
                                   "(--engine sparse).")
        self.mask = mask
        self.reselection = reselection
        if reselection is not None:  # the mask's header and variant say it was re-selected
            mask.config["reselection"] = reselection.to_dict()
        self.reselector: Reselector | None = None
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
                if self.reselection is not None:  # reads the base values now, before a checkpoint is loaded
                    self.reselector = Reselector(self.engine, self.reselection)
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
        if self.reselector is not None:  # a resumed run continues the schedule from its step
            self.reselector.attach(optimizer, total_steps=state.max_steps, start_step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.save_in_checkpoints and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                self.mask.save(os.path.join(folder, MASK_FILE))
                if isinstance(self.engine, SparseDeltaEngine) and not os.path.isfile(os.path.join(folder, DELTA_FILE)):
                    self.engine.save_delta(os.path.join(folder, DELTA_FILE))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.engine is None:
            return
        self.stats = {"trainable_state_bytes": self.engine.trainable_state_bytes()}
        if optimizer is not None:
            self.stats["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
        if self.reselector is not None:
            self.stats["reselection"] = self.reselector.stats()
            self.reselector.detach()
            self.reselector = None
        if isinstance(self.engine, SparseDeltaEngine) and state.is_world_process_zero:
            self.engine.save_delta(os.path.join(args.output_dir, DELTA_FILE))
        self.engine.detach()  # the model goes back as a plain model holding the trained weights
        self.engine = None


class SparseTrainer(Trainer):
    """``Trainer`` whose checkpoints, while a :class:`SparseMaskCallback` trains with ``engine="sparse"``, hold the
    trained entries (``sparse_delta.safetensors``, k indices and values) instead of a dense copy of the model, and
    resume from them. A plain ``Trainer`` with the callback works too, with dense checkpoints.

    A resumed run starts from the same base model (``--model``): the delta is checked against its frozen
    weights before it is written in. The final ``save_model()`` after training writes the whole model as usual
    (the engine has detached by then), so the output folder loads in ``from_pretrained``.

    ``shuffle_length_groups``: with ``train_sampling_strategy="group_by_length"``, train Trainer's length groups in
    random order (:mod:`sparsepeft.data.sampling`) instead of longest to shortest within each mega-batch. On more than
    one process either length-grouped order is drawn from a generator seeded with ``args.seed`` and the epoch, so the
    processes share one order (Trainer's own sampler lets them drift apart from the second epoch)."""

    def __init__(self, *args, shuffle_length_groups: bool = False, **kwargs):
        self.shuffle_length_groups = shuffle_length_groups
        super().__init__(*args, **kwargs)
        check_shuffle_length_groups(shuffle_length_groups, self.args)

    def _get_train_sampler(self, *args, **kwargs):
        sampler = super()._get_train_sampler(*args, **kwargs)
        if type(sampler) is not LengthGroupedSampler:
            return sampler
        if self.args.world_size > 1:
            return EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=self.args.seed,
                                                   shuffle_batches=self.shuffle_length_groups)
        if self.shuffle_length_groups:  # one process: Trainer's draw from the global generator, so --seed decides it
            return ShuffledLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, generator=sampler.generator)
        return sampler

    def _sparse_engine(self) -> SparseDeltaEngine | None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, SparseMaskCallback) and isinstance(callback.engine, SparseDeltaEngine):
                return callback.engine
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        engine = self._sparse_engine()
        if engine is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        engine.save_delta(os.path.join(output_dir, DELTA_FILE))
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if config is not None:
            config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _delta_in(self, folder: str | None) -> str | None:
        """The checkpoint's delta, when it holds one and no dense weights."""
        if folder is None or self._sparse_engine() is None:
            return None
        delta = os.path.join(folder, DELTA_FILE)
        dense = any(name.endswith((".safetensors", ".bin")) and name.startswith(("model", "pytorch_model"))
                    for name in os.listdir(folder))
        return delta if os.path.isfile(delta) and not dense else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        delta = self._delta_in(resume_from_checkpoint)
        if delta is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._sparse_engine().load_delta(delta)

    def _load_best_model(self) -> None:
        delta = self._delta_in(self.state.best_model_checkpoint)
        if delta is None:
            return super()._load_best_model()
        reselector = self._reselector()
        if reselector is not None:  # the best checkpoint may hold an earlier mask: take it back first
            saved = mask_from_checkpoint(self.state.best_model_checkpoint)
            if saved is None:
                raise FileNotFoundError(f"{self.state.best_model_checkpoint} holds no {MASK_FILE}: a re-selecting run "
                                        "needs the checkpoint's mask to load its delta.")
            reselector.adopt(saved.indices)
        self._sparse_engine().load_delta(delta)

    def _reselector(self) -> Reselector | None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, SparseMaskCallback) and callback.reselector is not None:
                return callback.reselector
        return None


def mask_from_checkpoint(checkpoint_dir: str | os.PathLike) -> SparseMask | None:
    """The mask saved in a Trainer checkpoint folder by :class:`SparseMaskCallback`, if any."""
    path = os.path.join(checkpoint_dir, MASK_FILE)
    return SparseMask.load(path) if os.path.isfile(path) else None
