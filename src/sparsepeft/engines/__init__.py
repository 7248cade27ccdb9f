"""Training engines: how a mask is enforced while training."""

from .dense_mask import DenseMaskEngine

__all__ = ["DenseMaskEngine"]
