"""Integrations with the training stack users already have."""

from .trainer import DELTA_FILE, MASK_FILE, SparseMaskCallback, mask_from_checkpoint

__all__ = ["DELTA_FILE", "MASK_FILE", "SparseMaskCallback", "mask_from_checkpoint"]
