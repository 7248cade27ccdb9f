"""Selection: from importance scores to the set of entries that are trained."""

from .budget import Budget, BudgetError
from .mask import MaskMismatchError, SparseMask, model_fingerprint, random_mask, select_mask
from .topk import DEFAULT_ALWAYS_TRAIN

__all__ = ["Budget", "BudgetError", "DEFAULT_ALWAYS_TRAIN", "MaskMismatchError", "SparseMask", "model_fingerprint",
           "random_mask", "select_mask"]
