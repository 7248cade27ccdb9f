"""Selection: from importance scores to the set of entries that are trained."""

from .mask import MaskMismatchError, SparseMask, model_fingerprint, random_mask, select_mask
from .topk import DEFAULT_ALWAYS_TRAIN

__all__ = ["DEFAULT_ALWAYS_TRAIN", "MaskMismatchError", "SparseMask", "model_fingerprint", "random_mask", "select_mask"]
