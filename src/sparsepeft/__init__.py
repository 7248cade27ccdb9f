"""sparsepeft — importance-aware sparse fine-tuning on the Hugging Face stack.

Importance estimation (``estimate_fisher``; ``importance_scores`` for |gradient|, |w x gradient|, |w|) -> selection
(``candidate_parameters``) (``select_mask``, ``SparseMask``,
``fish_tuning_mask`` inside PEFT modules at a ``Budget``, ``ird_search``, ``shira_mask_fn`` for PEFT's SHiRA) -> training engines (``DenseMaskEngine``,
``SparseDeltaEngine``, ``apply_delta``; ``Reselector`` re-selects its entries while training) -> integrations (``SparseMaskCallback`` for ``Trainer``,
``apply_method`` for PEFT methods and the bottleneck adapters of ``sparsepeft.adapters``).
Layer-wise tuning (IST, LISA, random, full): ``LayerwiseConfig`` -> ``LayerwiseEngine`` (plain loops) or
``LayerwiseCallback`` (``Trainer``).
"""

from .engines import DeltaMismatchError, DenseMaskEngine, ReselectionConfig, Reselector, SparseDeltaEngine, apply_delta
from .engines.layerwise import LayerwiseEngine
from .importance import FisherMode, TaskType, estimate_fisher, register_rule
from .importance.scores import importance_scores, mean_gradient
from .integrations import LayerwiseCallback, SparseMaskCallback, SparseTrainer, mask_from_checkpoint
from .models.peft import apply_method, reference_count
from .selection import Budget, BudgetError, MaskMismatchError, SparseMask, random_mask, select_mask
from .selection.candidates import candidate_parameters
from .selection.fish_tuning import FishTuningConfig, fish_tuning_mask
from .selection.ird import IRDConfig, IRDResult, ird_search
from .selection.shira import shira_fisher, shira_mask_fn
from .selection.layers import LayerSelectionError, LayerwiseConfig, ist_score_update

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetError",
    "FishTuningConfig",
    "IRDConfig",
    "IRDResult",
    "LayerSelectionError",
    "LayerwiseCallback",
    "LayerwiseConfig",
    "LayerwiseEngine",
    "ist_score_update",
    "ird_search",
    "apply_method",
    "fish_tuning_mask",
    "reference_count",
    "DeltaMismatchError",
    "DenseMaskEngine",
    "SparseDeltaEngine",
    "ReselectionConfig",
    "Reselector",
    "apply_delta",
    "FisherMode",
    "MaskMismatchError",
    "SparseMask",
    "SparseMaskCallback",
    "SparseTrainer",
    "TaskType",
    "estimate_fisher",
    "importance_scores",
    "mean_gradient",
    "candidate_parameters",
    "mask_from_checkpoint",
    "random_mask",
    "register_rule",
    "select_mask",
    "shira_fisher",
    "shira_mask_fn",
]
