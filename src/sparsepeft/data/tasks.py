"""Task specifications: which columns hold the text and the label, and which metric is official.

GLUE files come in two shapes: the original TSV distribution (``TASK/train.tsv``, ``TASK/dev.tsv``, the
layout of ``download_glue_data.py``) and the hub's ``nyu-mll/glue`` parquet. Label ids follow the hub's
order so that a model trained from either source means the same thing by label 0.
"""

from __future__ import annotations

from dataclasses import dataclass


class LabelSpace:
    """``label_names`` of a task: None for regression (one output), else the class names in id order."""

    label_names: tuple[str, ...] | None

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


@dataclass(frozen=True)
class TaskSpec(LabelSpace):
    name: str
    folder: str
    text_columns: tuple[str, ...]  # in the local TSV header (or positions, for header-less files)
    label_column: str
    label_names: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    eval_files: dict[str, str]  # split name -> local file
    hub_text_columns: tuple[str, ...]
    hub_eval_splits: tuple[str, ...] = ("validation",)
    header: bool = True
    positions: dict[str, int] | None = None  # column name -> index, for header-less files
    local_label_values: tuple[str, ...] | None = None  # how labels are written locally, in id order


_DEV = {"validation": "dev.tsv"}

GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        "cola", "CoLA", ("sentence",), "label", ("unacceptable", "acceptable"), ("matthews_correlation",), _DEV,
        ("sentence",), header=False, positions={"source": 0, "label": 1, "original_label": 2, "sentence": 3},
        local_label_values=("0", "1"),
    ),
    "sst2": TaskSpec("sst2", "SST-2", ("sentence",), "label", ("negative", "positive"), ("accuracy",), _DEV,
                     ("sentence",), local_label_values=("0", "1")),
    "mrpc": TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"),
                     ("accuracy", "f1"), _DEV, ("sentence1", "sentence2"), local_label_values=("0", "1")),
    "qqp": TaskSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"),
                    ("accuracy", "f1"), _DEV, ("question1", "question2"), local_label_values=("0", "1")),
    "stsb": TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearmanr"), _DEV,
                     ("sentence1", "sentence2")),
    "mnli": TaskSpec(
        "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
        ("accuracy",), {"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
        ("premise", "hypothesis"), hub_eval_splits=("validation_matched", "validation_mismatched"),
        local_label_values=("entailment", "neutral", "contradiction"),
    ),
    "qnli": TaskSpec("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"),
                     ("accuracy",), _DEV, ("question", "sentence"), local_label_values=("entailment", "not_entailment")),
    "rte": TaskSpec("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
                    ("accuracy",), _DEV, ("sentence1", "sentence2"), local_label_values=("entailment", "not_entailment")),
    "wnli": TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"),
                     ("accuracy",), _DEV, ("sentence1", "sentence2"), local_label_values=("0", "1")),
}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def glue_task(name: str) -> TaskSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GLUE_TASKS:
        raise ValueError(f"Unknown task {name!r}. GLUE tasks: {', '.join(sorted(GLUE_TASKS))}; a BIG-bench task "
                         "needs --data-dir DIR with DIR/NAME/task.json; for your own data pass "
                         "--train-file/--validation-file instead of --task.")
    return GLUE_TASKS[key]


def task_names(task: str | None) -> list[str]:
    """The task names of ``--task``: one, or several comma-separated (a suite trained on their union)."""
    return [name.strip() for name in (task or "").split(",") if name.strip()]
