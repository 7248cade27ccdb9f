"""Importance estimation: per-sample gradients and the diagonal Fisher information."""

from .fisher import FisherMode, estimate_fisher, scored_parameters
from .hooks import PerSampleGradCapture
from .losses import TaskType, infer_task_type
from .rules import DenseGrads, RowGrads, find_rule, register_rule

__all__ = [
    "DenseGrads",
    "FisherMode",
    "PerSampleGradCapture",
    "RowGrads",
    "TaskType",
    "estimate_fisher",
    "find_rule",
    "infer_task_type",
    "register_rule",
    "scored_parameters",
]
