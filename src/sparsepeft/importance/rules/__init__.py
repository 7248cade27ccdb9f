"""Per-sample-gradient rules; importing this package registers every built-in rule."""

from . import embedding, linear, normalization, peft_layers  # noqa: F401  (registration side effects)
from .registry import DenseGrads, FactoredGrads, PerSampleGrads, RowGrads, find_rule, register_rule

__all__ = ["DenseGrads", "FactoredGrads", "PerSampleGrads", "RowGrads", "find_rule", "register_rule"]
