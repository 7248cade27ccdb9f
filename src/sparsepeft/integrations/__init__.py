"""Integrations with the training stack users already have."""

from .layerwise import HEATMAP_FILE, HISTORY_FILE, LayerwiseCallback
from .trainer import DELTA_FILE, MASK_FILE, SparseMaskCallback, SparseTrainer, mask_from_checkpoint

__all__ = ["DELTA_FILE", "HEATMAP_FILE", "HISTORY_FILE", "LayerwiseCallback", "MASK_FILE", "SparseMaskCallback",
           "SparseTrainer", "mask_from_checkpoint"]
