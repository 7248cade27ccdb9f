"""Matching parameter names against module names: shared by every stage that picks modules by name."""

from __future__ import annotations

import re
from typing import Sequence


def matches_module(name: str, patterns: Sequence[str]) -> bool:
    """True when the parameter ``name`` lies in a module named by one of ``patterns``.

    A pattern is a module path (``classifier``, ``roberta.pooler``) matched on whole dotted components,
    or a regular expression when it starts with ``re:``.
    """
    dotted = f".{name}."
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif f".{pattern}." in dotted:
            return True
    return False
