"""transformers ``Trainer`` integration of layer-wise tuning (IST, LISA, random, full)::

    model = get_peft_model(model, LoraConfig(...))
    trainer = Trainer(model=model, args=args, ..., callbacks=[LayerwiseCallback(LayerwiseConfig("ist"))])

Trainer builds its optimizer from the parameters that require grad when training starts; the callback
touches nothing before that, so every block is in the optimizer, and from then on it only toggles
``requires_grad`` at each step's start. Scores, selections and the sampler's generator go into every
checkpoint (``trainer_state.json``, under this callback's name) and are restored on resume; the
selections and scores are added to the Trainer logs, and at the end ``layerwise_history.json`` and the
heat map ``layerwise_heatmap.png`` are written to ``output_dir``.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from typing import Callable

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..engines.layerwise import LayerwiseEngine, resident_state_bytes
from ..engines.dense_mask import unwrap_optimizer
from ..selection.layers import LayerSelectionError, LayerwiseConfig
from ..utils.distributed import refuse_sharded_args
from ..utils.io import write_json

logger = logging.getLogger("sparsepeft")

HISTORY_FILE = "layerwise_history.json"
HEATMAP_FILE = "layerwise_heatmap.png"


class LayerwiseCallback(TrainerCallback, ExportableState):
    """Train, each step, only the blocks a :class:`LayerwiseConfig` strategy chooses.

    Args:
        config: the strategy and its constants (a ``LayerwiseConfig`` or its dict).
        probe_data, collate_fn: where IST's probe batches come from; default: the Trainer's training
            dataset and collator.
        write_history: write ``layerwise_history.json`` and the heat map at the end of training.
    """

    _created: list = []  # weak references to every instance, oldest first (see __new__)

    def __new__(cls, *args, restore_into_live_callback: bool = False, **kwargs):
        """With ``restore_callback_states_from_checkpoint``, Trainer replaces each callback by one rebuilt
        from its saved ``args`` alone, which would drop the user's probe data and collator and leave the
        user's handle without history. The saved args carry ``restore_into_live_callback``: the rebuild
        then returns the newest callback of this class that has not trained yet (the one the user gave
        this Trainer), and Trainer's restore sets the saved state on it."""
        if restore_into_live_callback:
            for ref in reversed(cls._created):
                live = ref()
                if live is not None and type(live) is cls and not live._trained:
                    return live
        instance = super().__new__(cls)
        cls._created = [ref for ref in cls._created if ref() is not None] + [weakref.ref(instance)]
        return instance

    def __init__(self, config: LayerwiseConfig | dict | None = None, probe_data: Sequence | None = None,
                 collate_fn: Callable | None = None, write_history: bool = True,
                 restore_into_live_callback: bool = False):
        if restore_into_live_callback and getattr(self, "_initialised", False):
            return  # the user's own callback, kept as the user built it
        self._initialised = True
        self._trained = False
        self.config = LayerwiseConfig(**config) if isinstance(config, dict) else (config or LayerwiseConfig())
        self.probe_data = probe_data
        self.collate_fn = collate_fn
        self.write_history = write_history
        self.engine: LayerwiseEngine | None = None
        self._resume_state: dict | None = None  # set by Trainer when it rebuilds callbacks from a checkpoint
        self.stats: dict = {}
        self.history: dict | None = None  # the engine's history, kept after training ends

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        refuse_sharded_args(args)
        self._trained = True
        if args.world_size > 1 and args.ddp_find_unused_parameters is False:
            raise LayerSelectionError("Under DDP the blocks that sit a step out get no gradient: leave "
                                      "ddp_find_unused_parameters unset (or True) for layer-wise training.")
        if model is None or optimizer is None:
            raise RuntimeError("LayerwiseCallback needs the Trainer's model and optimizer at train begin.")
        probe_data = self.probe_data if self.probe_data is not None else getattr(train_dataloader, "dataset", None)
        collate_fn = self.collate_fn or getattr(train_dataloader, "collate_fn", None)
        self.engine = LayerwiseEngine(model, self.config, probe_data, collate_fn,
                                      train_batch_size=args.per_device_train_batch_size).attach()
        _check_optimizer_holds(optimizer, self.engine)
        saved = self._resume_state or _saved_state(state, type(self).__name__)
        if saved and state.global_step > 0:
            if saved.get("step") != state.global_step:
                raise LayerSelectionError(f"The checkpoint's layer state is at step {saved.get('step')} but the "
                                          f"Trainer resumes at step {state.global_step}: the checkpoint is inconsistent.")
            self.engine.load_state_dict(saved)
            logger.info("Resumed layer-wise %s state at step %d", self.config.strategy, state.global_step)
        elif state.global_step > 0:
            logger.warning("Resuming at step %d without saved layer state: the %s sampler starts afresh.",
                           state.global_step, self.config.strategy)
            self.engine.step = state.global_step

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.engine.step_begin(optimizer, step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.engine is None or logs is None or "loss" not in logs:
            return
        entries = self.engine.log_entries()
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.engine is None:
            return
        if optimizer is not None:
            self.stats = {"optimizer_state_bytes_on_device": resident_state_bytes(optimizer),
                          "optimizer_state_params": len(unwrap_optimizer(optimizer).state)}
        if self.write_history and state.is_world_process_zero:
            save_history(self.engine.history(), args.output_dir)
        self.history = self.engine.history()
        self.engine.detach(optimizer)
        self.engine = None

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> dict:
        attributes = {"_resume_state": self.engine.state_dict()} if self.engine is not None else {}
        return {"args": {"config": self.config.to_dict(), "restore_into_live_callback": True},
                "attributes": attributes}


def _saved_state(state, name: str) -> dict | None:
    saved = (state.stateful_callbacks or {}).get(name)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return (saved or {}).get("attributes", {}).get("_resume_state")


def _check_optimizer_holds(optimizer, engine: LayerwiseEngine) -> None:
    """The LISA-port bug: blocks frozen when the optimizer was built are never updated later."""
    held = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
    missing = [i for i in engine.block_ids if any(id(p) not in held for _, p in engine.groups.blocks[i])]
    if missing:
        raise LayerSelectionError(
            f"The optimizer does not hold the parameters of blocks {missing}: they would never be updated. Build the "
            "optimizer over every block's parameters (leave them trainable until training starts); the callback "
            "switches blocks by requires_grad.")


def save_history(history: dict, output_dir: str | os.PathLike) -> None:
    from ..selection.plot import plot_layer_heatmap

    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, HISTORY_FILE), history)
    plot_layer_heatmap(history, os.path.join(output_dir, HEATMAP_FILE))
