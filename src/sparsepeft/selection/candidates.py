"""Which tensors a full-model mask may choose from.

A global ranking over every weight puts most of a small budget wherever gradients are largest — on a
classifier model, the pooler next to the freshly initialised head (83% of the demo's mask). Restricting
the candidates is how the sparse fine-tuning papers avoid it: SHiRA, SMT and SpIEL choose among the
transformer blocks' linear weights, the matrices LoRA adapts. The always-trained head stays a candidate
(trained in full, counted inside the budget) whatever the pattern says.

A spec is ``all`` (every trainable parameter, the FISH Mask reference), ``linear`` (the weight of every
``nn.Linear`` inside a numbered block), or comma-separated module patterns (``query,value``,
``re:attention``); a pattern starting with ``!`` removes matches (``!pooler,!embeddings``: everything but).
A tied weight answers to every name it has: on a model whose output head shares the input embedding (SmolLM2,
GPT-2), ``!lm_head`` and ``!embed_tokens`` both remove the one shared matrix.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from ..utils.names import matches_module

PRESETS = ("all", "linear")
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class CandidateError(ValueError):
    """A candidate spec that selects nothing, or names nothing in this model."""


def block_linear_weights(model: nn.Module) -> set[str]:
    """Names of the weights of ``nn.Linear`` modules that sit inside a numbered block (``layer.3.``)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _BLOCK_INDEX.search(f".{module_name}."):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def candidate_parameters(model: nn.Module, spec: str | Sequence[str] | None = "all",
                         always_train: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """The trainable parameters a mask chooses among, in model order (``always_train`` modules included).

    Raises :class:`CandidateError` when a pattern matches no parameter, or when nothing but the
    always-trained modules is left to rank."""
    items = _items(spec)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if items == ["all"]:
        return trainable
    include = [i for i in items if not i.startswith("!")]
    exclude = [i[1:] for i in items if i.startswith("!")]
    linear = block_linear_weights(model)
    names = _all_names(model, trainable)

    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(matches_module(alias, patterns) for alias in names[name])

    for pattern in include + exclude:
        if pattern != "linear" and not any(matches(n, [pattern]) for n in trainable):
            raise CandidateError(f"The --candidates pattern {pattern!r} matches no trainable parameter of this model. "
                                 "Use a module name of the model (e.g. query, attention.output.dense), 're:REGEX', "
                                 f"or a preset ({', '.join(PRESETS)}).")

    def included(name: str) -> bool:
        if not include or "all" in include:
            return True
        return (name in linear and "linear" in include) or matches(name, [p for p in include if p != "linear"])

    def excluded(name: str) -> bool:
        return (name in linear and "linear" in exclude) or matches(name, [p for p in exclude if p != "linear"])

    chosen = {n: p for n, p in trainable.items()
              if (included(n) and not excluded(n)) or matches_module(n, always_train)}
    if not any(not matches_module(n, always_train) for n in chosen):
        raise CandidateError(f"--candidates {','.join(items)!r} leaves nothing to rank besides the always-trained "
                             "modules: widen the pattern.")
    return chosen


def _all_names(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, list[str]]:
    """Every name of each trainable parameter: its first (the one masks use) and those it is tied under."""
    first = {id(p): n for n, p in trainable.items()}
    names = {n: [n] for n in trainable}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and name != first[id(param)]:
            names[first[id(param)]].append(name)
    return names


def _items(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return ["all"]
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if not items:
        raise CandidateError("Empty --candidates: use 'all', 'linear' or module patterns.")
    return items
