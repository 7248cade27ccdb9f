"""Layer-wise sparse tuning: each step only the chosen blocks' PEFT parameters train.

Plain PyTorch::

    engine = LayerwiseEngine(model, LayerwiseConfig("ist"), probe_data=train, collate_fn=collate).attach()
    optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-4)   # every block, once
    for batch in loader:
        engine.step_begin(optimizer)      # probe (IST, when due), draw, toggle requires_grad
        model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
    engine.detach()

Blocks are switched by ``requires_grad``, never by optimizer membership: the optimizer is built once over
all blocks (as Trainer does), and a block that is not selected has no ``.grad``, so every torch optimizer
skips it — no weight decay, no momentum step. Because its parameters do not require grad, autograd records
nothing for it: when nothing below the lowest selected block trains (no trained embeddings), the backward
pass stops there and the activations of the blocks below are freed during the forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

from ..importance.suppression import suppressed_loss, suppressible_modules
from ..models.blocks import BlockParameters, block_parameters, find_blocks
from ..selection.layers import LayerSampler, LayerSelectionError, LayerwiseConfig
from ..utils.distributed import (assert_same_on_all_ranks, broadcast_from_rank_zero, is_distributed,
                                 refuse_sharded_model)
from .dense_mask import unwrap_optimizer

STATE_VERSION = 1
DEFAULT_PROBE_CHUNK = 8  # samples per probe forward when neither the config nor the training batch size says


class LayerwiseEngine:
    """Choose, every optimizer step, which blocks' trainable parameters are updated.

    Args:
        model: a PEFT model (or a model with bottleneck adapters, or a plain model for LISA's
            full-parameter form); the parameters requiring grad at :meth:`attach` are the ones it manages.
        config: the strategy and its constants.
        probe_data: IST only — training examples (a sequence of feature dicts) the probes draw from.
        collate_fn: turns a list of examples into a batch with ``labels``.
        train_batch_size: IST only — the training batch size. Unless ``config.probe_chunk_size`` is set, the
            probe batch is evaluated in chunks of this many samples, so a probe never needs more activation
            memory than a training step (``LayerwiseCallback`` passes the per-device batch size). Without
            either, chunks of ``DEFAULT_PROBE_CHUNK`` samples.
    """

    def __init__(self, model: nn.Module, config: LayerwiseConfig | None = None,
                 probe_data: Sequence | None = None, collate_fn: Callable | None = None,
                 train_batch_size: int | None = None):
        self.model = model
        config = config or LayerwiseConfig()
        if config.strategy == "ist" and config.probe_chunk_size is None:
            config = dataclasses.replace(config, probe_chunk_size=train_batch_size or DEFAULT_PROBE_CHUNK)
        self.config = config
        self.probe_data = probe_data
        self.collate_fn = collate_fn
        self.groups: BlockParameters | None = None
        self.sampler: LayerSampler | None = None
        self.step = 0
        self.selections: list[list[int]] = []  # block indices trained at each step
        self.probes: list[dict] = []
        self._suppressible: list[list[nn.Module]] = []
        self._offloaded: set[int] = set()
        self._attached = False

    # ------------------------------------------------------------------ setup
    def attach(self) -> "LayerwiseEngine":
        if self._attached:
            raise RuntimeError("This LayerwiseEngine is already attached.")
        refuse_sharded_model(self.model)
        self.groups = block_parameters(self.model, self.config.blocks_path)
        self.sampler = LayerSampler(self.config, len(self.groups.block_ids))
        if self.config.strategy == "ist":
            self._prepare_probes()
        self._attached = True
        return self

    def _prepare_probes(self) -> None:
        _, blocks = find_blocks(self.model, self.groups.path)
        self._suppressible = [suppressible_modules(blocks[i]) for i in self.groups.block_ids]
        empty = [i for i, modules in zip(self.groups.block_ids, self._suppressible) if not modules]
        if empty:
            raise LayerSelectionError(
                f"IST's probe scales each block's PEFT output, but blocks {empty} hold no PEFT module (LoRA, DoRA, "
                "bottleneck adapter ...). Add a PEFT method to every block, or use strategy 'lisa' or 'random'.")
        if self.probe_data is None or self.collate_fn is None:
            raise LayerSelectionError("IST needs probe_data and collate_fn: the training examples its probes draw "
                                      f"{self.config.probe_batch_size} samples from.")
        if len(self.probe_data) < self.config.probe_batch_size:
            raise LayerSelectionError(
                f"probe_batch_size={self.config.probe_batch_size} is larger than the {len(self.probe_data)} training "
                "examples: lower probe_batch_size.")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the engine manages: give all of it to the optimizer, once."""
        groups = self._require_groups()
        return [p for i in groups.block_ids for _, p in groups.blocks[i]] + [p for _, p in groups.outside]

    @property
    def block_ids(self) -> list[int]:
        return self._require_groups().block_ids

    def _require_groups(self) -> BlockParameters:
        if self.groups is None:
            raise RuntimeError("Call attach() first.")
        return self.groups

    # ------------------------------------------------------------------ each step
    def step_begin(self, optimizer=None, step: int | None = None) -> list[int]:
        """Probe when due, draw this step's blocks, switch gradients; returns the selected block indices."""
        groups = self._require_groups()
        step = self.step if step is None else step
        if self.sampler.probe_due(step):
            self._probe(step)
        positions = self.sampler.select(step)
        selected = [groups.block_ids[p] for p in positions]
        self._switch(set(selected), optimizer)
        self.selections.append(selected)
        self.step = step + 1
        return selected

    def _switch(self, selected: set[int], optimizer) -> None:
        groups = self.groups
        for index in groups.block_ids:
            on = index in selected
            for _, param in groups.blocks[index]:
                param.requires_grad_(on)
                if not on:
                    param.grad = None
        for _, param in groups.outside:
            param.requires_grad_(self.config.train_outside_blocks)
            if not self.config.train_outside_blocks:
                param.grad = None
        if optimizer is not None and self.config.optimizer_state != "keep":
            self._apply_state_policy(unwrap_optimizer(optimizer), selected)

    def _apply_state_policy(self, optimizer: torch.optim.Optimizer, selected: set[int]) -> None:
        """Offload or drop the optimizer state of blocks that sit this step out; bring back the selected."""
        for index in self.groups.block_ids:
            on = index in selected
            for _, param in self.groups.blocks[index]:
                state = optimizer.state.get(param)
                if not state:
                    continue
                if self.config.optimizer_state == "drop" and not on:
                    del optimizer.state[param]
                elif self.config.optimizer_state == "offload":
                    if not on and id(param) not in self._offloaded:
                        _move_state(state, torch.device("cpu"))
                        self._offloaded.add(id(param))
                    elif on and id(param) in self._offloaded:
                        _move_state(state, param.device)
                        self._offloaded.discard(id(param))

    def _probe(self, step: int) -> None:
        start = time.perf_counter()
        sampler = self.sampler
        indices = sampler.sample_indices(len(self.probe_data), self.config.probe_batch_size)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in self.collate_fn([self.probe_data[i] for i in indices]).items()}

        def loss_with_suppressed(positions: list[int]) -> float:
            modules = [m for p in positions for m in self._suppressible[p]]
            return suppressed_loss(self.model, batch, modules, self.config.suppression_factor,
                                   self.config.probe_chunk_size)

        # Every rank probes the same batch with the same weights; rank 0's losses are used everywhere so
        # floating-point noise can never make the ranks' scores (and then their draws) drift apart.
        record = sampler.probe(lambda positions: broadcast_from_rank_zero(loss_with_suppressed(positions)))
        record["step"] = step
        record["subsets"] = [[self.groups.block_ids[p] for p in subset] for subset in record["subsets"]]
        record["seconds"] = time.perf_counter() - start  # the probe's cost beside the training step's
        self.probes.append(record)
        if is_distributed():
            assert_same_on_all_ranks(hashlib.sha256(repr(record["scores"]).encode()).hexdigest(), "the IST layer scores")

    # ------------------------------------------------------------------ reporting and state
    @property
    def scores(self) -> dict[int, float]:
        """IST score of each candidate block (0 for the other strategies)."""
        return dict(zip(self.block_ids, self.sampler.scores.tolist()))

    def log_entries(self) -> dict:
        entries = {"layers_selected": " ".join(map(str, self.selections[-1])) if self.selections else ""}
        if self.config.strategy == "ist":
            ranked = sorted(self.scores.items(), key=lambda item: -item[1])  # all of them: the history file
            entries["layer_scores_top"] = " ".join(f"{i}:{s:.3g}" for i, s in ranked[:3])
            entries["layer_score_spread"] = round(ranked[0][1] - ranked[-1][1], 6) if ranked else 0.0
        return entries

    def history(self) -> dict:
        """Everything the heat map and a reader need: selections per step, probes and scores."""
        return {"config": self.config.to_dict(), "blocks_path": self.groups.path, "block_ids": self.block_ids,
                "num_blocks": self.groups.num_blocks, "selections": self.selections, "probes": self.probes,
                "scores": self.scores}

    def signature(self) -> dict:
        """What a saved state must agree with: the blocks and the names and shapes of their parameters."""
        groups = self._require_groups()
        described = [f"{n}:{tuple(p.shape)}" for i in groups.block_ids for n, p in groups.blocks[i]]
        return {"blocks_path": groups.path, "block_ids": groups.block_ids,
                "parameters": hashlib.sha256("\n".join(described).encode()).hexdigest()}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "strategy": self.config.strategy, "step": self.step,
                "signature": self.signature(), "sampler": self.sampler.state_dict(),
                "selections": self.selections, "probes": self.probes}

    def load_state_dict(self, state: dict) -> None:
        mine = self.signature()
        if state.get("signature") != mine:
            raise LayerSelectionError(
                f"The saved layer-wise state belongs to another model (blocks {state.get('signature', {}).get('block_ids')} "
                f"at {state.get('signature', {}).get('blocks_path')!r}, vs {mine['block_ids']} at {mine['blocks_path']!r}, "
                "or other PEFT parameters): resume from a checkpoint of this model and PEFT configuration.")
        if state.get("strategy") != self.config.strategy:
            raise LayerSelectionError(f"The checkpoint was trained with strategy {state.get('strategy')!r}, this run "
                                      f"asks for {self.config.strategy!r}: resume with the same strategy.")
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.selections = [list(s) for s in state["selections"]]
        self.probes = list(state["probes"])

    def detach(self, optimizer=None) -> None:
        """Every managed parameter trainable again (optimizer state brought back if it was offloaded)."""
        if not self._attached:
            return
        if optimizer is not None and self._offloaded:
            inner = unwrap_optimizer(optimizer)
            for param in self.trainable_parameters():
                if id(param) in self._offloaded and param in inner.state:
                    _move_state(inner.state[param], param.device)
        self._offloaded.clear()
        for param in self.trainable_parameters():
            param.requires_grad_(True)
        self._attached = False


def _move_state(state: dict, device: torch.device) -> None:
    """Move an optimizer state's per-entry tensors; scalar step counters stay where the optimizer keeps them."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != device:
            state[key] = value.to(device, non_blocking=False)


def resident_state_bytes(optimizer, device: torch.device | None = None) -> int:
    """Bytes of optimizer state held on ``device`` (default: each parameter's own device)."""
    inner = unwrap_optimizer(optimizer)
    total = 0
    for param, state in inner.state.items():
        where = device or param.device
        total += sum(v.numel() * v.element_size() for v in state.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device == where)
    return total
