"""Integrations with the training stack users already have."""

from .trainer import MASK_FILE, SparseMaskCallback, mask_from_checkpoint

__all__ = ["MASK_FILE", "SparseMaskCallback", "mask_from_checkpoint"]
