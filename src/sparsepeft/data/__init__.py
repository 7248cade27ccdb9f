"""Data: GLUE and user files, metrics, tokenisation and batching."""

from .collate import PaddingCollator
from .loading import DataError, Split, TaskData, load_files, load_glue
from .metrics import compute_metrics, primary_metric
from .tasks import GLUE_TASKS, TaskSpec, glue_task

__all__ = ["DataError", "GLUE_TASKS", "PaddingCollator", "Split", "TaskData", "TaskSpec", "compute_metrics",
           "glue_task", "load_files", "load_glue", "primary_metric"]
