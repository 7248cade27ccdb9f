"""How many entries a mask may keep: an explicit count, a fraction, or the size of a reference config.

FISH-Tuning's claim is about *equal* budgets: build the PEFT method larger (LoRA r=16) and mask it down
to the trainable count of the baseline (LoRA r=8). ``"lora:r=8"`` says exactly that; the count is
taken from the reference method applied to the same base model (built on the meta device, so it costs
no memory and no time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable


_WHOLE_NUMBER_OPTIONS = ("r", "bottleneck_size", "target_r", "init_r")  # a reference's sizes


class BudgetError(ValueError):
    """The budget cannot be met by the candidates (too large, or too small for the always-trained head)."""


@dataclass(frozen=True)
class Budget:
    """One of: ``count`` entries; ``ratio`` of the candidates; the trainable count of ``reference``.

    ``reference`` is a method name plus options that override the run's own (``lora`` with ``r=8``);
    ``Budget.parse("lora:r=8,target_modules=query+value")``.
    """

    count: int | None = None
    ratio: float | None = None
    reference: str | None = None
    reference_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.count, self.ratio, self.reference))
        if given != 1:
            raise BudgetError("A budget is exactly one of: a count (74498), a ratio (0.5 or 50%), or a reference "
                              "config ('lora:r=8').")
        if self.count is not None and self.count < 1:
            raise BudgetError(f"A budget count must be at least 1, got {self.count}.")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise BudgetError(f"A budget ratio must be in (0, 1], got {self.ratio} (write 0.5 or 50% for half).")

    @classmethod
    def parse(cls, text: str | int | float) -> "Budget":
        """``"74498"`` (count), ``"0.5"`` / ``"50%"`` (of the candidates), ``"lora:r=8"`` (reference)."""
        if isinstance(text, bool):
            raise BudgetError(f"Not a budget: {text!r}.")
        if isinstance(text, int):
            return cls(count=text)
        if isinstance(text, float):
            return cls(ratio=text)
        text = str(text).strip()
        if not text:
            raise BudgetError("Empty budget: give a count (74498), a ratio (50%) or a reference ('lora:r=8').")
        if text.endswith("%"):
            return cls(ratio=_number(text[:-1], text) / 100)
        if text[0].isdigit() or text[0] in ".-+":
            value = _number(text, text)
            return cls(count=int(value)) if value >= 1 and float(value).is_integer() and "." not in text else cls(ratio=value)
        method, _, options = text.partition(":")
        method = method.strip().lower()
        from ..models.peft import METHODS

        if method not in METHODS:
            raise BudgetError(f"Cannot read the budget {text!r}: {method!r} is not a method ({', '.join(METHODS)}). "
                              "Write a count (74498), a ratio (0.5 or 50%), or a reference config ('lora:r=8').")
        parsed = parse_options(options)
        wrong = [f"{key}={value!r}" for key, value in parsed.items()
                 if key in _WHOLE_NUMBER_OPTIONS and (not isinstance(value, int) or isinstance(value, bool) or value < 1)]
        if wrong:
            raise BudgetError(f"Cannot read the budget {text!r}: {', '.join(wrong)} must be a whole number >= 1 "
                              "(e.g. 'lora:r=8').")
        return cls(reference=method, reference_options=parsed)

    def resolve(self, num_candidates: int, reference_count: Callable[[str, dict], int] | None = None) -> int:
        """The number of entries to keep among ``num_candidates``."""
        if self.count is not None:
            count = self.count
        elif self.ratio is not None:
            count = max(1, round(self.ratio * num_candidates))
        else:
            if reference_count is None:
                raise BudgetError(f"The budget names a reference config ({self.describe()}): it needs the base model "
                                  "to count that config's trainable parameters.")
            count = reference_count(self.reference, dict(self.reference_options))
        if count > num_candidates:
            raise BudgetError(
                f"The budget ({self.describe()} = {count} entries) is larger than the {num_candidates} parameters "
                "that can be trained. Make the PEFT module larger (raise r / the bottleneck size) or lower the budget.")
        return count

    def describe(self) -> str:
        if self.count is not None:
            return str(self.count)
        if self.ratio is not None:
            return f"{100 * self.ratio:g}%"
        options = ",".join(f"{k}={_format(v)}" for k, v in self.reference_options.items())
        return f"{self.reference}:{options}" if options else str(self.reference)


def _number(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BudgetError(f"Cannot read the budget {whole!r}: write a count (74498), a ratio (0.5 or 50%), or a "
                          "reference config ('lora:r=8').") from None
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"A budget must be positive, got {whole!r}.")
    return value


def parse_options(text: str) -> dict[str, Any]:
    """``"r=8,lora_alpha=16,target_modules=query+value"`` -> typed options (lists joined by ``+``)."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise BudgetError(f"Option {item!r} needs a value: write key=value (e.g. r=8).")
        options[key.strip().replace("-", "_")] = _typed(value.strip())
    return options


def _typed(value: str) -> Any:
    if "+" in value:
        return [_typed(v) for v in value.split("+") if v]
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _format(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
