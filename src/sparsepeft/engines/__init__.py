"""Training engines: how a mask is enforced while training.

``dense-mask`` (reference): masked gradients on the dense weights, dense optimizer state.
``sparse``: value vectors of the selected entries, optimizer state O(k), sparse-delta checkpoints.
"""

from .delta import DeltaMismatchError, apply_delta, base_content_hash, read_delta, save_delta
from .dense_mask import DenseMaskEngine
from .sparse_delta import SparseDeltaEngine, optimizer_state_bytes

ENGINES = {"dense-mask": DenseMaskEngine, "sparse": SparseDeltaEngine}

__all__ = ["DeltaMismatchError", "DenseMaskEngine", "ENGINES", "SparseDeltaEngine", "apply_delta",
           "base_content_hash", "optimizer_state_bytes", "read_delta", "save_delta"]
