"""Per-sample log-likelihood terms for the heads the Fisher engine understands.

Every function returns a ``[batch]`` tensor: the negative log-likelihood of *each* sample, so that the
gradient of their sum, split by the per-sample rules, is exactly ``g_i`` for every sample ``i``.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


PerSampleLoss = Callable[[torch.Tensor, dict], torch.Tensor]


class TaskType(str, Enum):
    CLASSIFICATION = "classification"
    MULTI_LABEL = "multi_label_classification"
    REGRESSION = "regression"
    CAUSAL_LM = "causal_lm"


def infer_task_type(model: nn.Module) -> TaskType:
    """Read the task from the model's class and config, as transformers' own heads do."""
    config = getattr(model, "config", None)
    class_name = type(model).__name__
    if "CausalLM" in class_name or "LMHeadModel" in class_name:
        return TaskType.CAUSAL_LM
    problem_type = getattr(config, "problem_type", None)
    if problem_type == "regression" or (problem_type is None and getattr(config, "num_labels", 2) == 1):
        return TaskType.REGRESSION
    if problem_type == "multi_label_classification":
        return TaskType.MULTI_LABEL
    if "SequenceClassification" in class_name or problem_type == "single_label_classification":
        return TaskType.CLASSIFICATION
    raise ValueError(
        f"Cannot tell which loss {class_name} is trained with. Pass task_type= one of "
        f"{[t.value for t in TaskType]} or a custom loss_fn(logits, batch) -> per-sample loss."
    )


def _labels(batch: dict) -> torch.Tensor:
    if "labels" not in batch:
        raise ValueError("The empirical Fisher needs true labels, but the batch has no 'labels' key.")
    return batch["labels"]


def causal_lm_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per position (``[batch, positions]``) and the mask of positions that count."""
    shifted_logits = _upcast(logits[:, :-1, :])
    shifted_labels = labels[:, 1:]
    valid = shifted_labels != -100
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).reshape(shifted_labels.shape)
    return nll * valid, valid


def empirical_nll(task: TaskType, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """-log p(y_i | x_i) with the true label of each sample (the reference "label-square" Fisher).

    Regression uses a unit-variance Gaussian, ``(f - y)^2 / 2``: proportional to the MSE the model
    trains with, so the ranking of parameters is the same, and on the same scale as the expected mode.
    A causal LM sample's loss is the mean NLL over its labelled tokens, as the model's own loss is
    for a batch of one.
    """
    labels = _labels(batch)
    if task is TaskType.CLASSIFICATION:
        return F.cross_entropy(_upcast(logits), labels.long(), reduction="none")
    if task is TaskType.REGRESSION:
        return 0.5 * (_upcast(logits).reshape(labels.shape[0], -1).squeeze(-1) - labels.to(logits.dtype if logits.dtype == torch.float64 else torch.float32)) ** 2
    if task is TaskType.MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(_upcast(logits), labels.to(logits.dtype if logits.dtype == torch.float64 else torch.float32), reduction="none").sum(-1)
    nll, valid = causal_lm_token_nll(logits, labels)
    return nll.sum(-1) / valid.sum(-1).clamp(min=1)


def expected_terms(task: TaskType, logits: torch.Tensor) -> Iterator[torch.Tensor]:
    """Terms whose per-sample squared gradients sum to the exact expected Fisher.

    ``sum_c p_c (grad log p_c)^2 = sum_c (grad sqrt(p_c) * log p_c)^2`` with ``p_c`` held constant, so
    one backward per class of ``sqrt(p_c) * (-log p_c)`` yields it. For a unit-variance Gaussian the
    expectation over ``y`` of ``((y - f) grad f)^2`` is ``(grad f)^2``: one backward of ``f``.
    """
    if task is TaskType.CLASSIFICATION:
        log_probs = F.log_softmax(_upcast(logits), dim=-1)
        weights = log_probs.detach().exp().sqrt()
        for c in range(logits.shape[-1]):
            yield -weights[:, c] * log_probs[:, c]
    elif task is TaskType.REGRESSION:
        yield _upcast(logits).reshape(logits.shape[0], -1).squeeze(-1)
    else:
        raise ValueError(
            f"mode='expected' is defined here for classification and regression heads, not {task.value}: "
            "summing over a whole vocabulary or over every label subset is not tractable. Use mode='empirical'."
        )
