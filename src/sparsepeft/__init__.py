"""sparsepeft — importance-aware sparse fine-tuning on the Hugging Face stack.

Importance estimation (``estimate_fisher``) -> selection (``select_mask``, ``SparseMask``) ->
training engines (``DenseMaskEngine``, ``SparseDeltaEngine``, ``apply_delta``) -> integrations (``SparseMaskCallback`` for ``Trainer``).
"""

from .engines import DeltaMismatchError, DenseMaskEngine, SparseDeltaEngine, apply_delta
from .importance import FisherMode, TaskType, estimate_fisher, register_rule
from .integrations import SparseMaskCallback, mask_from_checkpoint
from .selection import MaskMismatchError, SparseMask, random_mask, select_mask

__version__ = "0.1.0"

__all__ = [
    "DeltaMismatchError",
    "DenseMaskEngine",
    "SparseDeltaEngine",
    "apply_delta",
    "FisherMode",
    "MaskMismatchError",
    "SparseMask",
    "SparseMaskCallback",
    "TaskType",
    "estimate_fisher",
    "mask_from_checkpoint",
    "random_mask",
    "register_rule",
    "select_mask",
]
