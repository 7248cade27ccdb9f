"""Training engines: how a mask is enforced while training.

``dense-mask`` (reference): masked gradients on the dense weights, dense optimizer state.
``sparse``: value vectors of the selected entries, optimizer state O(k), sparse-delta checkpoints;
:class:`Reselector` moves its entries during training (SpIEL-style drop and grow).
"""

from .delta import DeltaMismatchError, apply_delta, base_content_hash, read_delta, save_delta
from .dense_mask import DenseMaskEngine
from .sparse_delta import SparseDeltaEngine, optimizer_state_bytes
from .reselection import ReselectionConfig, ReselectionError, Reselector

ENGINES = {"dense-mask": DenseMaskEngine, "sparse": SparseDeltaEngine}

__all__ = ["DeltaMismatchError", "DenseMaskEngine", "ENGINES", "ReselectionConfig", "ReselectionError", "Reselector",
           "SparseDeltaEngine", "apply_delta",
           "base_content_hash", "optimizer_state_bytes", "read_delta", "save_delta"]
